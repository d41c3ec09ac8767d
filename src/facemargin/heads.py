"""MarginHead: class centres + a margin from the registry, as a plain ``torch.nn.Module``.

Drop it into any PyTorch or Lightning project::

    head = MarginHead(embedding_size=512, num_classes=10_000, margin="expface")  # m=0.7, s=64
    loss = head.loss(backbone(images), labels)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .margins import Margin, as_margin

__all__ = ["MarginHead", "check_labels", "normalized_cosine"]


def check_labels(labels: Tensor, batch: int, num_classes: int) -> None:
    """Labels must be an integer ``[batch]`` tensor in ``[0, num_classes)`` or ``-1`` (no target)."""
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},); got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise TypeError("labels must be an integer tensor (cast RecordIO float labels with .long())")
    if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) or be -1; got range [{int(labels.min())}, {int(labels.max())}]"
        )


def normalized_cosine(embeddings: Tensor, weight: Tensor) -> Tensor:
    """``cos`` between every embedding and every class centre, in float32: ``[B, C]``."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x = F.normalize(embeddings.float(), dim=1)
        w = F.normalize(weight.float(), dim=1)
        return x @ w.t()


class MarginHead(nn.Module):
    """Class centres ``W[C, D]`` and a margin softmax.

    ``forward(embeddings, labels)`` returns scaled float32 logits ``[B, C]`` with the margin applied
    to each row's target column (``labels == -1``: row left as plain scaled cosines). With
    ``labels=None`` it returns the scaled cosines (inference). ``loss`` is the cross-entropy.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: str | Margin = "expface",
        s: float | None = None,
        grad: str = "detached",
        **margin_params: float | bool,
    ) -> None:
        super().__init__()
        if embedding_size <= 0 or num_classes <= 0:
            raise ValueError(
                f"embedding_size and num_classes must be positive; got {embedding_size}, {num_classes}"
            )
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.margin = as_margin(margin, s=s, grad=grad, **margin_params)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        cos = normalized_cosine(embeddings, self.weight)
        if labels is None:
            return cos * self.margin.s
        check_labels(labels, cos.shape[0], self.num_classes)
        return self.margin.logits(cos, labels)

    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over rows whose label is not ``-1``."""
        return F.cross_entropy(self(embeddings, labels), labels.long(), ignore_index=-1)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}"


def __getattr__(name: str):  # PartialFCHead moves into the heads package; until then, lazily
    if name == "PartialFCHead":
        from .partial_fc import PartialFCHead

        return PartialFCHead
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
