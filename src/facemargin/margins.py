"""Margin functions: the target column's ``cos(theta)`` -> the new (unscaled) target logit.

Every loss in the margin-softmax family differs only in what it does to the target logit. Each
is a pure function of the angle ``theta`` here, collected in a registry with its paper defaults:

========== =============================================== ===================== =====
name       target logit psi(theta)                          defaults              s
========== =============================================== ===================== =====
softmax    ``cos(theta)`` (NormFace, no margin)             -                     30
sphereface ``(-1)^k cos(m*theta) - 2k``, k=floor(m*theta/pi) m=1.5               30
cosface    ``cos(theta) - m``                               m=0.35                64
arcface    ``cos(theta + m)``                               m=0.5, fallback=False 64
combined   ``cos(m1*theta + m2) - m3``                      m1=1, m2=0.5, m3=0    64
expface    ``cos(pi * (theta/pi)**m)``                      m=0.7                 64
========== =============================================== ===================== =====

The margin math always runs in float32 (also under bf16/fp16 autocast) and clamps before
``acos``. Two gradient modes:

- ``"detached"`` (default): the target logit is replaced without autograd, so the backward sees
  d(logit)/d(cos) = 1, exactly as insightface and the ExpFace authors' code do.
- ``"exact"``: the true derivative of ``psi(acos(cos))``, kept finite at cos = +-1 by evaluating
  it at ``theta`` clamped to ``[eps, pi - eps]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "MARGINS",
    "GRAD_MODES",
    "Margin",
    "MarginSpec",
    "as_margin",
    "available_margins",
    "build_margin",
    "target_logit",
]

GRAD_MODES = ("detached", "exact")

# theta is clamped to [THETA_EPS, pi - THETA_EPS] before psi is evaluated in "exact" mode, which
# bounds d acos / d cos = -1/sin(theta) by 1/sin(THETA_EPS) ~ 1e3 and keeps ExpFace's theta**(m-1)
# finite at theta -> 0.
THETA_EPS = 1e-3


def _softmax(theta: Tensor) -> Tensor:
    return torch.cos(theta)


def _sphereface(theta: Tensor, m: float) -> Tensor:
    m_theta = m * theta
    k = torch.floor(m_theta / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k
    return sign * torch.cos(m_theta) - 2.0 * k


def _cosface(theta: Tensor, m: float) -> Tensor:
    return torch.cos(theta) - m


def _arcface(theta: Tensor, m: float, fallback: bool = False) -> Tensor:
    out = torch.cos(theta + m)
    if fallback:
        # The original ArcFace code: past theta + m > pi the curve turns back up, so use the
        # CosFace-like cos(theta) - m*sin(m) there instead (insightface's `sinmm`).
        out = torch.where(theta + m > math.pi, torch.cos(theta) - m * math.sin(m), out)
    return out


def _combined(theta: Tensor, m1: float, m2: float, m3: float) -> Tensor:
    return torch.cos(m1 * theta + m2) - m3


def _expface(theta: Tensor, m: float) -> Tensor:
    return torch.cos(math.pi * torch.pow(theta / math.pi, m))


@dataclass(frozen=True)
class MarginSpec:
    """One registered margin: ``fn(theta, **params)`` with its paper defaults."""

    name: str
    fn: Callable[..., Tensor]
    defaults: dict[str, float | bool] = field(default_factory=dict)
    s: float = 64.0
    paper: str = ""


MARGINS: dict[str, MarginSpec] = {
    spec.name: spec
    for spec in (
        MarginSpec("softmax", _softmax, {}, 30.0, "NormFace, Wang et al. 2017"),
        MarginSpec("sphereface", _sphereface, {"m": 1.5}, 30.0, "SphereFace-Revived, Liu et al. 2022"),
        MarginSpec("cosface", _cosface, {"m": 0.35}, 64.0, "CosFace, Wang et al. 2018"),
        MarginSpec("arcface", _arcface, {"m": 0.5, "fallback": False}, 64.0, "ArcFace, Deng et al. 2019"),
        MarginSpec("combined", _combined, {"m1": 1.0, "m2": 0.5, "m3": 0.0}, 64.0, "insightface combined margin"),
        MarginSpec("expface", _expface, {"m": 0.7}, 64.0, "ExpFace, Zheng & Gong 2025"),
    )
}


def available_margins() -> list[str]:
    """Names accepted by :class:`Margin` and :func:`build_margin`."""
    return list(MARGINS)


def _spec(name: str) -> MarginSpec:
    try:
        return MARGINS[name]
    except KeyError:
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
    return {**spec.defaults, **params}


def target_logit(
    name: str, cos_theta: Tensor, grad: str = "detached", **params: float | bool
) -> Tensor:
    """The new target logit ``psi(theta)`` for ``cos_theta`` (any shape), computed in float32."""
    spec = _spec(name)
    return _apply_fn(spec.fn, _resolve_params(spec, params), cos_theta, grad)


def _apply_fn(fn: Callable[..., Tensor], params: dict, cos_theta: Tensor, grad: str) -> Tensor:
    if grad not in GRAD_MODES:
        raise ValueError(f"unknown grad mode {grad!r}; valid: {', '.join(GRAD_MODES)}")
    with torch.autocast(device_type=cos_theta.device.type, enabled=False):
        cos = cos_theta.float()
        if grad == "detached":
            with torch.no_grad():
                theta = torch.acos(cos.clamp(-1.0, 1.0))
                new = fn(theta, **params)
            # value psi(theta), gradient d/dcos = 1 (the reference implementations' backward)
            return cos + (new - cos).detach()
        # exact: the value is psi(theta) itself; the derivative is taken at theta clamped to
        # [eps, pi - eps] (d theta/d cos = -1/sin theta there), so at cos = +-1 it is large but
        # finite, never 0 or NaN.
        with torch.no_grad():
            theta = torch.acos(cos.clamp(-1.0, 1.0))
            value = fn(theta, **params)
            theta_c = theta.clamp(THETA_EPS, math.pi - THETA_EPS)
            dtheta_dcos = -1.0 / torch.sin(theta_c)
        linear = fn(theta_c + (cos - cos.detach()) * dtheta_dcos, **params)
        return linear + (value - linear).detach()


class Margin(nn.Module):
    """A margin from the registry, bound to its parameters, scale and gradient mode.

    ``target_logit(cos)`` gives the new target logit; ``logits(cos, labels)`` applies it to the
    target column of a ``[B, C]`` cosine block (labels ``-1`` = no target in this block) and
    scales everything by ``s``. It holds no learnable parameters.
    """

    def __init__(
        self, name: str = "expface", s: float | None = None, grad: str = "detached", **params: float | bool
    ) -> None:
        super().__init__()
        spec = _spec(name)
        if grad not in GRAD_MODES:
            raise ValueError(f"unknown grad mode {grad!r}; valid: {', '.join(GRAD_MODES)}")
        self.name = name
        self.spec = spec
        self.params = _resolve_params(spec, params)
        self.s = float(spec.s if s is None else s)
        self.grad = grad

    def target_logit(self, cos_theta: Tensor) -> Tensor:
        """New target logit (unscaled, float32) for the target column's cosines."""
        return _apply_fn(self.spec.fn, self.params, cos_theta, self.grad)

    def logits(self, cos: Tensor, labels: Tensor) -> Tensor:
        """Scaled float32 logits: margin on ``cos[i, labels[i]]`` where ``labels[i] >= 0``."""
        if cos.dim() != 2 or labels.dim() != 1 or labels.shape[0] != cos.shape[0]:
            raise ValueError(
                f"expected cos [B, C] and labels [B]; got {tuple(cos.shape)} and {tuple(labels.shape)}"
            )
        with torch.autocast(device_type=cos.device.type, enabled=False):
            # Scale first (a fresh tensor), then add s * (psi - cos) to the target entries in place:
            # the backward over the [B, C] block stays the identity, with no extra full-size copy.
            logits = cos.float() * self.s
            rows = torch.nonzero(labels >= 0, as_tuple=True)[0]
            if rows.numel() == 0:
                return logits
            cols = labels[rows].long()
            if self.grad == "detached":
                with torch.no_grad():
                    target = cos[rows, cols].float()
                    delta = self.target_logit(target) - target
            else:
                target = cos[rows, cols].float()
                delta = self.target_logit(target) - target
            return logits.index_put_((rows, cols), delta * self.s, accumulate=True)

    def forward(self, cos: Tensor, labels: Tensor) -> Tensor:
        return self.logits(cos, labels)

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}, s={self.s}, grad={self.grad}" + (f", {params}" if params else "")


def as_margin(
    margin: "str | Margin", s: float | None = None, grad: str = "detached", **params: float | bool
) -> "Margin":
    """A head's ``margin`` argument -> :class:`Margin`: a name is built with ``s``, ``grad`` and the
    parameters; a ready Margin is used as is (then ``s`` and parameters must not be given)."""
    if isinstance(margin, Margin):
        if s is not None or params:
            raise ValueError("pass s and margin parameters to Margin(...), not to the head, when margin is a Margin")
        return margin
    return Margin(margin, s=s, grad=grad, **params)


def build_margin(name: str = "expface", **kwargs: float | bool | str | None) -> Margin:
    """Build a :class:`Margin` by name; an unknown name raises ``ValueError`` listing valid ones."""
    return Margin(name, **kwargs)  # type: ignore[arg-type]
