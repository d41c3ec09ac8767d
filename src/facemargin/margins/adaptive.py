"""Margins that need more than the target angle: CurricularFace, AdaFace, MagFace, SphereFace-R.

Each follows its authors' code (read for the formulas, not copied); where that code and the
paper differ, the code wins and the class docstring says so. Running statistics are float32
buffers (float64 after ``.double()``, never lower: see :mod:`facemargin.margins.base`), updated in
training mode only, from the reduced batch values of :class:`MarginInput` (so they are identical
on every rank), over the labelled rows only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import (
    BaseMargin,
    MarginInput,
    MarginOutput,
    check_flag,
    check_range,
    compute_dtype,
    cos_theta_plus,
)

__all__ = ["AdaFace", "CurricularFace", "MagFace", "SphereFaceR"]


def _ema_(buffer: Tensor, value: float, weight: float) -> None:
    """``buffer <- weight * value + (1 - weight) * buffer``, in place, computed in float64 and
    rounded once to the buffer's dtype."""
    buffer.copy_(weight * value + (1.0 - weight) * buffer.to(torch.float64))


class _HardNegatives(torch.autograd.Function):
    """``s * c * (t + c)`` where ``c > threshold`` (per row), ``s * c`` elsewhere, with the exact
    gradient ``s * (t + 2c)`` / ``s``. Saves only ``c``; one full-size temporary each way."""

    @staticmethod
    def forward(ctx, cos: Tensor, threshold: Tensor, t: float, scale: float) -> Tensor:  # type: ignore[override]
        factor = torch.add(cos, t).masked_fill_(cos <= threshold.unsqueeze(1), 1.0)
        ctx.save_for_backward(cos, threshold)
        ctx.t, ctx.scale = t, scale
        return factor.mul_(cos).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        cos, threshold = ctx.saved_tensors
        slope = torch.add(cos, cos, alpha=1.0).add_(ctx.t).masked_fill_(cos <= threshold.unsqueeze(1), 1.0)
        return slope.mul_(grad).mul_(ctx.scale), None, None, None


class CurricularFace(BaseMargin):
    """CurricularFace (Huang et al., CVPR 2020), following ``head/metrics.py`` of HuangYG123/CurricularFace.

    Target: ``cos(theta + m)``, or ``cos(theta) - m sin(m)`` where ``cos(theta) <= cos(pi - m)``
    (ArcFace's fallback), with the exact gradient. ``t`` (a buffer, initially 0) is an EMA of the
    mean target cosine over the labelled rows, updated *before* it is used:
    ``t <- momentum * mean + (1 - momentum) * t``. A non-target cosine ``c`` of row ``i`` is a
    hard negative when ``c > cos(theta_i + m)`` (the plain ``cos(theta + m)``, without the
    fallback, as in the code) and becomes ``c * (t + c)``; the gradient flows through both
    factors (``t`` is a constant). Logged: ``"t"``.
    """

    name = "curricularface"

    def __init__(self, m: float = 0.5, s: float = 64.0, momentum: float = 0.01) -> None:
        super().__init__(s)
        self.m = check_range("curricularface", "m", m, 0.0, math.pi, high_open=True)
        self.momentum = check_range("curricularface", "momentum", momentum, 0.0, 1.0, low_open=True)
        self.params = {"m": self.m, "momentum": self.momentum}
        self.register_buffer("t", torch.zeros((), dtype=torch.float32))

    def forward(self, inp: MarginInput) -> MarginOutput:
        with torch.autocast(device_type=inp.cos.device.type, enabled=False):
            cos = inp.cos.to(compute_dtype(inp.cos))
            target_all = inp.target_cos().to(cos.dtype)  # collective under Partial FC
            if self.training:
                with torch.no_grad():
                    valid = inp.valid.to(torch.float64)
                    partial = torch.stack([(target_all.to(torch.float64) * valid).sum(), valid.sum()])
                    total, n = inp.sum_over_rows(partial).tolist()
                    if n > 0:
                        _ema_(self.t, total / n, self.momentum)
            t = self.t.to(cos.dtype)
            with torch.no_grad():  # cos(theta_i + m) per row; rows without a label get no hard negatives
                threshold = cos_theta_plus(target_all, self.m)
                threshold = torch.where(inp.valid, threshold, torch.full_like(threshold, math.inf))
            logits = _HardNegatives.apply(cos, threshold, float(t), self.s)
            rows, cols = inp.target_rows()
            target = cos[rows, cols]
            psi = torch.where(
                target > math.cos(math.pi - self.m),
                cos_theta_plus(target, self.m),
                target - self.m * math.sin(self.m),
            )
            logits.index_put_((rows, cols), psi * self.s)
            return MarginOutput(logits, logs={"t": self.t.detach().clone()})


