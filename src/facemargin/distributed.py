"""Rank and world of the current process group, and the collectives the heads use (no Lightning).

Every function works without a process group (one process): reductions are then the identity
and gathers return their input. ``all_gather_with_grad`` is the one collective that carries a
gradient: its backward sums the gradient over the ranks and hands each rank its own rows.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import Function

__all__ = [
    "all_gather_rows",
    "all_gather_with_grad",
    "all_reduce_max",
    "all_reduce_sum",
    "broadcast_object",
    "exclude_from_ddp",
    "gather_sizes",
    "is_distributed",
    "world_and_rank",
]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_and_rank() -> tuple[int, int]:
    """``(world_size, rank)`` of the default process group; ``(1, 0)`` without one."""
    if is_distributed():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _all_reduce(t: Tensor, op: Any) -> Tensor:
    if world_and_rank()[0] == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_sum(t: Tensor) -> Tensor:
    """SUM of ``t`` over the ranks, as a new tensor without gradient (``t`` itself on one process)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: Tensor) -> Tensor:
    """MAX of ``t`` over the ranks, as a new tensor without gradient (``t`` itself on one process)."""
    return _all_reduce(t, dist.ReduceOp.MAX)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (``obj`` itself on one process)."""
    if world_and_rank()[0] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's ``n`` (e.g. its batch size), in rank order."""
    world = world_and_rank()[0]
    if world == 1:
        return [n]
    mine = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine)
    return [int(s) for s in sizes]


def all_gather_rows(x: Tensor, sizes: Sequence[int]) -> Tensor:
    """Concatenation of every rank's ``x`` along dim 0 (rank ``r`` has ``sizes[r]`` rows), no gradient."""
    if len(sizes) == 1:
        return x
    x = x.detach().contiguous()
    longest = max(sizes)
    if x.shape[0] < longest:  # all_gather needs equal shapes: pad, then cut
        x = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _AllGatherWithGrad(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int], rank: int, scale: float) -> Tensor:
        ctx.sizes, ctx.rank, ctx.scale = sizes, rank, scale
        return all_gather_rows(x, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        mine = total[start:start + ctx.sizes[ctx.rank]]
        return (mine * ctx.scale if ctx.scale != 1.0 else mine), None, None, None


def all_gather_with_grad(x: Tensor, scale: float = 1.0) -> tuple[Tensor, list[int]]:
    """Every rank's rows of ``x`` (batch sizes may differ) and the per-rank row counts.

    Backward: the gradient of the gathered tensor is summed over the ranks and each rank gets
    its own rows, times ``scale`` (``world`` when DDP later *averages* the backbone gradients).
    On one process: ``(x, [len(x)])``.
    """
    world, rank = world_and_rank()
    sizes = gather_sizes(x.shape[0], x.device)
    if world == 1:
        return x, sizes
    return _AllGatherWithGrad.apply(x, sizes, rank, scale), sizes


def exclude_from_ddp(module: nn.Module, names: Sequence[str]) -> list[str]:
    """Keep DDP off the parameters/buffers ``names`` (fully qualified in ``module``): DDP neither
    broadcasts nor all-reduces them. Adds to names already excluded; call before DDP wraps
    ``module``. Returns the full list."""
    from torch.nn.parallel import DistributedDataParallel

    ignored = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    ignored += [n for n in names if n not in ignored]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
    return ignored
