"""Partial FC: class centres sharded across ranks, with a distributed softmax.

With ``world`` ranks, rank ``r`` holds the centres ``[start, stop)`` of :func:`shard_bounds`
(``C // world`` each, the remainder on the last rank). Every step:

1. embeddings and labels are all-gathered (the embeddings *with* gradient);
2. each rank computes the cosines of the global batch against its shard and applies the margin
   (:meth:`facemargin.margins.Margin.logits`) only to rows whose target lives on this rank
   (the others get label ``-1``);
3. the cross-entropy is computed with a distributed softmax: all-reduce MAX of the row maxima,
   all-reduce SUM of the sums of exponentials and of the target logit (contributed by the owning
   rank). The loss is the mean over the global batch's labelled rows, the same number on every
   rank, equal to the single-process loss of :class:`facemargin.heads.MarginHead`.

Gradient scaling under DDP: each rank's shard gets exactly ``dL/dW_shard`` (the shard is not
touched by DDP). The embeddings get ``world * dL/dx_local`` (``ddp_grad_scale=True``, default):
DDP then *averages* the backbone gradients over the ranks, which gives exactly the gradient of
the single-process loss over the global batch. Pass ``ddp_grad_scale=False`` to get the plain
``dL/dx_local`` (for code that sums instead of averaging).

``sample_rate < 1`` (insightface's sampling): the full shard is a *buffer* ``weight``; each
training step the head keeps every positive centre of the global batch (on this shard) plus a
uniform sample of the others, ``ceil(sample_rate * C_local)`` rows in all, copies them into the
fixed-size Parameter ``weight_active`` (what the optimizer sees) and swaps their optimizer-state
rows in; after ``optimizer.step()`` a step post-hook writes the rows back. Rows not sampled are
untouched, weights and optimizer state alike. The full-shard optimizer state lives in the
optimizer's own state under ``partial_fc_full_<key>`` (so it is saved with the optimizer).

What a LightningModule calls (see ``docs/multi_gpu.md``)::

    def setup(self, stage):                      # after the process group exists
        setup_partial_fc(self)                   # shard every head + keep DDP off the shards
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), ...)
        self.head.attach_optimizer(opt)          # needed for sample_rate < 1; harmless otherwise
        return opt
    def on_save_checkpoint(self, checkpoint):    # all ranks
        consolidate_checkpoint(checkpoint, self, self.trainer.optimizers)
    def on_load_checkpoint(self, checkpoint):
        shard_checkpoint(checkpoint, self)
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from .heads import MarginHead, check_labels
from .margins import Margin, as_margin

__all__ = [
    "PartialFCHead",
    "shard_bounds",
    "ddp_params_to_ignore",
    "exclude_sharded_from_ddp",
    "setup_partial_fc",
    "consolidate_checkpoint",
    "shard_checkpoint",
    "FULL_STATE_PREFIX",
    "CHECKPOINT_KEY",
]

#: optimizer-state key prefix of the full-shard rows kept for ``sample_rate < 1``.
FULL_STATE_PREFIX = "partial_fc_full_"
#: checkpoint key holding per-head metadata written by :func:`consolidate_checkpoint`.
CHECKPOINT_KEY = "partial_fc"
_INIT_BLOCK = 65536  # rows per independently seeded init block (world-size independent init)


# ----------------------------------------------------------------------------- helpers
def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world_rank() -> tuple[int, int]:
    if _dist_on():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def shard_bounds(num_classes: int, rank: int, world: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s centres: ``C // world`` each, remainder on the last."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world; got rank={rank}, world={world}")
    if num_classes < world:
        raise ValueError(f"num_classes ({num_classes}) must be >= world size ({world})")
    per = num_classes // world
    start = rank * per
    return start, (num_classes if rank == world - 1 else start + per)


def _init_rows(start: int, stop: int, num_classes: int, dim: int, seed: int, std: float = 0.01) -> Tensor:
    """Rows ``[start, stop)`` of a ``N(0, std)`` ``[num_classes, dim]`` matrix, generated in
    independently seeded blocks so that it does not depend on the sharding."""
    out = torch.empty(stop - start, dim)
    for block in range(start // _INIT_BLOCK, (stop - 1) // _INIT_BLOCK + 1):
        b0 = block * _INIT_BLOCK
        gen = torch.Generator().manual_seed((seed * 1_000_003 + block) % (2**63 - 1))
        rows = torch.randn(min(_INIT_BLOCK, num_classes - b0), dim, generator=gen)
        lo, hi = max(start, b0), min(stop, b0 + rows.shape[0])
        out[lo - start:hi - start] = rows[lo - b0:hi - b0]
    return out.mul_(std)


def _gather_sizes(n: int, device: torch.device, world: int) -> list[int]:
    mine = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine)
    return [int(s) for s in sizes]


def _all_gather_rows(x: Tensor, sizes: list[int]) -> Tensor:
    """All-gather along dim 0 with per-rank row counts ``sizes`` (padded under the hood)."""
    x = x.contiguous()
    m = max(sizes)
    if x.shape[0] < m:
        x = torch.cat([x, x.new_zeros(m - x.shape[0], *x.shape[1:])])
    bufs = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(bufs, x)
    return torch.cat([b[:s] for b, s in zip(bufs, sizes)])


class _AllGatherGrad(Function):
    """All-gather rows; backward all-reduces (SUM) the gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int], rank: int, scale: float) -> Tensor:
        ctx.sizes, ctx.rank, ctx.scale = sizes, rank, scale
        return _all_gather_rows(x, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        out = grad[start:start + ctx.sizes[ctx.rank]]
        return (out * ctx.scale if ctx.scale != 1.0 else out), None, None, None


class _ShardCosine(Function):
    """``cos = x_n @ W.T / ||W||`` in float32 without materialising a normalised copy of ``W``.

    ``x_n`` is already L2-normalised. The backward writes ``dL/dW`` into a single ``[C, D]``
    buffer: ``A - (W.A) W / ||W||^2`` with ``A = (g / ||W||).T @ x_n``, row by row.
    """

    @staticmethod
    def forward(ctx: Any, x_n: Tensor, weight: Tensor) -> Tensor:
        w = weight.float()
        inv = torch.linalg.vector_norm(w, dim=1).clamp_min(1e-12).reciprocal_()
        cos = (x_n @ w.t()).mul_(inv)
        ctx.save_for_backward(x_n, weight, inv)
        return cos

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x_n, weight, inv = ctx.saved_tensors
        w = weight.float()
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


class _DistCrossEntropy(Function):
    """Mean cross-entropy over labelled rows, softmax normaliser combined across ranks.

    ``logits [N, C_local]`` float32; ``local [N]`` target column in this block or ``-1``;
    ``valid [N]`` rows with a (global) label. Saves only the probabilities; the backward turns
    them into the gradient in place (so it can run once: no ``retain_graph`` double backward).
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, local: Tensor, valid: Tensor, world: int) -> Tensor:
        n = logits.shape[0]
        if logits.shape[1] > 0:
            row_max = logits.max(dim=1).values
        else:
            row_max = logits.new_full((n,), -math.inf)
        if world > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        probs = (logits - row_max.unsqueeze(1)).exp_()
        sum_exp = probs.sum(dim=1)
        rows = torch.nonzero(local >= 0, as_tuple=True)[0]
        cols = local[rows]
        target = logits.new_zeros(n)
        target[rows] = logits[rows, cols]
        if world > 1:
            packed = torch.stack([sum_exp, target])  # one all-reduce for both
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            sum_exp, target = packed[0], packed[1]
        probs.div_(sum_exp.unsqueeze(1))
        per_row = torch.where(valid, sum_exp.log() + row_max - target, torch.zeros_like(target))
        count = valid.sum().clamp_min(1).to(logits.dtype)
        ctx.save_for_backward(probs, rows, cols, valid, count)
        ctx.used = False
        return per_row.sum() / count

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        if ctx.used:
            raise RuntimeError("PartialFCHead's loss supports a single backward (no retain_graph reuse)")
        ctx.used = True
        probs, rows, cols, valid, count = ctx.saved_tensors
        coef = grad / count
        g = probs.mul_(coef)
        g.index_put_((rows, cols), (-coef).expand(rows.shape[0]), accumulate=True)
        g.mul_(valid.unsqueeze(1).to(g.dtype))
        return g, None, None, None


def _param_index(optimizer: torch.optim.Optimizer, param: Tensor) -> int | None:
    """Index of ``param`` in ``optimizer.state_dict()['state']`` numbering, or None."""
    i = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p is param:
                return i
            i += 1
    return None


# ----------------------------------------------------------------------------- the head
class PartialFCHead(nn.Module):
    """Margin softmax head whose class centres are sharded across the ranks.

    Args mirror :class:`facemargin.heads.MarginHead`, plus ``sample_rate`` (fraction of this
    shard's centres used per training step, positives always kept), ``ddp_grad_scale`` (see the
    module docstring) and ``seed`` (centre init; drawn from torch's RNG and broadcast from rank 0
    when None). The init depends only on the seed, not on the sharding.

    ``forward(embeddings, labels)`` returns the loss (same as :meth:`loss`). Every rank must call
    it in the same step (it runs collectives). In eval mode or under ``no_grad`` the full shard
    is used even when ``sample_rate < 1`` (exact loss). Labels ``-1`` are ignored.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: str | Margin = "expface",
        s: float | None = None,
        grad: str = "detached",
        sample_rate: float = 1.0,
        ddp_grad_scale: bool = True,
        seed: int | None = None,
        **margin_params: float | bool,
    ) -> None:
        super().__init__()
        if embedding_size <= 0 or num_classes <= 0:
            raise ValueError(
                f"embedding_size and num_classes must be positive; got {embedding_size}, {num_classes}"
            )
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate}")
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = float(sample_rate)
        self.ddp_grad_scale = ddp_grad_scale
        self.margin = as_margin(margin, s=s, grad=grad, **margin_params)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        self.seed = self._sync_seed(seed)
        self._fresh = True  # weights still equal the seeded init (re-sharding may re-init)
        self._optimizers: list[weakref.ref] = []
        self._hooks: list[Any] = []
        self._active_index: Tensor | None = None
        self._pending = False
        world, rank = _world_rank()
        self.world_size, self.rank = world, rank
        self.start, self.stop = shard_bounds(num_classes, rank, world)
        w = _init_rows(self.start, self.stop, num_classes, embedding_size, self.seed)
        if self.sampled:
            self.register_buffer("weight", w)
            self.weight_active = nn.Parameter(torch.empty(self.num_sample, embedding_size))
        else:
            self.weight = nn.Parameter(w)

    # ---- shape bookkeeping
    @property
    def sampled(self) -> bool:
        """Whether this head samples centres (``sample_rate < 1``)."""
        return self.sample_rate < 1.0

    @property
    def num_local(self) -> int:
        """Number of centres on this rank."""
        return self.stop - self.start

    @property
    def num_sample(self) -> int:
        """Rows of ``weight_active``: ``ceil(sample_rate * C_local)``."""
        return max(1, math.ceil(self.sample_rate * self.num_local))

    @property
    def optimizer_param(self) -> nn.Parameter:
        """The Parameter the optimizer updates (``weight`` or ``weight_active``)."""
        return self.weight_active if self.sampled else self.weight  # type: ignore[return-value]

    @staticmethod
    def _sync_seed(seed: int) -> int:
        if _dist_on() and dist.get_world_size() > 1:
            obj = [seed]
            dist.broadcast_object_list(obj, src=0)
            seed = int(obj[0])
        return seed

    def reshard(self, rank: int | None = None, world: int | None = None) -> None:
        """Re-shard for ``(rank, world)`` (default: the current process group).

        A head that has not trained yet is re-initialised from its (rank-0-broadcast) seed; a
        head holding all centres (world 1) is sliced. Anything else goes through checkpoints
        (:func:`consolidate_checkpoint` / :func:`shard_checkpoint`). Call before the optimizer
        is built and before DDP wraps the model (LightningModule ``setup``).
        """
        if rank is None or world is None:
            world, rank = _world_rank()
        if (rank, world) == (self.rank, self.world_size):
            return
        start, stop = shard_bounds(self.num_classes, rank, world)
        if self._fresh:
            self.seed = self._sync_seed(self.seed)
            new = _init_rows(start, stop, self.num_classes, self.embedding_size, self.seed)
        elif self.world_size == 1:
            new = self.weight.detach()[start:stop].clone()
        else:
            raise RuntimeError(
                f"cannot re-shard a trained head from world {self.world_size} to {world} in place; "
                "save with consolidate_checkpoint and load with shard_checkpoint"
            )
        new = new.to(device=self.weight.device, dtype=self.weight.dtype)
        self.world_size, self.rank, self.start, self.stop = world, rank, start, stop
        if self.sampled:
            self._buffers["weight"] = new
            self.weight_active.data = new.new_empty(self.num_sample, self.embedding_size)
        else:
            self.weight.data = new
        self._active_index, self._pending = None, False

    def _check_world(self) -> None:
        world, rank = _world_rank()
        if (world, rank) != (self.world_size, self.rank):
            raise RuntimeError(
                f"PartialFCHead is sharded for rank {self.rank}/{self.world_size} but the process "
                f"group is rank {rank}/{world}: call facemargin.partial_fc.setup_partial_fc(module) "
                "(LightningModule.setup) after the process group exists"
            )

    # ---- optimizer integration (sample_rate < 1)
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Register ``optimizer`` (call once, e.g. in ``configure_optimizers``).

        For ``sample_rate < 1`` the head swaps the sampled rows' optimizer state in at each
        training :meth:`loss` and writes rows and state back in a step post-hook. A no-op when
        ``sample_rate == 1`` or when ``optimizer`` does not hold ``weight_active``.
        """
        if not self.sampled or _param_index(optimizer, self.weight_active) is None:
            return
        if any(ref() is optimizer for ref in self._optimizers):
            return
        self._optimizers.append(weakref.ref(optimizer))
        self._hooks.append(optimizer.register_step_post_hook(self._after_step))

    def _attached(self) -> list[torch.optim.Optimizer]:
        opts = [ref() for ref in self._optimizers]
        return [o for o in opts if o is not None and _param_index(o, self.weight_active) is not None]

    def _after_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        """Step post-hook: write the sampled rows and their optimizer state back to the shard."""
        idx = self._active_index
        if idx is None or not self._pending:
            return
        p = self.weight_active
        with torch.no_grad():
            self.weight.index_copy_(0, idx, p.detach().to(self.weight.dtype))
            state = optimizer.state.get(p, {})
            for key, val in list(state.items()):
                if key.startswith(FULL_STATE_PREFIX) or not torch.is_tensor(val) or val.shape != p.shape:
                    continue
                full = state.get(FULL_STATE_PREFIX + key)
                if full is None:
                    full = torch.zeros(self.num_local, *p.shape[1:], dtype=val.dtype, device=val.device)
                    state[FULL_STATE_PREFIX + key] = full
                full.index_copy_(0, idx, val)
        self._pending = False

    def _sample(self, local: Tensor) -> Tensor:
        """Pick the active rows (positives + uniform others), load them, remap ``local``."""
        opts = self._attached()
        if not opts:
            raise RuntimeError(
                "PartialFCHead(sample_rate<1) needs head.attach_optimizer(optimizer) before training "
                "(call it in configure_optimizers)"
            )
        if self._pending and self.weight_active.grad is not None:
            raise RuntimeError(
                "PartialFCHead(sample_rate<1): a new sample before optimizer.step() consumed the last "
                "one; gradient accumulation is not supported with sampling (use sample_rate=1)"
            )
        k, n_local = self.num_sample, self.num_local
        positive = torch.zeros(n_local, dtype=torch.bool, device=local.device)
        positive[local[local >= 0]] = True
        n_pos = int(positive.sum())
        overflow = n_pos - k
        if self.world_size > 1:  # decide together: one rank raising alone would hang the others
            flag = torch.tensor([overflow], dtype=torch.long, device=local.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            overflow = int(flag)
        if overflow > 0:
            raise ValueError(
                f"the global batch has more positive classes on a shard than the {k} sampled "
                f"centres (this rank: {n_pos}; sample_rate={self.sample_rate}, C_local={n_local}); "
                "raise sample_rate"
            )
        score = torch.rand(n_local, device=local.device)
        score[positive] = 2.0
        idx = torch.topk(score, k, sorted=False).indices.sort().values
        remap = torch.full((n_local,), -1, dtype=torch.long, device=local.device)
        remap[idx] = torch.arange(k, device=local.device)
        new_local = torch.where(local >= 0, remap[local.clamp_min(0)], local)
        with torch.no_grad():
            torch.index_select(self.weight, 0, idx, out=self.weight_active.data)
            for opt in opts:
                state = opt.state.get(self.weight_active, {})
                for key in [k_ for k_ in state if k_.startswith(FULL_STATE_PREFIX)]:
                    name, full = key[len(FULL_STATE_PREFIX):], state[key]
                    cur = state.get(name)
                    if torch.is_tensor(cur) and cur.shape == (k, *full.shape[1:]) and cur.dtype == full.dtype:
                        torch.index_select(full, 0, idx, out=cur)
                    else:
                        state[name] = full.index_select(0, idx)
        self._active_index, self._pending = idx, True
        return new_local

    # ---- the loss
    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over the global batch's labelled rows (same value on every rank)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must be [B, {self.embedding_size}]; got {tuple(embeddings.shape)}"
            )
        check_labels(labels, embeddings.shape[0], self.num_classes)
        self._check_world()
        world = self.world_size
        training = self.training and torch.is_grad_enabled()
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            if world > 1:
                sizes = _gather_sizes(embeddings.shape[0], embeddings.device, world)
                scale = float(world) if self.ddp_grad_scale else 1.0
                x_all = _AllGatherGrad.apply(embeddings, sizes, self.rank, scale)
                y_all = _all_gather_rows(labels.long(), sizes)
            else:
                x_all, y_all = embeddings, labels.long()
            x_n = F.normalize(x_all.float(), dim=1)
            in_shard = (y_all >= self.start) & (y_all < self.stop)
            local = torch.where(in_shard, y_all - self.start, torch.full_like(y_all, -1))
            if self.sampled and training:
                local = self._sample(local)
                weight: Tensor = self.weight_active
            else:
                weight = self.weight
            if training:
                self._fresh = False
            logits = self.margin.logits(_ShardCosine.apply(x_n, weight), local)
            return _DistCrossEntropy.apply(logits, local, y_all >= 0, world)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Same as :meth:`loss` (the local logits are of little use outside the head)."""
        return self.loss(embeddings, labels)

    # ---- the hooks FaceRecognitionModule calls (docs/architecture.md)
    def setup_distributed(self) -> None:
        """Shard for the current process group (before DDP wraps the model and optimizers exist)."""
        self.reshard()

    def ddp_ignored_parameters(self) -> list[str]:
        """The shards: DDP must neither broadcast nor all-reduce them."""
        return ["weight", "weight_active"] if self.sampled else ["weight"]

    def on_save_checkpoint(self, checkpoint: dict, prefix: str, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Replace the shards in ``checkpoint`` by the full centres (collective)."""
        consolidate_checkpoint(checkpoint, self, optimizers, prefix=prefix)

    def on_load_checkpoint(self, checkpoint: dict, prefix: str) -> None:
        """Slice the full centres in ``checkpoint`` to this rank's shard."""
        shard_checkpoint(checkpoint, self, prefix=prefix)

    def grad_clip_parameters(self) -> list[nn.Parameter]:
        """None: the shards differ per rank, so a norm over them would too."""
        return []

    # ---- export
    def full_weight(self) -> Tensor:
        """All ``C`` centres ``[C, D]`` on every rank (collective: every rank must call it)."""
        return _gather_shards(self, self.weight.detach(), to_rank=None)

    def to_margin_head(self) -> MarginHead:
        """A :class:`MarginHead` with all centres (collective), for evaluation or export."""
        head = MarginHead(self.embedding_size, self.num_classes, margin=self.margin)
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

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_optimizers"], state["_hooks"] = [], []
        return state

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"shard=[{self.start}, {self.stop}) rank {self.rank}/{self.world_size}, "
            f"sample_rate={self.sample_rate}"
        )


