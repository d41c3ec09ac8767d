"""A user's own head, written without facemargin: ``head._target_=custom_head.MyHead`` must train
it unchanged (tests/test_heads_train.py). It only has the one method the contract requires."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MyHead(nn.Module):
    """Scaled normalised linear layer + cross-entropy; no hooks at all."""

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 16.0) -> None:
        super().__init__()
        self.fc = nn.Linear(embedding_size, num_classes, bias=False)
        self.scale = scale
        self.calls = 0

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = F.normalize(embeddings, dim=1) @ F.normalize(self.fc.weight, dim=1).t()
        return F.cross_entropy(self.scale * logits, labels)
