"""``metrics.csv`` that a resumed run continues instead of overwriting.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts, so resuming into the
same run folder lost every earlier epoch, and it writes rows to disk only every 100 steps, so a
killed run lost its last rows. :class:`MetricsCSVLogger` writes each row as it is logged and, when
the file exists, keeps its rows *before* the step the new run starts logging at: the rows the
killed run wrote after its checkpoint are replaced by the resumed run's, so every epoch appears once.
A fresh run (step 0) into a used folder therefore starts a fresh file.
"""

from __future__ import annotations

import csv
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["MetricsCSVLogger"]


class _ContinuingWriter(ExperimentWriter):
    """Keeps the rows of an earlier ``metrics.csv`` that precede this run's first logged step."""

    def _check_log_dir_exists(self) -> None:  # called by __init__ instead of deleting the file
        self._earlier: list[dict[str, str]] | None = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                self._earlier = list(csv.DictReader(fh))

    def save(self) -> None:
        if self._earlier is not None and self.metrics:
            start = min(float(m["step"]) for m in self.metrics)
            kept = [row for row in self._earlier if row.get("step") not in (None, "") and float(row["step"]) < start]
            self._earlier = None
            keys = sorted({k for row in kept for k in row} | set(self.metrics_keys))
            with self._fs.open(self.metrics_file_path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=keys)
                writer.writeheader()
                writer.writerows(kept)
            self.metrics_keys = keys
        super().save()


class MetricsCSVLogger(CSVLogger):
    """``CSVLogger`` that writes every row at once and continues an existing ``metrics.csv`` on resume."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        self.save()  # a killed run keeps every row it logged
