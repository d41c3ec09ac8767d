"""``benchmarks/gpu_check.sh``: refuses to run without CUDA or an output folder, and its
``--dry-run`` runs every piece (tiny, on the CPU) through to the one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def gpu_check(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def test_needs_an_output_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_OUT"}
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env={**env, "PYTHON": sys.executable})
    assert res.returncode == 2
    assert "no output folder" in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_fails_fast_and_clearly_without_cuda(tmp_path):
    res = gpu_check(str(tmp_path / "out"), timeout=120)
    assert res.returncode == 3
    assert "no CUDA device (torch.cuda.is_available() is False" in res.stderr and "--dry-run" in res.stderr
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


@pytest.mark.slow
def test_dry_run_runs_every_piece_into_one_table(tmp_path):
    out = tmp_path / "out"
    res = gpu_check("--dry-run", env={"GPU_CHECK_OUT": str(out), "GPU_CHECK_CACHE": str(tmp_path / "cache"),
                                      "WANDB_MODE": "offline"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    docs = json.loads((out / "gpu_check.json").read_text())
    assert [d["benchmark"] for d in docs] == ["head_overhead", "gpu_decode", "gpu_train", "partial_fc_memory"]
    rows = [r for d in docs for r in d["rows"]]
    figures = [r["figure"] for r in rows]
    assert figures.count("head overhead") == 3  # arcface, arcface dynamic, curricularface
    assert figures.count("JPEG decode") == 2
    assert figures.count("training samples/s") == 5  # the baseline, device decode, fp32, channels-last, compile
    assert figures.count("Partial FC memory") == 3
    train = [r for r in rows if r["figure"] == "training samples/s"]
    assert all(r["value"] and r["value"] > 0 for r in train)
    assert [r["value"] for r in rows if r["figure"] == "Partial FC memory"] == [None] * 3  # no CUDA, no figure
    table = (out / "gpu_check.md").read_text()
    assert table.count("\n|") == len(rows) + 2 and "compile" in table  # + header and rule
    assert "gpu_check: " in (out / "gpu_check.log").read_text()
