"""The head contract: what a training loop may call on a head, with no-op defaults.

A head turns embeddings and labels into a loss. The loop (``FaceRecognitionModule``, or your own)
looks each call up by name and never asks what class the head is; a head may implement only
``loss``. :class:`HeadHooks` gives every hook its default, so a head subclasses it and overrides
what it needs:

==================================================== ============================================
call                                                 when
==================================================== ============================================
``output(emb, labels) -> HeadOutput``                every training step
``setup_distributed()``                              the process group exists; before DDP wraps
                                                     the model and before the optimizers
``ddp_ignored_parameters() -> list[str]``            with setup; names relative to the head
``attach_optimizer(optimizer)``                      when the optimizers are built
``on_save_checkpoint(checkpoint, prefix, optims)``   every rank (may be a collective)
``on_load_checkpoint(checkpoint, prefix)``           before the state dict is loaded
``grad_clip_parameters()``                           gradient clipping: parameters identical on
                                                     every rank
==================================================== ============================================

``prefix`` is the head's key prefix in ``checkpoint["state_dict"]`` (``"head."`` when it is the
attribute ``head`` of a LightningModule).
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["HeadHooks", "HeadOutput", "check_embeddings"]


class HeadOutput(NamedTuple):
    """``loss``: the scalar to back-propagate (objective + extra terms); ``logs``: detached
    scalars to log as ``train/<key>`` (``"ce"``, margin values such as ``"m"`` or ``"t"``, extra
    loss terms under their own names)."""

    loss: Tensor
    logs: dict[str, Tensor]


class HeadHooks:
    """The hook defaults of the head contract (mix into an ``nn.Module`` that defines ``loss``)."""

    def output(self, embeddings: Tensor, labels: Tensor) -> HeadOutput:
        """Loss and values to log; default: ``loss(embeddings, labels)`` and nothing to log."""
        loss = self.loss(embeddings, labels)  # type: ignore[attr-defined]
        return loss if isinstance(loss, HeadOutput) else HeadOutput(loss, {})

    def setup_distributed(self) -> None:
        """Adapt to the current process group (shard, sync); default: nothing."""

    def ddp_ignored_parameters(self) -> list[str]:
        """Parameter/buffer names (relative to the head) DDP must neither broadcast nor reduce."""
        return []

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called with every optimizer that is built; default: nothing."""

    def on_save_checkpoint(
        self, checkpoint: dict[str, Any], prefix: str, optimizers: Iterable[torch.optim.Optimizer] = ()
    ) -> None:
        """Edit ``checkpoint`` before it is written (every rank calls it); default: nothing."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any], prefix: str) -> None:
        """Edit ``checkpoint`` before its state dict is loaded; default: nothing."""

    def grad_clip_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters to include in gradient clipping (identical on every rank); default: all."""
        return self.parameters()  # type: ignore[attr-defined]


def check_embeddings(embeddings: Tensor, embedding_size: int) -> None:
    """Embeddings must be a floating ``[B, embedding_size]`` tensor."""
    if not isinstance(embeddings, Tensor) or not embeddings.is_floating_point():
        raise TypeError(f"embeddings must be a floating-point tensor; got {getattr(embeddings, 'dtype', type(embeddings))}")
    if embeddings.dim() != 2 or embeddings.shape[1] != embedding_size:
        raise ValueError(f"embeddings must be [B, {embedding_size}]; got {tuple(embeddings.shape)}")
