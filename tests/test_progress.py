"""A log a person can follow anywhere: plain lines without a terminal, the rich bar in one, each
warning once, and ``metrics.csv`` with every logger."""

from __future__ import annotations

import logging
import os
import pty
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import RichProgressBar

from conftest import TINY_RUN, metrics_rows
from facemargin.progress import PlainProgress, progress_bar, warnings_once

#: TINY_RUN with the configured progress callback (TINY_RUN removes it)
TINY_WITH_PROGRESS = [a for a in TINY_RUN if "progress_bar" not in a] + ["data.num_workers=0"]
LINE = re.compile(r"epoch (\d+)/2  step (\d+)/12  [\d.]+ samples/s  loss [\d.]+  lr [\d.e+-]+  ETA \d+:\d\d:\d\d$")


def train(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facemargin.train", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.slow
def test_without_a_terminal_a_plain_line_every_n_steps(demo_env, tmp_path):
    run_dir = tmp_path / "run"
    proc = train(*TINY_WITH_PROGRESS, "callbacks.progress_bar.every_n_steps=4", f"hydra.run.dir={run_dir}",
                 cwd=tmp_path, env=demo_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [LINE.search(line) for line in proc.stdout.splitlines()]
    steps = [(int(m.group(1)), int(m.group(2))) for m in found if m]
    assert steps == [(1, 4), (2, 8), (2, 12)], proc.stdout[-3000:]
    validations = [ln for ln in proc.stdout.splitlines() if "validation at epoch" in ln]
    assert len(validations) == 2 and re.search(r"val/acc 0\.\d{4}", validations[0])
    log_file = (run_dir / "train.log").read_text()  # the same lines are in the run's log
    assert sum(bool(LINE.search(ln)) for ln in log_file.splitlines()) == 3
    assert "━" not in proc.stdout  # no rich bar drawn into a file


@pytest.mark.slow
def test_in_a_terminal_the_rich_bar(demo_env, tmp_path):
    """stdout a pseudo-terminal: Lightning's rich bar, no plain lines."""
    primary, secondary = pty.openpty()
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "facemargin.train", *TINY_WITH_PROGRESS,
                             "callbacks.progress_bar.every_n_steps=4", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env={**demo_env, "COLUMNS": "120"}, stdout=secondary, stderr=subprocess.PIPE)
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=600)
    os.close(primary)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, text[-3000:]
    assert "━" in text and not any(LINE.search(ln) for ln in text.replace("\r", "\n").splitlines())


def test_progress_bar_choice():
    assert isinstance(progress_bar(plain="true"), PlainProgress)
    assert isinstance(progress_bar(plain="false"), RichProgressBar)
    assert isinstance(progress_bar(plain="auto"), PlainProgress) == (not sys.stdout.isatty())
    from facemargin.errors import UserError

    with pytest.raises(UserError, match="callbacks.progress_bar.plain='sometimes': expected auto, true or false"):
        progress_bar(plain="sometimes")
    with pytest.raises(UserError, match="every_n_steps=0: must be >= 1"):
        PlainProgress(every_n_steps=0)


def test_each_warning_once_per_run_even_when_the_filters_change(caplog):
    """Python shows a warning again after anything touches the warning filters (libraries do, e.g.
    ``warnings.catch_warnings``); within a run it is shown once, through logging."""
    def warn() -> None:
        warnings.warn("tar@far=1e-4 is null: this set has 135 negative pairs", UserWarning, stacklevel=1)

    with caplog.at_level(logging.WARNING, logger="py.warnings"), warnings_once():
        for _ in range(3):
            warn()
            with warnings.catch_warnings():  # what libraries do between two validations
                warnings.simplefilter("default")
        warnings.warn("another one", RuntimeWarning)
    messages = [r.getMessage() for r in caplog.records if r.name == "py.warnings"]
    assert len(messages) == 2
    assert messages[0].startswith("UserWarning: tar@far=1e-4 is null: this set has 135 negative pairs (")
    assert messages[1].startswith("RuntimeWarning: another one (")


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["tensorboard", "wandb", "none"])
def test_metrics_csv_with_every_logger(logger, demo_env, tmp_path):
    run_dir = tmp_path / "run"
    proc = train(*TINY_RUN, "trainer.max_epochs=1", "data.num_workers=0", f"logger={logger}",
                 f"hydra.run.dir={run_dir}", cwd=tmp_path, env={**demo_env, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics_rows(run_dir)
    assert [int(r["step"]) for r in rows if r.get("train/loss_step")] == list(range(6))
    assert any(r.get("val/acc") for r in rows)
    assert any(r.get("lr-SGD") for r in rows)  # the learning-rate monitor has a logger in every case
    if logger == "tensorboard":
        assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
