"""Heads: embeddings + labels -> loss. ``MarginHead`` (every centre on every rank) and
``PartialFCHead`` (centres sharded across ranks) implement the contract of :mod:`.base`; both take
``subcenters`` (K centres per class, :mod:`.subcenters`) and ``objective`` (``"softmax"`` or
``"uniface"``, :mod:`.objectives`)."""

from .base import HeadHooks, HeadOutput
from .margin_head import MarginHead
from .objectives import SoftmaxCrossEntropy, UniFace
from .partial_fc import PartialFCHead

__all__ = ["HeadHooks", "HeadOutput", "MarginHead", "PartialFCHead", "SoftmaxCrossEntropy", "UniFace"]
