"""The epoch plan: which samples each rank trains on, in which order, from counters alone.

An epoch's plan is a pure function of ``(seed, epoch, number of samples, world size, batch
size)`` plus the ordering options of :class:`PlanSpec` -- never of the number of DataLoader
workers (workers only execute the batches the plan lists), never of a global RNG.

1. **Base order** of all ``n`` samples (:func:`base_order`): a seeded permutation (map-style), or
   for streaming a seeded permutation of *blocks* of ``chunk`` neighbouring samples (storage
   order), so reads stay sequential within a block.
2. **Ranks** take equal contiguous spans of the base order: ``n // (world * batch)`` batches each
   (the tail of fewer than ``world * batch`` samples is left out, so every rank runs the same
   number of steps and the cross-rank gathers of the head never hang).
3. **Mixing** (streaming): each rank's span is cut into windows of ``window`` samples and each
   window is shuffled (the shuffle buffer, defined on indices instead of arrival order).
4. Batches are consecutive ``batch`` samples of a rank's sequence.

Resume state = the plan's inputs and, per *segment*, ``(world, batch, batches consumed)``. With
the same world and batch size the epoch simply continues after the consumed batches. With another
world size or batch size the rest of the epoch is re-planned exactly: the samples the earlier
segments consumed are removed from the base order and the remainder is planned again as in steps
2-4, so over the epoch nothing is repeated and nothing is skipped but the usual tail of fewer than
``world * batch`` samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ...errors import UserError

__all__ = ["PlanSpec", "EpochPlan", "base_order", "hash_uniform", "planned_samples", "PlanMismatchError"]

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


class PlanMismatchError(UserError, ValueError):
    """A checkpoint's data plan cannot continue with this run's data settings."""


@dataclass(frozen=True)
class PlanSpec:
    """Ordering options (besides seed, epoch, sizes).

    Args:
        seed: base seed of every permutation.
        streaming: ``False``: full permutation (random reads). ``True``: permuted blocks of
            ``chunk`` neighbouring samples mixed within windows of ``window`` samples.
        chunk: samples per block (streaming): the unit of sequential reads.
        window: samples shuffled together (streaming): bounds the bytes held in memory.
    """

    seed: int = 0
    streaming: bool = False
    chunk: int = 32
    window: int = 32768

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.window < 1:
            raise ValueError(f"chunk and window must be >= 1, got chunk={self.chunk}, window={self.window}")

    def as_dict(self) -> dict[str, int]:
        return {"seed": int(self.seed), "streaming": int(self.streaming), "chunk": int(self.chunk),
                "window": int(self.window)}


def _rng(*counters: int) -> np.random.Generator:
    return np.random.default_rng([int(c) & 0xFFFFFFFF for c in counters] + [len(counters)])


def base_order(spec: PlanSpec, epoch: int, n: int) -> np.ndarray:
    """Every sample once, in the epoch's order (int64 ``[n]``); the same on every rank."""
    rng = _rng(spec.seed, epoch, 0xBA5E)
    if not spec.streaming:
        return rng.permutation(n).astype(np.int64, copy=False)
    blocks = -(-n // spec.chunk)
    starts = rng.permutation(blocks).astype(np.int64) * spec.chunk
    lengths = np.minimum(spec.chunk, n - starts)
    # sample j of the output is starts[b] + (j - first output position of block b)
    first = np.cumsum(lengths) - lengths
    return np.repeat(starts - first, lengths) + np.arange(n, dtype=np.int64)


def hash_uniform(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """Uniform ``[0, 1)`` per index from ``(seed, epoch, index)`` (splitmix64): no RNG state anywhere."""
    x = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        for value in (seed, epoch):
            x = x * np.uint64(0x9E3779B97F4A7C15) + np.uint64(int(value) & 0xFFFFFFFFFFFFFFFF)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass
class EpochPlan:
    """One epoch's plan and how far it got.

    ``segments`` lists ``[world, batch, batches_consumed]`` per stretch of the epoch run with one
    world size and batch size; the last one is running. Use :meth:`sequence` for a rank's samples
    in the running segment.
    """

    spec: PlanSpec
    epoch: int
    num_samples: int
    segments: list[list[int]] = field(default_factory=list)
    _cache: dict[Any, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def start(cls, spec: PlanSpec, epoch: int, num_samples: int, world: int, batch: int) -> "EpochPlan":
        """A fresh epoch for ``world`` ranks of ``batch`` samples."""
        if world < 1 or batch < 1:
            raise ValueError(f"world size and batch size must be >= 1, got {world} and {batch}")
        return cls(spec, int(epoch), int(num_samples), [[int(world), int(batch), 0]])

    # ---- the plan
    @property
    def world(self) -> int:
        return self.segments[-1][0]

    @property
    def batch(self) -> int:
        return self.segments[-1][1]

    @property
    def consumed(self) -> int:
        """Batches of the running segment already consumed (per rank)."""
        return self.segments[-1][2]

    def _pool(self) -> np.ndarray:
        """Samples the running segment plans over: the base order minus earlier segments' consumption."""
        key = ("pool", len(self.segments))
        if key not in self._cache:
            pool = base_order(self.spec, self.epoch, self.num_samples)
            for k, (world, batch, used) in enumerate(self.segments[:-1]):
                taken = np.concatenate([self._rank_sequence(pool, k, world, batch, r)[: used * batch] for r in range(world)])
                pool = pool[~np.isin(pool, taken, assume_unique=True)]
            self._cache.clear()
            self._cache[key] = pool
        return self._cache[key]

    def _rank_sequence(self, pool: np.ndarray, segment: int, world: int, batch: int, rank: int) -> np.ndarray:
        per = (pool.size // (world * batch)) * batch
        span = pool[rank * per: (rank + 1) * per]
        if not self.spec.streaming or span.size == 0:
            return span
        rng = _rng(self.spec.seed, self.epoch, segment, rank, 0x313)
        window = np.arange(span.size, dtype=np.int64) // self.spec.window
        return span[np.argsort(window + rng.random(span.size), kind="stable")]

    def num_batches(self) -> int:
        """Batches per rank in the running segment (from its start)."""
        return int(self._pool().size // (self.world * self.batch))

    def epoch_batches(self) -> int:
        """Batches per rank over the whole epoch: earlier segments' consumed ones + the running segment's."""
        return sum(used for _, _, used in self.segments[:-1]) + self.num_batches()

    def sequence(self, rank: int) -> np.ndarray:
        """``rank``'s samples in the running segment, batch after batch (from the segment's start)."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside world size {self.world}")
        key = ("seq", len(self.segments), rank)
        if key not in self._cache:
            self._cache[key] = self._rank_sequence(self._pool(), len(self.segments) - 1, self.world, self.batch, rank)
        return self._cache[key]

    @property
    def exhausted(self) -> bool:
        return self.consumed >= self.num_batches()

    # ---- resume
    def state_dict(self) -> dict[str, Any]:
        """Plain ints and lists (checkpoints load with ``weights_only=True``)."""
        return {"epoch": self.epoch, "num_samples": self.num_samples, **self.spec.as_dict(),
                "segments": [list(map(int, s)) for s in self.segments]}

    @classmethod
    def from_state(cls, state: dict[str, Any], spec: PlanSpec, num_samples: int, world: int,
                   batch: int) -> "EpochPlan":
        """Continue a saved plan with this run's settings.

        The same world size and batch size continue the running segment; others open a new
        segment over the exact remainder. A finished epoch starts the next one. A plan made for
        other data (sample count, seed, ordering) cannot continue mid-epoch:
        :class:`PlanMismatchError` says which setting changed.
        """
        saved_spec = PlanSpec(int(state["seed"]), bool(state["streaming"]), int(state["chunk"]), int(state["window"]))
        plan = cls(saved_spec, int(state["epoch"]), int(state["num_samples"]), [list(map(int, s)) for s in state["segments"]])
        if not plan.segments or any(len(s) != 3 or min(s) < 0 for s in plan.segments):
            raise PlanMismatchError(f"malformed data-loader state in the checkpoint: {state!r}")
        changed = [f"{name}: {old} -> {new}" for name, old, new in (
            ("number of samples", plan.num_samples, num_samples),
            *((k, v, spec.as_dict()[k]) for k, v in saved_spec.as_dict().items()))
            if old != new]
        if plan.exhausted:
            return cls.start(spec, plan.epoch + 1, num_samples, world, batch)
        if not any(used for _, _, used in plan.segments):
            return cls.start(spec, plan.epoch, num_samples, world, batch)
        if changed:
            raise PlanMismatchError(
                f"the checkpoint stopped inside epoch {plan.epoch} with another data plan ({'; '.join(changed)}); "
                "resume with the data settings it was saved with, or resume from an end-of-epoch checkpoint"
            )
        if (world, batch) != (plan.world, plan.batch):
            plan.segments.append([int(world), int(batch), 0])
        return plan

    def samples_consumed(self) -> np.ndarray:
        """Every sample consumed so far in this epoch (all ranks, all segments), sorted."""
        parts = []
        for k, (world, batch, used) in enumerate(self.segments):
            sub = EpochPlan(self.spec, self.epoch, self.num_samples, [list(s) for s in self.segments[: k + 1]])
            parts += [sub.sequence(r)[: used * batch] for r in range(world)]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def planned_samples(spec: PlanSpec, epoch: int, num_samples: int, world: int, batch: int,
                    segments: Sequence[Sequence[int]] = ()) -> np.ndarray:
    """Everything an epoch trains on over all ranks when run to the end (sorted), for checks and tests."""
    plan = EpochPlan(spec, epoch, num_samples, [list(s) for s in segments] or [[world, batch, 0]])
    plan.segments[-1][2] = plan.num_batches()
    return plan.samples_consumed()