# ----------------------------------------------------------------------------- DDP
def _heads(module: nn.Module) -> list[tuple[str, PartialFCHead]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, PartialFCHead)]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def ddp_params_to_ignore(module: nn.Module) -> list[str]:
    """Fully-qualified names of the sharded parameters/buffers in ``module`` (for DDP)."""
    names = []
    for name, head in _heads(module):
        names.append(_join(name, "weight"))
        if head.sampled:
            names.append(_join(name, "weight_active"))
    return names


def exclude_sharded_from_ddp(module: nn.Module) -> list[str]:
    """Set ``module._ddp_params_and_buffers_to_ignore`` so DDP neither broadcasts nor all-reduces
    the shards; keeps names already there. Call before DDP wraps ``module``. Returns the list."""
    from torch.nn.parallel import DistributedDataParallel

    names = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    names += [n for n in ddp_params_to_ignore(module) if n not in names]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    return names


def setup_partial_fc(module: nn.Module) -> None:
    """Shard every :class:`PartialFCHead` in ``module`` for the current process group and keep
    DDP off the shards. Call in ``LightningModule.setup`` (the process group exists there and
    neither the optimizer nor DDP does yet)."""
    for _, head in _heads(module):
        head.reshard()
    exclude_sharded_from_ddp(module)


