"""Embedding neck: maps a generic backbone's pooled features to a face embedding."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EmbeddingNeck"]


class EmbeddingNeck(nn.Module):
    """BatchNorm1d -> Dropout -> Linear -> BatchNorm1d: ``[B, in_features] -> [B, embedding_size]``."""

    def __init__(self, in_features: int, embedding_size: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.embedding_size = embedding_size
        self.bn_in = nn.BatchNorm1d(in_features)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_features, embedding_size)
        self.bn_out = nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_out(self.fc(self.dropout(self.bn_in(x))))
