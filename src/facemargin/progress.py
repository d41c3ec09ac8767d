"""What a training run prints while it runs: a log a person can follow anywhere.

* :func:`progress_bar` (``callbacks.progress_bar`` in ``conf/callbacks/default.yaml``): Lightning's
  rich bar when the output is a terminal; otherwise (batch jobs, output redirected to a file,
  where a bar prints nothing until the end) :class:`PlainProgress`, one plain log line every N
  optimizer steps, as insightface's arcface_torch prints::

      epoch 2/6  step 80/222  412.3 samples/s  loss 23.1573  lr 0.05975  ETA 0:01:23

  and one line per validation with its accuracies.
* :func:`one_log_stream`: Lightning's messages go once, through the run's log (Lightning adds its
  own console handler besides, which printed each of them a second time), without its
  advertisement and its "100% of the batches will be used" notes.
* :func:`warnings_once`: during a run every warning is shown once (the first time; Python shows a
  warning again whenever anything changes the warning filters, and every DataLoader worker shows
  its own) and goes through logging, so it also lands in the run's log file.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import sys
import time
import warnings
from typing import Any, Iterator

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

__all__ = ["PlainProgress", "one_log_stream", "progress_bar", "warnings_once"]

log = logging.getLogger(__name__)


def _is_terminal() -> bool:
    stream = sys.stdout
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


def progress_bar(plain: bool | str = "auto", every_n_steps: int = 10, **rich_kwargs: Any) -> ProgressBar:
    """The rich bar in a terminal, :class:`PlainProgress` elsewhere (``plain="auto"``); ``plain=true`` /
    ``false`` forces one. ``rich_kwargs`` go to ``RichProgressBar``."""
    choice = str(plain).lower()
    if choice not in ("auto", "true", "false"):
        from .errors import UserError

        raise UserError(f"callbacks.progress_bar.plain={plain!r}: expected auto, true or false")
    use_plain = choice == "true" or (choice == "auto" and not _is_terminal())
    return PlainProgress(every_n_steps) if use_plain else RichProgressBar(**rich_kwargs)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (images, or labels when the images
    travel encoded, as with ``data.decode=gpu``)."""
    for item in batch if isinstance(batch, (list, tuple)) else [batch]:
        shape = getattr(item, "shape", None)
        if shape:
            return int(shape[0])
    return 0


class PlainProgress(ProgressBar):
    """One log line every ``every_n_steps`` optimizer steps and one per validation (global rank 0).

    samples/s counts the samples of every rank since the previous line; the loss is the mean over
    those steps; ETA is the average time per step since training started (validation included)
    times the steps left.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        super().__init__()
        if int(every_n_steps) < 1:
            from .errors import UserError

            raise UserError(f"callbacks.progress_bar.every_n_steps={every_n_steps}: must be >= 1")
        self.every_n_steps = int(every_n_steps)
        self._enabled = True
        self._reset(time.monotonic(), 0)

    def _reset(self, now: float, step: int) -> None:
        self._start, self._start_step = now, step
        self._since, self._samples, self._loss_sum, self._loss_n = now, 0, 0.0, 0
        self._printed_step = step

    # ---- ProgressBar interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    # ---- training
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset(time.monotonic(), trainer.global_step)
        total = trainer.estimated_stepping_batches
        self._total = int(total) if math.isfinite(total) else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._loss_sum = self._loss_sum + loss.detach()  # summed lazily: no device sync every step
            self._loss_n += 1
        self._samples += _batch_size(batch) * trainer.world_size
        step = trainer.global_step
        if step % self.every_n_steps or step == self._printed_step:
            return
        if self._enabled and trainer.is_global_zero:
            log.info(self.line(trainer))
        self._printed_step, self._since, self._samples, self._loss_sum, self._loss_n = step, time.monotonic(), 0, 0.0, 0

    def line(self, trainer: pl.Trainer) -> str:
        """``epoch E/N  step S/T  X samples/s  loss L  lr R  ETA H:MM:SS`` for the steps since the last line."""
        now = time.monotonic()
        step = trainer.global_step
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        parts = [f"epoch {trainer.current_epoch + 1}" + (f"/{epochs}" if epochs else ""),
                 f"step {step}" + (f"/{self._total}" if self._total else "")]
        rate = self._samples / max(now - self._since, 1e-9)
        parts.append(f"{rate:.1f} samples/s")
        if self._loss_n:
            parts.append(f"loss {float(self._loss_sum) / self._loss_n:.4f}")
        optimizers = trainer.optimizers
        if optimizers:
            parts.append(f"lr {optimizers[0].param_groups[0]['lr']:.5g}")
        done = step - self._start_step
        if self._total and done > 0:
            parts.append(f"ETA {_duration((now - self._start) / done * (self._total - step))}")
        return "  ".join(parts)

    # ---- validation
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not (self._enabled and trainer.is_global_zero):
            return
        metrics = trainer.callback_metrics
        shown = [f"{k} {float(v):.4f}" for k, v in sorted(metrics.items())
                 if k.startswith("val/") and k.endswith("acc") and v.numel() == 1]
        if shown:
            log.info("validation at epoch %d, step %d: %s", trainer.current_epoch + 1, trainer.global_step,
                     "  ".join(shown))


# --------------------------------------------------------------------------- warnings
@contextlib.contextmanager
def warnings_once() -> Iterator[None]:
    """Within the block, each distinct warning (category and message) is logged once, on the
    ``py.warnings`` logger, as one line: ``UserWarning: <message> (file:line)``."""
    seen: set[tuple[type, str]] = set()
    previous = warnings.showwarning
    pywarnings = logging.getLogger("py.warnings")

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        key = (category, str(message))
        if key in seen:
            return
        seen.add(key)
        pywarnings.warning("%s: %s (%s:%d)", category.__name__, message, filename, lineno)

    warnings.showwarning = show  # the filters stay as they are: only what they let through is shown, once
    try:
        yield
    finally:
        warnings.showwarning = previous


# --------------------------------------------------------------------------- Lightning's messages
_NOISE = ("💡 Tip:", "was configured so 100% of the batches")


def _not_noise(record: logging.LogRecord) -> bool:
    return not str(record.getMessage()).lstrip().startswith(_NOISE[0]) and _NOISE[1] not in str(record.msg)


def one_log_stream() -> None:
    """When the root logger has handlers (Hydra's: the console and the run's log file), drop the
    console handler the ``lightning`` package adds at import, so that each of its messages is
    printed once; filter out its advertisement and its 100%-of-the-batches notes."""
    lightning_logger = logging.getLogger("lightning")
    if logging.getLogger().handlers:
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        target = logging.getLogger(name)
        if _not_noise not in target.filters:
            target.addFilter(_not_noise)