# ----------------------------------------------------------------------------- checkpoints
def _gather_shards(head: PartialFCHead, shard: Tensor, to_rank: int | None) -> Tensor | None:
    """Full ``[C, ...]`` tensor from every rank's shard rows. ``to_rank=None``: on every rank,
    on the shard's device; else only on ``to_rank`` (on the CPU), None elsewhere."""
    world = head.world_size
    if world == 1:
        return shard.detach().clone() if to_rank is None else shard.detach().cpu().clone()
    shard = shard.detach().contiguous()
    receive = to_rank is None or head.rank == to_rank
    device = shard.device if to_rank is None else torch.device("cpu")
    full = torch.empty(head.num_classes, *shard.shape[1:], dtype=shard.dtype, device=device) if receive else None
    for src in range(world):
        start, stop = shard_bounds(head.num_classes, src, world)
        buf = shard if src == head.rank else shard.new_empty(stop - start, *shard.shape[1:])
        dist.broadcast(buf, src=src)
        if full is not None:
            full[start:stop].copy_(buf)
    return full


def _per_row_keys(head: PartialFCHead, state: dict) -> list[str]:
    """Optimizer-state keys holding one row per centre of the whole shard."""
    if head.sampled:
        return sorted(k for k in state if k.startswith(FULL_STATE_PREFIX))
    shape = head.weight.shape
    return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == shape)


