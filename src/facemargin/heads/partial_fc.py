"""Partial FC: class centres sharded across ranks, with a distributed softmax.

With ``world`` ranks, rank ``r`` holds the centres ``[start, stop)`` of
:func:`~facemargin.heads.sharding.shard_bounds`. Every step:

1. embeddings and labels are all-gathered (the embeddings *with* gradient);
2. each rank computes the cosines of the global batch against its shard and applies the margin,
   whose batch statistics are reduced across the ranks (so a sharded run equals one process
   holding every centre, running statistics included);
3. the objective combines the softmax normaliser across ranks. The loss is the mean over the
   global batch's labelled rows, the same number on every rank, equal to the single-process
   loss of :class:`~facemargin.heads.MarginHead` on the global batch.

Gradient scaling under DDP: each rank's shard gets exactly ``dL/dW_shard`` (DDP does not touch
the shard). The embeddings get ``world * dL/dx_local`` (``ddp_grad_scale=True``, default): DDP
then *averages* the backbone gradients over the ranks, which gives exactly the gradient of the
single-process loss over the global batch. ``ddp_grad_scale=False`` gives the plain ``dL/dx_local``.

Sub-centres (``subcenters=K``): a class's K rows always live on the same rank (the shard holds
rows ``[start * K, stop * K)``) and sampling picks classes, with all K rows of a picked class. The
objective (``"softmax"`` or ``"uniface"``) sums or normalises over the ranks' column blocks.

``sample_rate < 1``: see :mod:`facemargin.heads.sampling`. The hooks of the head contract
(:mod:`facemargin.heads.base`) do the wiring: ``setup_distributed`` shards, ``ddp_ignored_parameters``
names the shards, ``on_save_checkpoint`` / ``on_load_checkpoint`` consolidate and re-shard, so a
run resumes at any world size.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..distributed import all_gather_rows, all_gather_with_grad, all_reduce_sum, broadcast_object, world_and_rank
from ..margins import BaseMargin, check_labels
from ..margins.base import check_flag, check_int, check_range
from .base import HeadOutput, check_embeddings
from .core import BlockLayout, CentreHead, margin_block, objective_output
from .margin_head import MarginHead
from .sampling import CentreSampling
from .sharding import consolidate, gather_shards, init_rows, shard, shard_bounds

__all__ = ["PartialFCHead"]


class PartialFCHead(CentreSampling, CentreHead):
    """Margin head whose class centres are sharded across the ranks.

    Args mirror :class:`MarginHead` (``subcenters``, ``objective`` included), plus ``sample_rate``
    (fraction of this shard's classes used per training step, positives always kept; also UniFace's
    ``r``), ``ddp_grad_scale`` (see the module docstring) and
    ``seed`` (centre init and sampling; drawn from torch's RNG and broadcast from rank 0 when
    None, then kept in the ``sample_seed`` buffer). The init depends only on the seed, not on
    the sharding.

    ``forward(embeddings, labels)`` returns the loss (same as :meth:`loss`). Every rank must call
    it in the same step (it runs collectives). In eval mode or under ``no_grad`` the full shard
    is used even when ``sample_rate < 1`` (exact loss). Labels ``-1`` are ignored; a global batch
    without labels gives 0 with zero gradient.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: str | BaseMargin = "expface",
        s: float | None = None,
        grad: str | None = None,
        sample_rate: float = 1.0,
        ddp_grad_scale: bool = True,
        seed: int | None = None,
        subcenters: int = 1,
        objective: str | nn.Module = "softmax",
        objective_params: dict | None = None,
        **margin_params: float | bool | str | None,
    ) -> None:
        sample_rate = check_range("PartialFCHead", "sample_rate", sample_rate, 0.0, 1.0, low_open=True)
        ddp_grad_scale = check_flag("PartialFCHead", "ddp_grad_scale", ddp_grad_scale)
        if seed is not None:
            seed = check_int("PartialFCHead", "seed", seed, low=0)
        super().__init__(
            embedding_size, num_classes, margin, s, grad, margin_params, subcenters, objective, objective_params,
            sample_rate,
        )
        self.sample_rate = float(sample_rate)
        self.ddp_grad_scale = ddp_grad_scale
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        self.register_buffer("sample_seed", torch.tensor(int(broadcast_object(seed)), dtype=torch.long))
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.long))
        self._init_sampling()
        self._fresh = True  # weights still equal the seeded init (re-sharding may re-init)
        world, rank = world_and_rank()
        self.world_size, self.rank = world, rank
        self.start, self.stop = shard_bounds(num_classes, rank, world)
        w = self._init_shard(self.start, self.stop)
        if self.sampled:
            self.register_buffer("weight", w)
            self.weight_active = nn.Parameter(torch.empty(self.num_sample * self.subcenters, embedding_size))
        else:
            self.weight = nn.Parameter(w)

    # ---- shape bookkeeping
    @property
    def seed(self) -> int:
        """The seed of the centre init and of the sampling counters."""
        return int(self.sample_seed)

    @property
    def sampled(self) -> bool:
        """Whether this head samples centres (``sample_rate < 1``)."""
        return self.sample_rate < 1.0

    @property
    def num_local(self) -> int:
        """Number of classes on this rank (``num_local * subcenters`` centre rows)."""
        return self.stop - self.start

    @property
    def num_sample(self) -> int:
        """Classes sampled per step: ``ceil(sample_rate * C_local)`` (``weight_active`` holds their K rows each)."""
        return max(1, math.ceil(self.sample_rate * self.num_local))

    def _init_shard(self, start: int, stop: int) -> Tensor:
        """The rows of classes ``[start, stop)`` of the seeded ``[C * K, D]`` init."""
        k = self.subcenters
        return init_rows(start * k, stop * k, self.num_classes * k, self.embedding_size, self.seed)

    @property
    def optimizer_param(self) -> nn.Parameter:
        """The Parameter the optimizer updates (``weight`` or ``weight_active``)."""
        return self.weight_active if self.sampled else self.weight  # type: ignore[return-value]

    # ---- the head contract
    def setup_distributed(self) -> None:
        """Shard for the current process group (LightningModule ``setup``: before DDP and optimizers)."""
        self.reshard()

    def ddp_ignored_parameters(self) -> list[str]:
        """The shards: DDP must neither broadcast nor all-reduce them."""
        return ["weight", "weight_active"] if self.sampled else ["weight"]

    def grad_clip_parameters(self) -> Iterable[nn.Parameter]:
        """Not the shards: they differ per rank, so a norm over them would too and make the
        data-parallel backbone replicas drift apart (insightface clips the backbone only). The
        objective's parameters (UniFace's bias) are identical on every rank and included."""
        return list(self.objective.parameters())

    def on_save_checkpoint(
        self, checkpoint: dict[str, Any], prefix: str, optimizers: Iterable[torch.optim.Optimizer] = ()
    ) -> None:
        """Consolidate the centres and their optimizer rows on rank 0 (collective: every rank)."""
        consolidate(self, checkpoint, prefix, optimizers)

    def on_load_checkpoint(self, checkpoint: dict[str, Any], prefix: str) -> None:
        """Slice the consolidated centres and optimizer rows to this rank (any world size)."""
        shard(self, checkpoint, prefix)

    def reshard(self, rank: int | None = None, world: int | None = None) -> None:
        """Re-shard for ``(rank, world)`` (default: the current process group).

        A head that has not trained yet is re-initialised from its (rank-0-broadcast) seed; a
        head holding all centres (world 1) is sliced. Anything else goes through checkpoints.
        Call before the optimizer is built and before DDP wraps the model.
        """
        if rank is None or world is None:
            world, rank = world_and_rank()
        if (rank, world) == (self.rank, self.world_size):
            return
        start, stop = shard_bounds(self.num_classes, rank, world)
        k = self.subcenters
        if self._fresh:
            self.sample_seed.fill_(int(broadcast_object(self.seed)))
            new = self._init_shard(start, stop)
        elif self.world_size == 1:
            new = self.weight.detach()[start * k:stop * k].clone()
        else:
            raise RuntimeError(
                f"cannot re-shard a trained head from world {self.world_size} to {world} in place; "
                "save with head.on_save_checkpoint and load with head.on_load_checkpoint"
            )
        new = new.to(device=self.weight.device, dtype=self.weight.dtype)
        self.world_size, self.rank, self.start, self.stop = world, rank, start, stop
        if self.sampled:
            self._buffers["weight"] = new
            self.weight_active.data = new.new_empty(self.num_sample * k, self.embedding_size)
        else:
            self.weight.data = new
        self._active_index, self._pending = None, False

    def _check_world(self) -> None:
        world, rank = world_and_rank()
        if (world, rank) != (self.world_size, self.rank):
            raise RuntimeError(
                f"PartialFCHead is sharded for rank {self.rank}/{self.world_size} but the process "
                f"group is rank {rank}/{world}: call head.setup_distributed() (LightningModule.setup) "
                "after the process group exists"
            )

    # ---- the loss
    def output(self, embeddings: Tensor, labels: Tensor) -> HeadOutput:
        """Loss (mean over the global batch's labelled rows, same on every rank) and values to log."""
        check_embeddings(embeddings, self.embedding_size)
        check_labels(labels, embeddings.shape[0], self.num_classes)
        self._check_world()
        world = self.world_size
        training = self.training and torch.is_grad_enabled()
        x_all, sizes = all_gather_with_grad(embeddings, float(world) if self.ddp_grad_scale else 1.0)
        y_all = all_gather_rows(labels.long(), sizes)
        in_shard = (y_all >= self.start) & (y_all < self.stop)
        local = torch.where(in_shard, y_all - self.start, torch.full_like(y_all, -1))
        weight: Tensor = self.weight
        if self.sampled and training:
            local = self._sample(local)
            weight = self.weight_active
        if training:
            self._fresh = False
        layout = BlockLayout(
            reduce_columns=all_reduce_sum, sharded_columns=world > 1, replicas=world
        ) if world > 1 else BlockLayout()
        valid = y_all >= 0
        out = margin_block(self.margin, x_all, weight, local, valid, self.num_classes, layout, self.subcenters)
        return objective_output(self.objective, out, local, valid, layout)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Same as :meth:`loss` (the local logits are of little use outside the head)."""
        return self.loss(embeddings, labels)

    # ---- export
    def full_weight(self) -> Tensor:
        """All centres ``[C * K, D]`` on every rank (collective: every rank must call it)."""
        return gather_shards(
            self.weight.detach(), self.num_classes, self.rank, self.world_size, None, self.subcenters
        )

    def to_margin_head(self) -> MarginHead:
        """A :class:`MarginHead` with all centres and copies of the margin and the objective (collective)."""
        head = MarginHead(
            self.embedding_size, self.num_classes, margin=copy.deepcopy(self.margin), subcenters=self.subcenters,
            objective=copy.deepcopy(self.objective),
        )
        with torch.no_grad():
            head.weight.copy_(self.full_weight())
        return head.to(self.weight.device)

    # ---- state dict: weight_active is a per-step scratch copy, never saved
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight_active", None)

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        state_dict.pop(prefix + "weight_active", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "weight_active" in missing_keys:
            missing_keys.remove(prefix + "weight_active")
        self._fresh, self._active_index, self._pending = False, None, False

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"shard=[{self.start}, {self.stop}) rank {self.rank}/{self.world_size}, "
            f"subcenters={self.subcenters}, sample_rate={self.sample_rate}"
        )
