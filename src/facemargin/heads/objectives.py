"""Objectives: the margin's scaled logits -> a loss. An axis of the head, separate from the margin.

An objective is an ``nn.Module`` with ``forward(logits [N, C_local], labels [N] (target column in
this block or -1), valid [N] (the row has a label in some block), sharded) -> scalar`` and a
``log_name`` (its value is logged as ``train/<log_name>``); ``logs()`` may add detached scalars.
With ``sharded=True`` every rank of the default process group holds another column block of the
same rows and gets the same value. A batch without any labelled row gives 0 with zero gradient.

- :class:`SoftmaxCrossEntropy` (``"softmax"``): the margin-softmax family's mean cross-entropy over
  the labelled rows; sharded, the softmax normaliser is combined with an all-reduce of the row
  maxima and of the sums of exponentials.
- :class:`UniFace` (``"uniface"``): UniFace's unified cross-entropy, one sigmoid per class; each
  rank sums its own columns, the learnable bias ``b`` gets the exact gradient on every rank.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import Function

from ..margins.base import check_int, check_range

__all__ = ["OBJECTIVES", "SoftmaxCrossEntropy", "UniFace", "build_objective"]


class _SoftmaxCrossEntropy(Function):
    """Saves only the probabilities; the float32 backward turns them into the gradient in place
    (one backward per forward). float64 (the precision of gradcheck) keeps them: reentrant."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor, valid: Tensor, sharded: bool) -> Tensor:
        n = logits.shape[0]
        if logits.shape[1] > 0:
            row_max = logits.max(dim=1).values
        else:
            row_max = logits.new_full((n,), -math.inf)
        if sharded:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        probs = (logits - row_max.unsqueeze(1)).exp_()
        sum_exp = probs.sum(dim=1)
        rows = torch.nonzero(labels >= 0, as_tuple=True)[0]
        cols = labels[rows]
        target = logits.new_zeros(n)
        target[rows] = logits[rows, cols]
        if sharded:
            packed = torch.stack([sum_exp, target])  # one all-reduce for both
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            sum_exp, target = packed[0], packed[1]
        probs.div_(sum_exp.unsqueeze(1))
        per_row = torch.where(valid, sum_exp.log() + row_max - target, torch.zeros_like(target))
        count = valid.sum().clamp_min(1).to(logits.dtype)
        invalid = torch.nonzero(~valid, as_tuple=True)[0]
        ctx.save_for_backward(probs, rows, cols, invalid, count)
        ctx.in_place, ctx.used = logits.dtype != torch.float64, False
        return per_row.sum() / count

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        if ctx.used:
            raise RuntimeError("the softmax cross-entropy supports a single backward (no retain_graph reuse)")
        ctx.used = ctx.in_place
        probs, rows, cols, invalid, count = ctx.saved_tensors
        coef = grad / count
        g = probs.mul_(coef) if ctx.in_place else probs * coef
        g.index_put_((rows, cols), (-coef).expand(rows.shape[0]), accumulate=True)
        if invalid.numel():
            g.index_fill_(0, invalid, 0.0)
        return g, None, None, None


class SoftmaxCrossEntropy(nn.Module):
    """Mean cross-entropy over the labelled rows of a (possibly column-sharded) logit block
    (see the module docstring for the arguments of ``forward``)."""

    name = "softmax"
    log_name = "ce"  # logged as train/ce

    def forward(self, logits: Tensor, labels: Tensor, valid: Tensor, sharded: bool = False) -> Tensor:
        return _SoftmaxCrossEntropy.apply(logits, labels, valid, sharded)


class _UnifiedCrossEntropy(Function):
    """Saves only the gradient coefficients ``dL/dlogit`` (one ``[N, C_local]`` buffer), computed
    in the forward pass; ``dL/db = -sum(dL/dlogit)``, summed over the ranks when sharded."""

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, bias: Tensor, labels: Tensor, valid: Tensor, sharded: bool, s: float, lam: float,
    ) -> Tensor:
        z = logits - bias.to(logits.dtype)
        inside = z.abs() <= s  # the clamp's gradient: 1 inside [-s, s] (both ends), 0 outside
        z.clamp_(-s, s)
        rows = torch.nonzero(labels >= 0, as_tuple=True)[0]
        cols = labels[rows]
        z_pos = z[rows, cols]
        zero = z.new_zeros(())
        neg = torch.logaddexp(z, zero).sum(dim=1)  # softplus, every column as a negative ...
        total = lam * (neg[valid].sum() - torch.logaddexp(z_pos, zero).sum()) + torch.logaddexp(-z_pos, zero).sum()
        if sharded:  # ... the target column replaced by its positive term; then every rank's columns
            total = total.detach().clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        count = valid.sum().clamp_min(1).to(logits.dtype)
        coef = z.sigmoid_().mul_(lam)  # d/dz of lam * softplus(z)
        coef[rows, cols] = z_pos.sigmoid() - 1.0  # d/dz of softplus(-z)
        coef.mul_(inside)
        coef[~valid] = 0.0
        coef.div_(count)
        ctx.save_for_backward(coef)
        ctx.sharded, ctx.bias_dtype = sharded, bias.dtype
        ctx.in_place, ctx.used = logits.dtype != torch.float64, False
        return total / count

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None, None, None, None]:
        if ctx.used:
            raise RuntimeError("the unified cross-entropy supports a single backward (no retain_graph reuse)")
        ctx.used = ctx.in_place
        (coef,) = ctx.saved_tensors
        grad_bias = -coef.sum()
        if ctx.sharded:
            dist.all_reduce(grad_bias, op=dist.ReduceOp.SUM)
        g = coef.mul_(grad) if ctx.in_place else coef * grad
        return g, (grad_bias * grad).to(ctx.bias_dtype), None, None, None, None, None


