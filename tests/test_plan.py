"""The epoch plan: a pure function of counters; exact resume across world and batch sizes."""

from __future__ import annotations

import numpy as np
import pytest

from facemargin.data.loading.plan import (
    EpochPlan,
    PlanMismatchError,
    PlanSpec,
    base_order,
    hash_uniform,
    planned_samples,
)

SPECS = [PlanSpec(seed=3), PlanSpec(seed=3, streaming=True, chunk=5, window=24)]
IDS = ["map", "stream"]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_base_order_is_a_seeded_permutation(spec: PlanSpec) -> None:
    for n in (0, 1, 7, 103):
        order = base_order(spec, 2, n)
        assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(n))
        assert np.array_equal(order, base_order(spec, 2, n))  # pure
    a, b = base_order(spec, 0, 103), base_order(spec, 1, 103)
    assert not np.array_equal(a, b)
    if spec.streaming:  # blocks of `chunk` neighbouring samples stay together, in storage order
        starts = np.flatnonzero(np.diff(a) != 1) + 1
        runs = np.split(a, starts)
        assert all(r[0] % spec.chunk == 0 and len(r) <= 103 for r in runs)
        assert {len(r) for r in runs} <= {5, 10, 15, 20, 25, 30, 3, 8, 13, 18, 23}  # whole blocks (last one 3)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_disjoint_equal_and_cover_all_but_the_tail(spec: PlanSpec, world: int) -> None:
    n, batch = 103, 4
    plan = EpochPlan.start(spec, 1, n, world, batch)
    seqs = [plan.sequence(r) for r in range(world)]
    nb = n // (world * batch)
    assert plan.num_batches() == nb and all(s.size == nb * batch for s in seqs)
    flat = np.concatenate(seqs)
    assert np.unique(flat).size == flat.size == nb * batch * world
    assert np.array_equal(np.sort(flat), planned_samples(spec, 1, n, world, batch))
    if spec.streaming:  # the shuffle window mixes, but only within its own samples
        for s in seqs:
            for w in range(0, s.size, spec.window):
                assert set(s[w: w + spec.window]) != set() and len(set(s[w: w + spec.window])) == len(s[w: w + spec.window])


def test_hash_uniform_counters() -> None:
    u = hash_uniform(1, 2, np.arange(10000))
    assert u.dtype == np.float64 and 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02
    assert np.array_equal(u, hash_uniform(1, 2, np.arange(10000)))
    assert np.array_equal(u[5:9], hash_uniform(1, 2, np.arange(5, 9)))  # per index, not per position
    assert not np.array_equal(u, hash_uniform(1, 3, np.arange(10000)))
    assert not np.array_equal(u, hash_uniform(2, 2, np.arange(10000)))


def _consume(plan: EpochPlan, batches: int) -> list[int]:
    out = [plan.sequence(r)[plan.consumed * plan.batch: (plan.consumed + batches) * plan.batch] for r in range(plan.world)]
    plan.segments[-1][2] += batches
    return np.concatenate(out).tolist()


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("resume_with", [(2, 4), (1, 4), (3, 4), (2, 3), (3, 5)])
def test_resume_with_other_world_or_batch_is_exact(spec: PlanSpec, resume_with: tuple[int, int]) -> None:
    n = 211
    plan = EpochPlan.start(spec, 4, n, 2, 4)
    seen = _consume(plan, 7)
    state = plan.state_dict()
    world, batch = resume_with
    resumed = EpochPlan.from_state(state, spec, n, world, batch)
    assert resumed.epoch == 4 and resumed.consumed == (7 if (world, batch) == (2, 4) else 0)
    rest = _consume(resumed, resumed.num_batches() - resumed.consumed)
    together = seen + rest
    assert len(together) == len(set(together))  # nothing repeated
    left_out = set(range(n)) - set(together)
    assert len(left_out) < max(world * batch, 2 * 4)  # only the tail no whole batch can hold
    assert np.array_equal(np.sort(together), resumed.samples_consumed())
    if (world, batch) == (2, 4):  # same settings: exactly the uninterrupted epoch
        full = EpochPlan.start(spec, 4, n, 2, 4)
        assert sorted(together) == sorted(_consume(full, full.num_batches()))
    # stop again after 2 batches of the new segment and resume with a third setting: still exact
    again = EpochPlan.from_state(state, spec, n, world, batch)
    first = _consume(again, 2)
    third = EpochPlan.from_state(again.state_dict(), spec, n, 1, 2)
    chain = seen + first + _consume(third, third.num_batches())
    assert len(chain) == len(set(chain)) and len(set(range(n)) - set(chain)) < 2


def test_same_settings_continue_the_running_plan() -> None:
    spec = SPECS[1]
    plan = EpochPlan.start(spec, 0, 300, 2, 8)
    full = [plan.sequence(r).copy() for r in range(2)]
    plan.segments[-1][2] = 5
    resumed = EpochPlan.from_state(plan.state_dict(), spec, 300, 2, 8)
    assert resumed.consumed == 5 and all(np.array_equal(resumed.sequence(r), full[r]) for r in range(2))


def test_finished_epoch_starts_the_next_and_mismatch_is_refused() -> None:
    spec = SPECS[0]
    plan = EpochPlan.start(spec, 3, 100, 1, 10)
    plan.segments[-1][2] = plan.num_batches()
    nxt = EpochPlan.from_state(plan.state_dict(), PlanSpec(seed=9), 120, 2, 5)  # anything goes after an epoch
    assert (nxt.epoch, nxt.consumed, nxt.world, nxt.num_samples) == (4, 0, 2, 120)
    plan.segments[-1][2] = 3
    with pytest.raises(PlanMismatchError, match=r"inside epoch 3 .*number of samples: 100 -> 120"):
        EpochPlan.from_state(plan.state_dict(), spec, 120, 1, 10)
    with pytest.raises(PlanMismatchError, match=r"seed: 3 -> 4"):
        EpochPlan.from_state(plan.state_dict(), PlanSpec(seed=4), 100, 1, 10)
    assert EpochPlan.from_state(plan.state_dict(), spec, 100, 1, 10).consumed == 3
    with pytest.raises(PlanMismatchError, match="malformed"):
        EpochPlan.from_state({**plan.state_dict(), "segments": [[1, 10]]}, spec, 100, 1, 10)


def test_plan_at_scale_is_numpy_and_fast() -> None:
    spec = PlanSpec(seed=0, streaming=True)
    plan = EpochPlan.start(spec, 0, 5_000_000, 8, 128)
    seq = plan.sequence(3)
    assert seq.dtype == np.int64 and seq.size == (5_000_000 // 1024) * 128
