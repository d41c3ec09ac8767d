"""psi-margins: the target column's ``cos(theta)`` -> a new target logit ``psi(theta)``.

Every loss of the margin-softmax family below differs only in what it does to the target logit,
a pure function of the angle ``theta``, registered with its paper defaults:

========== =============================================== ===================== =====
name       target logit psi(theta)                          defaults              s
========== =============================================== ===================== =====
softmax    ``cos(theta)`` (NormFace, no margin)             -                     30
sphereface ``(-1)^k cos(m*theta) - 2k``, k=floor(m*theta/pi) m=1.5 (m >= 1)       30
cosface    ``cos(theta) - m``                               m=0.35 (0 <= m <= 1)  64
arcface    ``cos(theta + m)``                               m=0.5, fallback=False 64
combined   ``cos(m1*theta + m2) - m3``                      m1=1, m2=0.5, m3=0    64
expface    ``cos(pi * (theta/pi)**m)``                      m=0.7 (0 < m <= 1)    64
========== =============================================== ===================== =====

Two gradient modes: ``"detached"`` (default) replaces the target logit without autograd, so the
backward sees d(logit)/d(cos) = 1, exactly as insightface's ``arcface_torch`` and the ExpFace
authors' code do; ``"exact"`` back-propagates the true derivative ``psi'(theta) * (-1 / sin theta)``
of ``psi(acos(cos))`` (what the original MXNet ArcFace and Sub-center ArcFace symbols do through
``arccos``), exact at every angle the dtype can tell from 0 and pi (below 3.5e-4 rad a float32
cosine is 1.0; float64 resolves 1.5e-8 rad): only at cos = +-1 exactly is ``theta`` taken as
:func:`~facemargin.margins.base.min_angle` from the end, so that the gradient is large but
finite where the reference code gives inf or NaN.

``dynamic="balanced" | "plain"`` (expface, cosface, arcface, sphereface) replaces ``m`` every
step by the ExpFace authors' per-batch margin (``PowerFace_d`` / ``CosFace_d`` / ``ArcFace_d`` /
``SphereFace_d`` in their ``losses.py``; ``plain`` = their ``*_dd`` variants). With ``P`` = mean
target cosine over the labelled rows, ``N`` = mean of every other entry of those rows,
``theta_P = acos P`` and ``b = ln(C - 1) / s`` (``b = 0`` for ``plain``)::

    expface     m = ln(acos(N + b) / pi) / ln(theta_P / pi)
    cosface     m = P - N - b
    arcface     m = acos(N + b) - theta_P
    sphereface  m = acos(N + b) / theta_P

computed without gradient; under Partial FC the means are over the global batch and all
centres (the authors' code averages each GPU's own block). ``C`` is the global number of
classes, also with sampled centres, as in their code. ``s`` is the margin's own (30 for
sphereface unless set; the authors' ``SphereFace_d`` defaults to 32, their SphereFace configs
use s = 32, m = 1.7). Wherever their code gives a finite ``m`` we give the same ``m``; we differ
only where it gives NaN or inf: (1) the argument of each ``acos`` is clamped to ``[-1, 1]``
(their logits are clamped to ``[-1, 1]`` by Partial FC, but ``N + b > 1``, e.g. small ``s`` and
many classes, gives NaN: here ``acos(N + b) = 0``, so ArcFace gets ``m = -theta_P`` and
SphereFace ``m = 0``); (2) if ``m`` is then still NaN or inf (ExpFace with ``acos(N + b) = 0`` or
``theta_P = pi``; SphereFace with ``theta_P = 0``), ``theta_P`` is clamped to
``[THETA_EPS, pi - THETA_EPS]`` and ``acos(N + b)`` to ``>= THETA_EPS`` and ``m`` recomputed.
``m`` is logged as ``"m"``; the configured ``m`` is unused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .base import THETA_EPS, BaseMargin, MarginInput, MarginOutput, check_flag, check_range, compute_dtype, min_angle

__all__ = ["DYNAMIC_MODES", "GRAD_MODES", "MARGINS", "Margin", "MarginSpec", "target_logit"]

GRAD_MODES = ("detached", "exact")
DYNAMIC_MODES = ("balanced", "plain")
Bounds = tuple[float, float, bool, bool]  # low, high, low_open, high_open

ScalarOrTensor = float | Tensor


def _softmax(theta: Tensor) -> Tensor:
    return torch.cos(theta)


def _sphereface(theta: Tensor, m: ScalarOrTensor) -> Tensor:
    m_theta = m * theta
    k = torch.floor(m_theta / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k
    return sign * torch.cos(m_theta) - 2.0 * k


def _cosface(theta: Tensor, m: ScalarOrTensor) -> Tensor:
    return torch.cos(theta) - m


def _arcface(theta: Tensor, m: ScalarOrTensor, fallback: bool = False) -> Tensor:
    out = torch.cos(theta + m)
    if fallback:
        # The original ArcFace code: past theta + m > pi the curve turns back up, so use the
        # CosFace-like cos(theta) - m*sin(m) there instead (insightface's `sinmm`).
        m_t = torch.as_tensor(m, dtype=theta.dtype, device=theta.device)
        out = torch.where(theta + m > math.pi, torch.cos(theta) - m_t * torch.sin(m_t), out)
    return out


def _combined(theta: Tensor, m1: float, m2: float, m3: float) -> Tensor:
    return torch.cos(m1 * theta + m2) - m3


def _expface(theta: Tensor, m: ScalarOrTensor) -> Tensor:
    return torch.cos(math.pi * torch.pow(theta / math.pi, m))


@dataclass(frozen=True)
class MarginSpec:
    """One registered psi-margin: ``fn(theta, **params)``, its paper defaults and valid ranges."""

    name: str
    fn: Callable[..., Tensor]
    defaults: dict[str, float | bool] = field(default_factory=dict)
    s: float = 64.0
    paper: str = ""
    bounds: dict[str, Bounds] = field(default_factory=dict)


MARGINS: dict[str, MarginSpec] = {
    spec.name: spec
    for spec in (
        MarginSpec("softmax", _softmax, {}, 30.0, "NormFace, Wang et al. 2017"),
        MarginSpec("sphereface", _sphereface, {"m": 1.5}, 30.0, "SphereFace-Revived, Liu et al. 2022",
                   {"m": (1.0, math.inf, False, True)}),
        MarginSpec("cosface", _cosface, {"m": 0.35}, 64.0, "CosFace, Wang et al. 2018",
                   {"m": (0.0, 1.0, False, False)}),
        MarginSpec("arcface", _arcface, {"m": 0.5, "fallback": False}, 64.0, "ArcFace, Deng et al. 2019",
                   {"m": (0.0, math.pi, False, True)}),
        MarginSpec("combined", _combined, {"m1": 1.0, "m2": 0.5, "m3": 0.0}, 64.0, "insightface combined margin",
                   {"m1": (0.0, math.inf, True, True), "m2": (0.0, math.pi, False, True), "m3": (0.0, 1.0, False, False)}),
        MarginSpec("expface", _expface, {"m": 0.7}, 64.0, "ExpFace, Zheng & Gong 2025",
                   {"m": (0.0, 1.0, True, False)}),
    )
}
DYNAMIC_MARGINS = ("expface", "cosface", "arcface", "sphereface")


def _spec(name: str) -> MarginSpec:
    try:
        if not isinstance(name, str):
            raise KeyError(name)
        return MARGINS[name]
    except KeyError:
        from .registry import available_margins

        raise ValueError(
            f"unknown margin {name!r}; valid margins: {', '.join(available_margins())}"
        ) from None


def _resolve_params(spec: MarginSpec, params: dict) -> dict:
    unknown = set(params) - set(spec.defaults)
    if unknown:
        valid = ", ".join(spec.defaults) or "none"
        raise ValueError(
            f"margin {spec.name!r} got unknown parameter(s) {sorted(unknown)}; valid: {valid}"
        )
    out = {**spec.defaults, **params}
    owner = f"margin {spec.name!r}"
    for key, default in spec.defaults.items():
        if isinstance(default, bool):
            out[key] = check_flag(owner, key, out[key])
        elif key in spec.bounds:
            out[key] = check_range(owner, key, out[key], *spec.bounds[key])
        else:
            out[key] = check_range(owner, key, out[key])
    return out


def _check_grad(grad: str) -> str:
    if grad not in GRAD_MODES:
        raise ValueError(f"unknown grad mode {grad!r}; valid: {', '.join(GRAD_MODES)}")
    return grad


def target_logit(
    name: str, cos_theta: Tensor, grad: str = "detached", **params: float | bool
) -> Tensor:
    """The new target logit ``psi(theta)`` for ``cos_theta`` (any shape), in float32 (float64 in, float64 out)."""
    spec = _spec(name)
    return _apply_fn(spec.fn, _resolve_params(spec, params), cos_theta, _check_grad(grad))


def _apply_fn(fn: Callable[..., Tensor], params: dict, cos_theta: Tensor, grad: str) -> Tensor:
    with torch.autocast(device_type=cos_theta.device.type, enabled=False):
        cos = cos_theta.to(compute_dtype(cos_theta))
        with torch.no_grad():
            theta = torch.acos(cos.clamp(-1.0, 1.0))
            value = fn(theta, **params)
        if grad == "detached":
            # value psi(theta), gradient d/dcos = 1 (the reference implementations' backward)
            return cos + (value - cos).detach()
        # exact: psi'(theta) * d theta / d cos = psi'(theta) * (-1 / sin theta); theta is moved
        # off 0 and pi only where the dtype cannot tell it from them (cos = +-1 exactly), so the
        # gradient is exact at every representable angle and finite at cos = +-1.
        with torch.no_grad():
            eps = min_angle(cos.dtype)
            theta_c = theta.clamp(eps, math.pi - eps)
            dtheta_dcos = -1.0 / torch.sin(theta_c)
        linear = fn(theta_c + (cos - cos.detach()) * dtheta_dcos, **params)
        return linear + (value - linear).detach()


def _dynamic_m(name: str, p_mean: Tensor, n_mean: Tensor, b: float) -> Tensor:
    """The ExpFace authors' per-batch margin; clamped only where theirs is NaN or inf (see the
    module docstring)."""
    if name == "cosface":
        return p_mean - n_mean - b
    theta_p = torch.acos(p_mean.clamp(-1.0, 1.0))
    phi = torch.acos((n_mean + b).clamp(-1.0, 1.0))
    m = _m_from_angles(name, theta_p, phi)
    if not bool(torch.isfinite(m)):
        m = _m_from_angles(name, theta_p.clamp(THETA_EPS, math.pi - THETA_EPS), phi.clamp_min(THETA_EPS))
    return m


def _m_from_angles(name: str, theta_p: Tensor, phi: Tensor) -> Tensor:
    if name == "expface":
        return torch.log(phi / math.pi) / torch.log(theta_p / math.pi)
    if name == "arcface":
        return phi - theta_p
    return phi / theta_p  # sphereface


class Margin(BaseMargin):
    """A psi-margin from the registry, bound to its parameters, scale, gradient mode and dynamic mode.

    ``target_logit(cos)`` gives the new target logit; ``logits(cos, labels)`` applies it to the
    target column of a ``[B, C]`` cosine block (labels ``-1`` = no target in this block) and
    scales everything by ``s``; ``margin(MarginInput)`` is what heads call. No learnable
    parameters, no buffers.
    """

    def __init__(
        self, name: str = "expface", s: float | None = None, grad: str = "detached",
        dynamic: str | None = None, **params: float | bool,
    ) -> None:
        spec = _spec(name)
        super().__init__(spec.s if s is None else s)
        if dynamic is not None and dynamic not in DYNAMIC_MODES:
            raise ValueError(f"unknown dynamic mode {dynamic!r}; valid: {', '.join(DYNAMIC_MODES)} or None")
        if dynamic is not None and name not in DYNAMIC_MARGINS:
            raise ValueError(f"dynamic={dynamic!r} is defined for {', '.join(DYNAMIC_MARGINS)}, not {name!r}")
        self.name = name
        self.spec = spec
        self.params = _resolve_params(spec, params)
        self.grad = _check_grad(grad)
        self.dynamic = dynamic

    def target_logit(self, cos_theta: Tensor) -> Tensor:
        """New target logit (unscaled) for the target column's cosines (static ``m`` only)."""
        if self.dynamic is not None:
            raise ValueError(
                f"margin {self.name!r} with dynamic={self.dynamic!r}: m depends on the batch; "
                "use margin.logits(cos, labels) or margin(MarginInput)"
            )
        return _apply_fn(self.spec.fn, self.params, cos_theta, self.grad)

    def forward(self, inp: MarginInput) -> MarginOutput:
        with torch.autocast(device_type=inp.cos.device.type, enabled=False):
            cos = inp.cos.to(compute_dtype(inp.cos))
            params, logs = self.params, {}
            if self.dynamic is not None:
                m = self._batch_m(inp, cos)  # a collective: every rank, every step
                if m is not None:
                    params, logs = {**params, "m": m}, {"m": m}
            # Scale first (a fresh tensor), then add s * (psi - cos) to the target entries in
            # place: the backward over the [N, C] block stays the identity, no extra full copy.
            logits = cos * self.s
            rows, cols = inp.target_rows()
            if rows.numel() == 0:
                return MarginOutput(logits, logs=logs)
            if self.grad == "detached":
                with torch.no_grad():
                    target = cos[rows, cols]
                    delta = _apply_fn(self.spec.fn, params, target, "detached") - target
            else:
                target = cos[rows, cols]
                delta = _apply_fn(self.spec.fn, params, target, "exact") - target
            return MarginOutput(logits.index_put_((rows, cols), delta * self.s, accumulate=True), logs=logs)

    def _batch_m(self, inp: MarginInput, cos: Tensor) -> Tensor | None:
        """This step's ``m`` from the global means, or None when no row has a label."""
        with torch.no_grad():
            f64 = torch.float64
            rows, cols = inp.target_rows()
            valid = inp.valid.to(f64)
            partial = torch.stack([
                (cos.sum(dim=1, dtype=f64) * valid).sum(),  # every entry of the labelled rows
                valid.sum() * cos.shape[1],  # how many
                cos[rows, cols].sum(dtype=f64),  # the target entries in this block
                torch.tensor(float(rows.numel()), dtype=f64, device=cos.device),
            ])
            all_sum, all_count, target_sum, n = inp.sum_over_entries(partial).tolist()
            if n == 0:
                return None
            if inp.num_classes < 2 or all_count - n <= 0:
                raise ValueError(f"dynamic margin {self.name!r} needs at least 2 classes in the softmax")
            p_mean = torch.tensor(target_sum / n, dtype=f64)
            n_mean = torch.tensor((all_sum - target_sum) / (all_count - n), dtype=f64)
            b = math.log(inp.num_classes - 1) / self.s if self.dynamic == "balanced" else 0.0
            return _dynamic_m(self.name, p_mean, n_mean, b).to(device=cos.device, dtype=cos.dtype)

    def extra_repr(self) -> str:
        extra = f", grad={self.grad}" + (f", dynamic={self.dynamic}" if self.dynamic else "")
        return super().extra_repr().replace(f"s={self.s}", f"s={self.s}{extra}", 1)