class UniFace(nn.Module):
    """UniFace's unified cross-entropy (Zhou et al., "UniFace: Unified Cross-Entropy Loss for Deep
    Face Recognition", ICCV 2023; code: github.com/CVI-SZU/UniFace ``head.py``).

    With ``z = logit - b`` (the margin's scaled logits: ``s * psi`` for the target, ``s * cos``
    elsewhere) and one learnable scalar ``b``::

        L = mean over labelled rows of [ log(1 + exp(-clip(z_y))) + lam * sum_{j != y} log(1 + exp(clip(z_j))) ]

    summed over every (sampled) class, ``clip`` to ``[-s, s]``, ``b`` initialised to
    ``log(10 * C * r)`` with ``r`` the fraction of classes sampled per step (``head.sample_rate``).

    Where the code differs from the paper, this follows the code (the authors' ``head.py`` and the
    ExpFace authors' ``Unified_Cross_Entropy_Loss_ExpFace``, the same loss): the arguments
    ``s*psi - b`` and ``s*cos - b`` are clamped to ``[-s, s]`` before the softplus (no gradient
    outside), the per-row sum runs over all sampled classes and the rows are averaged
    (``loss.sum(dim=1).mean()``), ``lam = 1`` (both codes' default ``l=1.0``). The ExpFace authors
    train ``expface_uniface`` with ``r = 1`` (``b = log(10 C)``) and m = 0.69.

    Under Partial FC every rank sums its own columns and the total is all-reduced; ``b`` stays one
    scalar identical on every rank with the exact single-process gradient (the backward sums its
    gradient over the ranks; DDP's averaging of that identical value leaves it unchanged).
    """

    name = "uniface"
    log_name = "uce"  # logged as train/uce; b as train/uniface_b

    def __init__(self, num_classes: int, sample_rate: float = 1.0, s: float = 64.0, lam: float = 1.0) -> None:
        super().__init__()
        num_classes = check_int("UniFace", "num_classes", num_classes)
        sample_rate = check_range("UniFace", "sample_rate", sample_rate, 0.0, 1.0, low_open=True)
        self.s = check_range("UniFace", "s", s, 0.0, low_open=True)
        self.lam = check_range("UniFace", "lam", lam, 0.0, low_open=True)
        self.bias = nn.Parameter(torch.tensor(math.log(10.0 * num_classes * sample_rate)))

    def forward(self, logits: Tensor, labels: Tensor, valid: Tensor, sharded: bool = False) -> Tensor:
        return _UnifiedCrossEntropy.apply(logits, self.bias, labels, valid, sharded, self.s, self.lam)

    def logs(self) -> dict[str, Tensor]:
        """The bias, logged as ``train/uniface_b``."""
        return {"uniface_b": self.bias.detach().clone()}

    def extra_repr(self) -> str:
        return f"s={self.s}, lam={self.lam}, b={float(self.bias):.4f}"


#: name -> objective class (``head.objective=<name>``)
OBJECTIVES: dict[str, type[nn.Module]] = {"softmax": SoftmaxCrossEntropy, "uniface": UniFace}


def build_objective(
    objective: str | nn.Module, num_classes: int, sample_rate: float, s: float, params: dict[str, Any] | None = None,
) -> nn.Module:
    """A head's ``objective`` argument -> an objective module. A name is built with what the
    head knows (``num_classes``, ``sample_rate``, the margin's ``s``) and ``params`` (UniFace:
    ``lam``); a ready module is used as is (then ``params`` must be empty)."""
    params = dict(params or {})
    if isinstance(objective, nn.Module):
        if params:
            raise ValueError(f"objective is a ready {type(objective).__name__}: pass {sorted(params)} to it, not to the head")
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if objective == "softmax":
        if params:
            raise ValueError(f"objective 'softmax' takes no parameters; got {sorted(params)}")
        return SoftmaxCrossEntropy()
    try:
        return UniFace(num_classes, sample_rate=sample_rate, s=s, **params)
    except TypeError as err:
        raise ValueError(f"objective {objective!r}: {err}") from None