def consolidate_checkpoint(
    checkpoint: dict,
    module: nn.Module,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    prefix: str = "",
    all_ranks: bool = False,
) -> None:
    """Replace every shard in ``checkpoint`` by the full tensor (call on all ranks).

    ``checkpoint["state_dict"][prefix + <head>.weight]`` and the head's per-row optimizer state
    in ``checkpoint["optimizer_states"][i]`` (``optimizers`` in the same order, e.g.
    ``trainer.optimizers``) become ``[C, ...]``; metadata goes to ``checkpoint["partial_fc"]``.
    ``prefix`` is ``module``'s key prefix in the state dict (``""`` for the LightningModule).
    Full tensors are assembled on the CPU of rank 0 only (the rank Lightning saves) unless
    ``all_ranks``. Live tensors are never modified.
    """
    optimizers = list(optimizers)
    meta = dict(checkpoint.get(CHECKPOINT_KEY, {}))
    to_rank = None if all_ranks else 0
    for name, head in _heads(module):
        wkey = prefix + _join(name, "weight")
        full = _gather_shards(head, head.weight, to_rank)
        if full is not None:
            checkpoint["state_dict"][wkey] = full
        opt_meta = []
        p = head.optimizer_param
        for i, opt in enumerate(optimizers):
            pid = _param_index(opt, p)
            if pid is None or "optimizer_states" not in checkpoint:
                continue
            keys = _per_row_keys(head, opt.state.get(p, {}))
            if head.world_size > 1:
                all_keys: list[Any] = [None] * head.world_size
                dist.all_gather_object(all_keys, keys)
                if any(k != keys for k in all_keys):
                    raise RuntimeError(f"optimizer state keys differ across ranks: {all_keys}")
            opt_ckpt = checkpoint["optimizer_states"][i]
            states = dict(opt_ckpt["state"])
            pstate = dict(states.get(pid, {}))
            for key in keys:
                full = _gather_shards(head, opt.state[p][key], to_rank)
                if full is not None:
                    pstate[key] = full
            if pid in states or keys:
                states[pid] = pstate
            opt_ckpt["state"] = states
            opt_meta.append({"optimizer": i, "param_id": pid, "keys": keys})
        meta[wkey] = {
            "num_classes": head.num_classes,
            "embedding_size": head.embedding_size,
            "sampled": head.sampled,
            "saved_world_size": head.world_size,
            "optimizer_states": opt_meta,
        }
    checkpoint[CHECKPOINT_KEY] = meta


