"""The computation every head shares: embeddings -> cosine block -> margin -> objective -> HeadOutput.

Three separate axes meet here: the *layout* (how the rows and the class centres of the global
``[N, C]`` cosine matrix are split across ranks, :class:`BlockLayout`, and how many sub-centres
each class has, :mod:`facemargin.heads.subcenters`), the *margin* (``facemargin.margins``) and the
*objective* (``facemargin.heads.objectives``). A head only decides its layout and which
rows/centres it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.autograd import Function

from ..margins import BaseMargin, MarginInput, MarginOutput, as_margin
from ..margins.base import check_int
from .base import HeadHooks, HeadOutput
from .objectives import build_objective
from .subcenters import subcentre_max

__all__ = ["BlockLayout", "CentreHead", "centre_cosine", "margin_block", "objective_output"]


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class BlockLayout:
    """Where this rank's block of the global cosine matrix sits (defaults: one process).

    ``reduce_columns`` / ``reduce_rows``: SUM over the ranks holding other column blocks of the
    same rows / other rows (see :class:`facemargin.margins.MarginInput`). ``sharded_columns``:
    the objective combines its softmax normaliser across ranks. ``replicas``: how many ranks
    compute the same rows' extra loss terms (their gradient is divided by it, so that it counts
    once when the all-gather's backward sums the ranks' gradients).
    """

    reduce_columns: Callable[[Tensor], Tensor] = _identity
    reduce_rows: Callable[[Tensor], Tensor] = _identity
    sharded_columns: bool = False
    replicas: int = 1


class _CentreCosine(Function):
    """``cos = x_n @ W.T / ||W||`` without materialising a normalised copy of ``W``.

    ``x_n`` is already L2-normalised. The backward writes ``dL/dW`` into a single ``[C, D]``
    buffer: ``A - (W.A) W / ||W||^2`` with ``A = (g / ||W||).T @ x_n``, row by row.
    """

    @staticmethod
    def forward(ctx: Any, x_n: Tensor, weight: Tensor) -> Tensor:
        w = weight.to(x_n.dtype)
        inv = torch.linalg.vector_norm(w, dim=1).clamp_min(1e-12).reciprocal_()
        cos = (x_n @ w.t()).mul_(inv)
        ctx.save_for_backward(x_n, weight, inv)
        return cos

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x_n, weight, inv = ctx.saved_tensors
        w = weight.to(x_n.dtype)
        gs = grad * inv  # [N, C]
        grad_x = gs @ w if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            a = gs.t() @ x_n  # [C, D]; becomes the gradient in place
            del gs
            dots = torch.bmm(w.unsqueeze(1), a.unsqueeze(2)).view(-1)
            a.addcmul_(w, (dots * inv * inv).unsqueeze(1), value=-1.0)
            grad_w = a.to(weight.dtype)
        return grad_x, grad_w


def centre_cosine(x_n: Tensor, weight: Tensor) -> Tensor:
    """``[N, C_local]`` cosines of L2-normalised rows ``x_n`` against the centres ``weight``."""
    return _CentreCosine.apply(x_n, weight)


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)


def margin_block(
    margin: BaseMargin, x: Tensor, weight: Tensor, labels: Tensor, valid: Tensor, num_classes: int,
    layout: BlockLayout = BlockLayout(), subcenters: int = 1,
) -> MarginOutput:
    """Normalise the rows ``x`` (keeping their norms, with gradient), take the cosines against
    ``weight`` (class-major, ``subcenters`` rows per class: max-pooled to one column per class)
    and apply ``margin``; float32 math (float64 when ``x`` or ``weight`` is), autocast off."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.to(_compute_dtype(x, weight))
        norms = torch.linalg.vector_norm(x, dim=1)
        x_n = x / norms.clamp_min(1e-12).unsqueeze(1)
        cos = subcentre_max(centre_cosine(x_n, weight), subcenters)
        inp = MarginInput(cos, labels, valid, norms, num_classes, layout.reduce_columns, layout.reduce_rows)
        return margin(inp)


def _gradient_scaled(t: Tensor, factor: float) -> Tensor:
    """``t`` in the forward pass, ``factor * dt`` in the backward pass."""
    return t.detach() + (t - t.detach()) * factor


def objective_output(
    objective: nn.Module, out: MarginOutput, labels: Tensor, valid: Tensor, layout: BlockLayout = BlockLayout(),
) -> HeadOutput:
    """The objective's loss plus the margin's extra terms, and everything worth logging."""
    with torch.autocast(device_type=out.logits.device.type, enabled=False):
        value = objective(out.logits, labels, valid, layout.sharded_columns)
        logs = {objective.log_name: value.detach()}
        extra_logs = getattr(objective, "logs", None)
        if callable(extra_logs):
            logs.update(extra_logs())
        loss = value
        for key, extra in out.extra_losses.items():
            loss = loss + (_gradient_scaled(extra, 1.0 / layout.replicas) if layout.replicas > 1 else extra)
            logs[key] = extra.detach()
        logs.update({key: v.detach() for key, v in out.logs.items()})
        return HeadOutput(loss, logs)


class CentreHead(HeadHooks, nn.Module):
    """What the class-centre heads share: sizes, the margin (a name built with ``s``, ``grad`` and
    ``margin_params``, or a ready margin module), ``subcenters`` (K centres per class), the
    objective (a name built with ``objective_params``, or a ready module; ``sample_rate`` sets
    UniFace's bias init), ``loss = output(...).loss``."""

    def __init__(
        self, embedding_size: int, num_classes: int, margin: str | BaseMargin, s: float | None,
        grad: str | None, margin_params: dict[str, Any], subcenters: int = 1,
        objective: str | nn.Module = "softmax", objective_params: dict[str, Any] | None = None,
        sample_rate: float = 1.0,
    ) -> None:
        nn.Module.__init__(self)
        owner = type(self).__name__
        self.embedding_size = check_int(owner, "embedding_size", embedding_size)
        self.num_classes = check_int(owner, "num_classes", num_classes)
        self.subcenters = check_int(owner, "subcenters", subcenters)
        self.margin = as_margin(margin, s=s, grad=grad, **margin_params)
        self.objective = build_objective(objective, num_classes, sample_rate, self.margin.s, objective_params)

    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over the labelled rows (+ the margin's extra terms)."""
        return self.output(embeddings, labels).loss
