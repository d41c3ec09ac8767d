"""Partial FC's class-centre shards: who holds which rows, their seeded init, and checkpoints.

Rank ``r`` of ``world`` holds the classes ``[start, stop)`` of :func:`shard_bounds` (``C // world``
each, the remainder on the last rank): centre rows ``[start * K, stop * K)`` with K sub-centres.
Checkpoints hold the *consolidated* tensors: the full ``[C * K, D]`` centres and the full per-row optimizer state, assembled on rank 0's CPU by
:func:`consolidate` (a collective) and sliced back to any world size by :func:`shard`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from .partial_fc import PartialFCHead

__all__ = [
    "CHECKPOINT_KEY",
    "FULL_STATE_PREFIX",
    "consolidate",
    "gather_shards",
    "init_rows",
    "param_index",
    "shard",
    "shard_bounds",
]

#: optimizer-state key prefix of the full-shard rows kept for ``sample_rate < 1``.
FULL_STATE_PREFIX = "partial_fc_full_"
#: checkpoint key holding per-head metadata written by :func:`consolidate`.
CHECKPOINT_KEY = "partial_fc"
_INIT_BLOCK = 65536  # rows per independently seeded init block (world-size independent init)


def shard_bounds(num_classes: int, rank: int, world: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s centres: ``C // world`` each, remainder on the last."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world; got rank={rank}, world={world}")
    if num_classes < world:
        raise ValueError(f"num_classes ({num_classes}) must be >= world size ({world})")
    per = num_classes // world
    start = rank * per
    return start, (num_classes if rank == world - 1 else start + per)


def init_rows(start: int, stop: int, num_classes: int, dim: int, seed: int, std: float = 0.01) -> Tensor:
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


def param_index(optimizer: torch.optim.Optimizer, param: Tensor) -> int | None:
    """Index of ``param`` in ``optimizer.state_dict()['state']`` numbering, or None."""
    i = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p is param:
                return i
            i += 1
    return None


def gather_shards(
    shard_rows: Tensor, num_classes: int, rank: int, world: int, to_rank: int | None, per_class: int = 1,
) -> Tensor | None:
    """Full ``[C * per_class, ...]`` tensor from every rank's shard rows (``per_class`` rows per
    class). ``to_rank=None``: on every rank, on the shard's device; else only on ``to_rank`` (on
    the CPU), None elsewhere."""
    if world == 1:
        return shard_rows.detach().clone() if to_rank is None else shard_rows.detach().cpu().clone()
    shard_rows = shard_rows.detach().contiguous()
    receive = to_rank is None or rank == to_rank
    device = shard_rows.device if to_rank is None else torch.device("cpu")
    rows = num_classes * per_class
    full = torch.empty(rows, *shard_rows.shape[1:], dtype=shard_rows.dtype, device=device) if receive else None
    for src in range(world):
        start, stop = (b * per_class for b in shard_bounds(num_classes, src, world))
        buf = shard_rows if src == rank else shard_rows.new_empty(stop - start, *shard_rows.shape[1:])
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


def consolidate(
    head: PartialFCHead, checkpoint: dict, prefix: str,
    optimizers: Iterable[torch.optim.Optimizer] = (), all_ranks: bool = False,
) -> None:
    """Replace ``head``'s shard in ``checkpoint`` by the full tensors (every rank calls it).

    ``checkpoint["state_dict"][prefix + "weight"]`` and the head's per-row optimizer state in
    ``checkpoint["optimizer_states"][i]`` (``optimizers`` in the same order, e.g.
    ``trainer.optimizers``) become ``[C * K, ...]``; metadata goes to ``checkpoint["partial_fc"]``.
    Full tensors are assembled on the CPU of rank 0 only (the rank that writes) unless
    ``all_ranks``. Live tensors are never modified.
    """
    world, rank, c, per = head.world_size, head.rank, head.num_classes, head.subcenters
    to_rank = None if all_ranks else 0
    wkey = prefix + "weight"
    full = gather_shards(head.weight, c, rank, world, to_rank, per)
    if full is not None and "state_dict" in checkpoint:
        checkpoint["state_dict"][wkey] = full
    opt_meta = []
    p = head.optimizer_param
    for i, opt in enumerate(optimizers):
        pid = param_index(opt, p)
        if pid is None or "optimizer_states" not in checkpoint:
            continue
        keys = _per_row_keys(head, opt.state.get(p, {}))
        if world > 1:
            all_keys: list[Any] = [None] * world
            dist.all_gather_object(all_keys, keys)
            if any(k != keys for k in all_keys):
                raise RuntimeError(f"optimizer state keys differ across ranks: {all_keys}")
        opt_ckpt = checkpoint["optimizer_states"][i]
        states = dict(opt_ckpt["state"])
        pstate = dict(states.get(pid, {}))
        for key in keys:
            full_state = gather_shards(opt.state[p][key], c, rank, world, to_rank, per)
            if full_state is not None:
                pstate[key] = full_state
        if pid in states or keys:
            states[pid] = pstate
        opt_ckpt["state"] = states
        opt_meta.append({"optimizer": i, "param_id": pid, "keys": keys})
    meta = dict(checkpoint.get(CHECKPOINT_KEY, {}))
    meta[wkey] = {
        "num_classes": c,
        "subcenters": per,
        "embedding_size": head.embedding_size,
        "sampled": head.sampled,
        "saved_world_size": world,
        "optimizer_states": opt_meta,
    }
    checkpoint[CHECKPOINT_KEY] = meta


def shard(head: PartialFCHead, checkpoint: dict, prefix: str) -> None:
    """Slice the full tensors written by :func:`consolidate` to this rank's rows (for the
    head's current world size), in ``state_dict`` and ``optimizer_states``. No collectives."""
    wkey = prefix + "weight"
    info = checkpoint.get(CHECKPOINT_KEY, {}).get(wkey)
    w = checkpoint.get("state_dict", {}).get(wkey)
    if w is None:
        return
    per = head.subcenters
    rows = head.num_classes * per
    if info is None and head.world_size != 1:
        raise ValueError(f"{wkey} has no Partial FC metadata: save it with head.on_save_checkpoint(...)")
    if w.shape[0] != rows:
        raise ValueError(
            f"{wkey}: expected {head.num_classes} classes x {per} sub-centres = {rows} rows (consolidated); "
            f"got {tuple(w.shape)}"
        )
    lo, hi = head.start * per, head.stop * per
    checkpoint["state_dict"][wkey] = w[lo:hi].clone()
    if info is None or "optimizer_states" not in checkpoint:
        return
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
            pstate[key] = pstate[key][lo:hi].clone()
        states[m["param_id"]] = pstate
        opt_ckpt["state"] = states
