"""MarginHead: class centres + a margin + an objective, as a plain ``torch.nn.Module``.

Drop it into any PyTorch or Lightning project::

    head = MarginHead(embedding_size=512, num_classes=10_000, margin="expface")  # m=0.7, s=64
    loss = head.loss(backbone(images), labels)

``subcenters=3`` gives Sub-center ArcFace's K centres per class (with any margin);
``objective="uniface"`` UniFace's unified cross-entropy instead of the softmax.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distributed import all_reduce_sum, world_and_rank
from ..margins import BaseMargin, MarginOutput, check_labels
from .base import HeadOutput, check_embeddings
from .core import BlockLayout, CentreHead, centre_cosine, margin_block, objective_output
from .subcenters import subcentre_max

__all__ = ["MarginHead"]


class MarginHead(CentreHead):
    """Class centres ``W[C * K, D]`` (K = ``subcenters``, class-major), a margin and an objective.

    ``forward(embeddings, labels)`` returns the margin's scaled logits ``[B, C]`` (float32;
    float64 for float64 input; the cosine to a class is the largest over its K sub-centres),
    labels ``-1`` meaning "no target in this row"; with ``labels=None`` the scaled cosines
    ``s * cos`` (inference, no margin). ``loss`` is the objective over the labelled rows (mean
    cross-entropy by default; ``objective="uniface"``: UniFace's unified cross-entropy) plus the
    margin's extra terms (0 with zero gradient when no row is labelled); ``output`` also returns
    what to log. In training mode ``forward``, ``loss`` and ``output`` update the margin's
    running statistics (CurricularFace, AdaFace).

    ``margin`` is a name (built with ``s``, ``grad`` and ``margin_params``) or a ready margin
    module (then ``s``, ``grad`` and parameters must not be given); ``objective`` a name (built
    with ``objective_params``, e.g. ``{"lam": 1.0}``) or a ready objective module.

    Under DDP, after :meth:`setup_distributed`, the margin's batch statistics (dynamic ``m``,
    CurricularFace ``t``, AdaFace mean/std) are taken over the global batch, so its buffers stay
    identical on every rank; every rank must then call the head every step.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: str | BaseMargin = "expface",
        s: float | None = None,
        grad: str | None = None,
        subcenters: int = 1,
        objective: str | nn.Module = "softmax",
        objective_params: dict | None = None,
        **margin_params: float | bool | str | None,
    ) -> None:
        super().__init__(
            embedding_size, num_classes, margin, s, grad, margin_params, subcenters, objective, objective_params
        )
        self.weight = nn.Parameter(torch.empty(num_classes * self.subcenters, embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        self._rows_split = False

    def setup_distributed(self) -> None:
        """Take the margin's batch statistics over every rank's rows when a process group exists."""
        self._rows_split = world_and_rank()[0] > 1

    def _layout(self) -> BlockLayout:
        return BlockLayout(reduce_rows=all_reduce_sum) if self._rows_split else BlockLayout()

    def _margin_output(self, embeddings: Tensor, labels: Tensor) -> MarginOutput:
        check_embeddings(embeddings, self.embedding_size)
        check_labels(labels, embeddings.shape[0], self.num_classes)
        labels = labels.long()
        return margin_block(
            self.margin, embeddings, self.weight, labels, labels >= 0, self.num_classes, self._layout(), self.subcenters
        )

    def forward(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is not None:
            return self._margin_output(embeddings, labels).logits
        check_embeddings(embeddings, self.embedding_size)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = embeddings.to(torch.float64 if torch.float64 in (embeddings.dtype, self.weight.dtype) else torch.float32)
            cos = centre_cosine(nn.functional.normalize(x, dim=1), self.weight)
            return subcentre_max(cos, self.subcenters) * self.margin.s

    def output(self, embeddings: Tensor, labels: Tensor) -> HeadOutput:
        """Loss (the objective + the margin's extra terms) and the values to log."""
        out = self._margin_output(embeddings, labels)
        labels = labels.long()
        return objective_output(self.objective, out, labels, labels >= 0, self._layout())

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, subcenters={self.subcenters}"
