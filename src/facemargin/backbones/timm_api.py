"""What timm expects of the face backbones defined here: a pretrained-cfg and the classifier API."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


def face_cfg(first_conv: str, **kwargs: Any) -> dict[str, Any]:
    """A face model's cfg: 112x112 RGB, mean/std 0.5, no weights to download, embedding output."""
    cfg: dict[str, Any] = dict(
        url="",
        num_classes=0,
        input_size=(3, 112, 112),
        pool_size=None,
        fixed_input_size=False,
        interpolation="bilinear",
        crop_pct=1.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        first_conv=first_conv,
        classifier="head",
    )
    cfg.update(kwargs)
    return cfg


class FaceEmbedderTimmAPI:
    """timm's classifier conventions for a face model whose ``forward_head`` ends in an embedding.

    The model sets ``embedding_size``, ``num_classes`` and ``head`` (``nn.Identity`` when
    ``num_classes=0``, so ``forward`` returns the embedding) and defines ``forward_features`` and
    ``forward_head``.
    """

    embedding_size: int
    num_classes: int
    head: nn.Module

    def _setup_embedder(
        self, kwargs: dict[str, Any], img_size: int | Sequence[int], reduction: int, in_chans: int,
        embedding_size: int, num_classes: int, dropout: float,
    ) -> tuple[int, int]:
        """The attributes every face model here sets; checks ``kwargs`` is empty (timm's ``global_pool``
        aside) and that the input side is a multiple of ``reduction``. Returns ``(height, width)``."""
        name = type(self).__name__
        kwargs.pop("global_pool", None)  # timm passes it for some wrappers; these models do not pool
        if kwargs:
            raise TypeError(f"{name} got unexpected arguments: {sorted(kwargs)}")
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if h % reduction or w % reduction:
            raise ValueError(f"{name} input size must be a multiple of {reduction}, got {h}x{w}")
        self.img_size = (h, w)
        self.in_chans = in_chans
        self.embedding_size = embedding_size
        self.num_features = self.head_hidden_size = embedding_size
        self.num_classes = num_classes
        self.drop_rate = dropout
        return h, w

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier; ``num_classes=0`` makes the model return embeddings."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embedding_size, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))  # type: ignore[attr-defined]
