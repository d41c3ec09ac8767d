"""Stopping a run with a signal: SIGTERM (a scheduler), SIGUSR1 (SLURM's warning), and Lightning's
SLURM auto-requeue. The run saves ``last.ckpt``, says where it is and how to resume, and exits
with 128 + the signal number, so the scheduler does not record a success."""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (
    TINY_RUN,
    TINY_STEPS_PER_EPOCH,
    last_ckpt,
    signal_at_step,
    step_losses,
    train_in_process,
    validated_epochs,
)

TOTAL_STEPS = 2 * TINY_STEPS_PER_EPOCH


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    """Until the training subprocess ``proc`` has logged ``step`` in ``run_dir/metrics.csv`` (or ended)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if step_losses(run_dir)[-1][0] >= step:
                return
        except (FileNotFoundError, IndexError, KeyError, ValueError):
            pass
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_the_printed_command_finishes_the_run(tiny_reference, demo_env, tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY_RUN, "data.num_workers=0", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "facemargin.train", *args], cwd=tmp_path, env=demo_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(proc, run_dir, 3)  # no step checkpoints: the last.ckpt is the one the signal saves
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    saved = last_ckpt(run_dir)
    assert 3 < saved["global_step"] < TOTAL_STEPS  # the step it was stopped at, not an epoch end
    assert f"stopped by SIGTERM at epoch {saved['epoch']}, step {saved['global_step']}" in out, out[-3000:]
    assert f"the state is saved in {run_dir / 'checkpoints' / 'last.ckpt'}; exiting with status 143" in out
    lines = out.splitlines()
    command = lines[lines.index(next(x for x in lines if x.endswith("Resume with:"))) + 1].strip()
    assert command.startswith("python -m facemargin.train ") and f"ckpt_path={run_dir}/checkpoints/last.ckpt" in command

    argv = shlex.split(command)
    resumed = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=demo_env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == TOTAL_STEPS
    losses, _ = tiny_reference("default")
    assert step_losses(run_dir) == losses  # the SIGTERM checkpoint continues exactly
    assert validated_epochs(run_dir) == [0, 1]


@pytest.mark.slow
def test_sigusr1_without_slurm_requeue_stops_like_sigterm(demo_env, tmp_path):
    code, seen = signal_at_step(tmp_path, [*TINY_RUN, "data.num_workers=0", "callbacks.last.every_n_train_steps=1"],
                                2, signal.SIGUSR1)
    assert code == 128 + signal.SIGUSR1
    assert last_ckpt(tmp_path)["global_step"] >= seen + 1


@pytest.mark.slow
def test_slurm_auto_requeue_still_works(tiny_reference, tmp_path, monkeypatch):
    """Lightning's SLURM handler owns SIGUSR1: it saves ``hpc_ckpt_1.ckpt`` in the run folder (at the
    end of the step, where facemargin runs it) and calls ``scontrol requeue``; the SIGTERM that
    follows saves ``last.ckpt`` and exits 143; the requeued job (same folder, no ``ckpt_path``)
    resumes from the HPC checkpoint and finishes exactly as an uninterrupted run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    scontrol = bin_dir / "scontrol"  # stand-in for SLURM's scontrol (no SLURM here): records its arguments
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "facemargin", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run_dir = tmp_path / "run"
    overrides = [*TINY_RUN, "data.num_workers=0", "callbacks.last.every_n_train_steps=1"]

    def usr1_then_term(pid: int) -> None:
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while not calls.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(pid, signal.SIGTERM)

    code, _ = signal_at_step(run_dir, overrides, 2, env=slurm, send=usr1_then_term)
    assert code == 128 + signal.SIGTERM
    assert calls.read_text().split() == ["requeue", "4242"]
    assert (run_dir / "hpc_ckpt_1.ckpt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()

    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    train_in_process(run_dir, *overrides)  # the requeued job: Lightning finds hpc_ckpt_1.ckpt itself
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == TOTAL_STEPS
    assert step_losses(run_dir) == tiny_reference("default")[0]
    assert validated_epochs(run_dir) == [0, 1]


@pytest.mark.slow
def test_ctrl_c_saves_a_resumable_last_ckpt_and_the_resume_line_comes_once_it_exists(tiny_reference, demo_env, tmp_path):
    """Ctrl-C in a terminal reaches the whole process group (the run and its DataLoader workers): the
    step in progress ends, ``last.ckpt`` is saved, the run exits 130, and the printed command resumes
    it exactly. The resume line appears only after a ``last.ckpt`` exists."""
    run_dir = tmp_path / "run"
    args = [*TINY_RUN, "data.num_workers=2", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "facemargin.train", *args], cwd=tmp_path, env=demo_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_step(proc, run_dir, 3)  # step 3 of the first epoch: no last.ckpt yet
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    saved = last_ckpt(run_dir)
    assert 3 < saved["global_step"] < TOTAL_STEPS
    assert "Ctrl-C: stopping after this step and saving last.ckpt" in out
    assert f"stopped by SIGINT at epoch {saved['epoch']}, step {saved['global_step']}" in out, out[-3000:]
    lines = out.splitlines()
    first_resume = next(i for i, line in enumerate(lines) if "resume with" in line.lower())
    assert first_resume > next(i for i, line in enumerate(lines) if "Ctrl-C: stopping" in line)  # not at start-up
    command = lines[lines.index(next(x for x in lines if x.endswith("Resume with:"))) + 1].strip()
    resumed = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=tmp_path, env=demo_env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    losses, _ = tiny_reference("default")
    assert step_losses(run_dir) == losses  # the Ctrl-C checkpoint continues exactly