class _ClampScaled(torch.autograd.Function):
    """``s * clamp(c, low, high)`` with ``clamp``'s gradient (0 at and beyond the bounds), one
    full-size temporary each way."""

    @staticmethod
    def forward(ctx, cos: Tensor, low: float, high: float, scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(cos)
        ctx.low, ctx.high, ctx.scale = low, high, scale
        return cos.clamp(low, high).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (cos,) = ctx.saved_tensors
        outside = (cos <= ctx.low).logical_or_(cos >= ctx.high)
        return (grad * ctx.scale).masked_fill_(outside, 0.0), None, None, None


class AdaFace(BaseMargin):
    """AdaFace (Kim et al., CVPR 2022), following ``head.py`` of mk-minchul/AdaFace.

    The cosines are clamped to ``[-1 + eps, 1 - eps]`` (``eps = 1e-3``; also the non-target
    logits, whose gradient is 0 outside). Norms ``a`` are detached and clipped to ``[0.001, 100]``;
    ``batch_mean`` / ``batch_std`` (buffers, 20 / 100 initially) are EMAs with weight ``t_alpha``
    of the mean and the unbiased std of ``a`` over the labelled rows, updated before use (the std
    needs two labelled rows: with fewer it is left as is, where the code would store NaN).
    ``r = clip(h (a - batch_mean) / (batch_std + eps), -1, 1)``; target logit
    ``cos(clip(theta - m r, eps, pi - eps)) - (m + m r)``, gradient exact. Logged:
    ``"batch_mean"``, ``"batch_std"``.
    """

    name = "adaface"
    needs_norms = True
    eps = 1e-3

    def __init__(self, m: float = 0.4, h: float = 0.333, s: float = 64.0, t_alpha: float = 0.01) -> None:
        super().__init__(s)
        self.m = check_range("adaface", "m", m, 0.0, math.pi / 2)
        self.h = check_range("adaface", "h", h, 0.0, low_open=True)
        self.t_alpha = check_range("adaface", "t_alpha", t_alpha, 0.0, 1.0, low_open=True)
        self.params = {"m": self.m, "h": self.h, "t_alpha": self.t_alpha}
        self.register_buffer("batch_mean", torch.full((), 20.0, dtype=torch.float32))
        self.register_buffer("batch_std", torch.full((), 100.0, dtype=torch.float32))

    def forward(self, inp: MarginInput) -> MarginOutput:
        if inp.norms is None:
            raise ValueError("adaface needs MarginInput.norms (the raw embedding norms)")
        with torch.autocast(device_type=inp.cos.device.type, enabled=False):
            cos = inp.cos.to(compute_dtype(inp.cos))
            norms = inp.norms.detach().to(cos.dtype).clip(0.001, 100.0)
            if self.training:
                self._update_statistics(inp, norms)
            mean, std = self.batch_mean.to(cos.dtype), self.batch_std.to(cos.dtype)
            scaler = (self.h * (norms - mean) / (std + self.eps)).clip(-1.0, 1.0)
            logits = _ClampScaled.apply(cos, -1.0 + self.eps, 1.0 - self.eps, self.s)
            rows, cols = inp.target_rows()
            r = scaler[rows]
            theta = torch.acos(cos[rows, cols].clamp(-1.0 + self.eps, 1.0 - self.eps))
            psi = torch.cos((theta - self.m * r).clip(self.eps, math.pi - self.eps)) - (self.m + self.m * r)
            logits.index_put_((rows, cols), psi * self.s)
            logs = {"batch_mean": self.batch_mean.detach().clone(), "batch_std": self.batch_std.detach().clone()}
            return MarginOutput(logits, logs=logs)

    @torch.no_grad()
    def _update_statistics(self, inp: MarginInput, norms: Tensor) -> None:
        f64 = torch.float64
        valid = inp.valid.to(f64)
        a = norms.to(f64)
        total, n = inp.sum_over_rows(torch.stack([(a * valid).sum(), valid.sum()])).tolist()
        mean = total / max(n, 1.0)
        squares = float(inp.sum_over_rows((((a - mean) ** 2) * valid).sum()))
        if n >= 1:
            _ema_(self.batch_mean, mean, self.t_alpha)
        if n >= 2:
            _ema_(self.batch_std, math.sqrt(squares / (n - 1)), self.t_alpha)


class MagFace(BaseMargin):
    """MagFace (Meng et al., CVPR 2021), following ``models/magface.py`` and ``run/trainer.py`` of
    IrvingMeng/MagFace.

    ``a = clamp(||x||, l_a, u_a)`` keeps its gradient; ``m(a) = (u_m - l_m) / (u_a - l_a) (a - l_a) + l_m``;
    target logit ``cos(theta + m(a))`` with the exact gradient in ``cos`` and in ``a``. The paper
    writes ``cos(theta + m(a))`` everywhere; the code's ``MagLinear`` defaults to ``easy_margin=True``
    (the margin only where ``cos(theta) > 0``, else ``cos(theta)``), which we follow
    (``easy_margin=False``: ArcFace's fallback ``cos(theta) - m sin(m)`` where ``cos(theta) <= cos(pi - m)``).
    Regulariser ``g(a) = a / u_a^2 + 1 / a``, mean over the labelled rows, times ``lambda_g``,
    returned as the extra loss ``"magface_g"``. ``lambda_g = 35`` is ``run/run.sh``'s setting (the
    argparse default of ``trainer.py`` and the ExpFace authors' ``MagLinear`` use 20).
    """

    name = "magface"
    needs_norms = True

    def __init__(
        self, s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8,
        lambda_g: float = 35.0, easy_margin: bool = True,
    ) -> None:
        super().__init__(s)
        self.l_a = check_range("magface", "l_a", l_a, 0.0, low_open=True)
        self.u_a = check_range("magface", "u_a", u_a, self.l_a, low_open=True)
        self.l_m = check_range("magface", "l_m", l_m, 0.0, math.pi / 2)
        self.u_m = check_range("magface", "u_m", u_m, self.l_m, math.pi / 2)
        self.lambda_g = check_range("magface", "lambda_g", lambda_g, 0.0)
        self.easy_margin = check_flag("magface", "easy_margin", easy_margin)
        self.params = {"l_a": self.l_a, "u_a": self.u_a, "l_m": self.l_m, "u_m": self.u_m,
                       "lambda_g": self.lambda_g, "easy_margin": self.easy_margin}

    def forward(self, inp: MarginInput) -> MarginOutput:
        if inp.norms is None:
            raise ValueError("magface needs MarginInput.norms (the raw embedding norms, with gradient)")
        with torch.autocast(device_type=inp.cos.device.type, enabled=False):
            cos = inp.cos.to(compute_dtype(inp.cos))
            a = inp.norms.to(cos.dtype).clamp(self.l_a, self.u_a)
            margin = (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m
            logits = cos * self.s
            rows, cols = inp.target_rows()
            target, m = cos[rows, cols], margin[rows]
            arc = cos_theta_plus(target, m)
            if self.easy_margin:
                psi = torch.where(target > 0, arc, target)
            else:
                psi = torch.where(target > torch.cos(math.pi - m), arc, target - m * torch.sin(m))
            logits.index_put_((rows, cols), psi * self.s)
            valid = inp.valid.to(cos.dtype)
            g = ((a / self.u_a**2 + 1.0 / a) * valid).sum() / valid.sum().clamp_min(1.0)
            return MarginOutput(logits, extra_losses={"magface_g": self.lambda_g * g})


class _ScaledDetached(torch.autograd.Function):
    """Forward: ``values`` (computed without autograd); backward: ``d/dcos = scale``."""

    @staticmethod
    def forward(ctx, cos: Tensor, values: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return values

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return grad * ctx.scale, None, None


class SphereFaceR(BaseMargin):
    """SphereFace-R v2 (Liu et al., TPAMI 2023; ``magn_type='v2'`` of ydwen/opensphere's
    ``model/head/spherefacer.py``), in the form the ExpFace authors compare (their ``SphereFaceRv2``,
    s = 60, m = 1.4): target logit ``cos(theta)`` unchanged, every non-target ``cos(theta / m)``,
    replaced without autograd (the backward sees d(logit)/d(cos) = 1). Differences from opensphere,
    following the ExpFace authors: no ``lw / s`` loss weight, ``acos`` of ``cos`` clamped to
    ``[-1, 1]`` (opensphere: ``[-1 + 1e-5, 1 - 1e-5]``). Rows with label -1 have only non-targets.
    """

    name = "sphereface_r"

    def __init__(self, m: float = 1.4, s: float = 60.0) -> None:
        super().__init__(s)
        self.m = check_range("sphereface_r", "m", m, 1.0)
        self.params = {"m": self.m}

    def forward(self, inp: MarginInput) -> MarginOutput:
        with torch.autocast(device_type=inp.cos.device.type, enabled=False):
            cos = inp.cos.to(compute_dtype(inp.cos))
            rows, cols = inp.target_rows()
            with torch.no_grad():
                values = torch.acos(cos.clamp(-1.0, 1.0)).mul_(1.0 / self.m).cos_()
                values[rows, cols] = cos[rows, cols]
                values.mul_(self.s)
            return MarginOutput(_ScaledDetached.apply(cos, values, self.s))