def shard_checkpoint(checkpoint: dict, module: nn.Module, prefix: str = "") -> None:
    """Slice the full tensors written by :func:`consolidate_checkpoint` to this rank's shard
    (for the heads' current world size), in ``state_dict`` and ``optimizer_states``. Call in
    ``LightningModule.on_load_checkpoint`` (after ``setup_partial_fc``); no collectives."""
    meta = checkpoint.get(CHECKPOINT_KEY, {})
    for name, head in _heads(module):
        wkey = prefix + _join(name, "weight")
        info = meta.get(wkey)
        w = checkpoint["state_dict"].get(wkey)
        if w is None:
            continue
        if info is None and not (head.world_size == 1 and w.shape[0] == head.num_classes):
            raise ValueError(
                f"{wkey} has no Partial FC metadata: save with consolidate_checkpoint(...) in "
                "on_save_checkpoint"
            )
        if w.shape[0] != head.num_classes:
            raise ValueError(f"{wkey}: expected {head.num_classes} rows (consolidated); got {tuple(w.shape)}")
        checkpoint["state_dict"][wkey] = w[head.start:head.stop].clone()
        if info is None or "optimizer_states" not in checkpoint:
            continue
        if bool(info["sampled"]) != head.sampled:
            raise ValueError(
                f"{wkey}: checkpoint was saved with sampled={info['sampled']}, head has "
                f"sample_rate={head.sample_rate}; optimizer state layouts differ"
            )
        for m in info["optimizer_states"]:
            opt_ckpt = checkpoint["optimizer_states"][m["optimizer"]]
            states = dict(opt_ckpt["state"])
            if m["param_id"] not in states:
                continue
            pstate = dict(states[m["param_id"]])
            for key in m["keys"]:
                pstate[key] = pstate[key][head.start:head.stop].clone()
            states[m["param_id"]] = pstate
            opt_ckpt["state"] = states
