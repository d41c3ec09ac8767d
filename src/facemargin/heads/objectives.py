"""Objectives: the margin's scaled logits -> a loss. An axis of the head, separate from the margin.

:class:`SoftmaxCrossEntropy` is the margin-softmax family's objective: the mean cross-entropy
over the labelled rows. When the class columns are sharded across ranks (Partial FC) the softmax
normaliser is combined with an all-reduce of the row maxima and of the sums of exponentials; on
one process it is the plain cross-entropy. A batch without any labelled row gives 0 with zero
gradient (not NaN).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import Function

__all__ = ["SoftmaxCrossEntropy"]


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
    """Mean cross-entropy over the labelled rows of a (possibly column-sharded) logit block.

    ``forward(logits [N, C_local], labels [N] (target column in this block or -1), valid [N]
    (the row has a label in some block), sharded)``: with ``sharded=True`` every rank of the
    default process group holds another column block of the same rows and gets the same value.
    """

    name = "softmax"
    log_name = "ce"  # logged as train/ce

    def forward(self, logits: Tensor, labels: Tensor, valid: Tensor, sharded: bool = False) -> Tensor:
        return _SoftmaxCrossEntropy.apply(logits, labels, valid, sharded)
