"""Exact resume on CPU: a run killed with SIGKILL at a random step and resumed from ``last.ckpt``
(step checkpoints on) logs the uninterrupted run's per-step losses and ends with its weights, bit
for bit, for the default head with a user's augmentation and for Partial FC with centre sampling,
with 0 and 2 DataLoader workers (each case is killed with one count and resumed with the other: the
data does not depend on it). The backbone has dropout and the augmentation draws from the global
torch RNG, so the RNG states in the checkpoint matter; the learning rate changes every step, so the
optimizer and scheduler states do; ``metrics.csv`` of the resumed run folder holds every step and
every epoch once."""

from __future__ import annotations

import random
import signal

import pytest
import torch

from conftest import (
    TINY_CASES,
    TINY_RUN,
    TINY_STEPS_PER_EPOCH,
    last_ckpt,
    signal_at_step,
    step_losses,
    train_in_process,
    validated_epochs,
)

TOTAL_STEPS = 2 * TINY_STEPS_PER_EPOCH


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


@pytest.mark.slow
@pytest.mark.parametrize(("case", "killed_workers", "resumed_workers"), [("augment", 0, 2), ("partial_fc", 2, 0)])
def test_sigkilled_run_resumes_exactly(tiny_reference, tmp_path, case, killed_workers, resumed_workers):
    overrides = [*TINY_RUN, *TINY_CASES[case], "callbacks.last.every_n_train_steps=1"]
    run_dir = tmp_path / "run"
    step = random.Random(case).randint(1, TOTAL_STEPS - 4)
    code, seen = signal_at_step(run_dir, [*overrides, f"data.num_workers={killed_workers}"], step, signal.SIGKILL)
    assert code == -signal.SIGKILL
    resumed_from = last_ckpt(run_dir)["global_step"]
    assert 0 < resumed_from < TOTAL_STEPS

    train_in_process(run_dir, *overrides, f"data.num_workers={resumed_workers}",
                     f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    losses, weights = tiny_reference(case)
    assert losses != tiny_reference("default")[0]  # the augmentation / the sampled centres change the run
    where = f"killed after step {seen}, resumed from global step {resumed_from}"
    assert step_losses(run_dir) == losses, where  # every step once, each loss bit-identical
    assert_same_weights(last_ckpt(run_dir)["state_dict"], weights)
    assert validated_epochs(run_dir) == [0, 1], where  # metrics.csv continued: every epoch once


@pytest.mark.slow
def test_resume_from_an_epoch_end_checkpoint_is_exact(tiny_reference, tmp_path):
    """``last.ckpt`` written after an epoch's validation continues exactly too, with 2 workers (a
    constant learning rate: a 1-epoch run is then the first epoch of the 2-epoch reference)."""
    overrides = [*TINY_RUN, *TINY_CASES["constant_lr"], "data.num_workers=2"]
    train_in_process(tmp_path, *overrides, "trainer.max_epochs=1")
    saved = last_ckpt(tmp_path)
    assert saved["global_step"] == TINY_STEPS_PER_EPOCH
    (state,) = saved["rng_states"]  # one rank; plain tensors / ints / lists (loaded with weights_only=True)
    assert state["torch"].dtype == torch.uint8 and state["numpy"]["keys"].shape == (624,)
    assert len(state["python"]["internal"]) == 625

    train_in_process(tmp_path, *overrides, f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}")
    losses, weights = tiny_reference("constant_lr")
    assert step_losses(tmp_path) == losses
    assert_same_weights(last_ckpt(tmp_path)["state_dict"], weights)
    assert validated_epochs(tmp_path) == [0, 1]
