"""Callbacks that make a run trustworthy: the latest state always in ``last.ckpt``, a checkpoint
and a non-zero exit when the run is stopped by a signal, every RNG state in every checkpoint,
and the best score kept across resumes.

* :class:`LastCheckpoint` writes ``<dirpath>/last.ckpt`` (atomically: a temporary file, then a
  rename) at the end of every epoch, after validation, whether or not the score improved, and
  every ``every_n_train_steps`` optimizer steps when that is > 0. On SIGTERM (a scheduler stopping
  the job) or SIGUSR1 (SLURM's warning signal, when Lightning's SLURM auto-requeue does not own
  it) and on Ctrl-C (SIGINT) Lightning ends the step; the state is saved, the resume command logged,
  and the process exits with ``128 + signal`` (143 for SIGTERM, 130 for Ctrl-C) so the scheduler
  does not record a success. The resume command is logged once the first ``last.ckpt`` exists. When
  Lightning's SLURM auto-requeue owns SIGUSR1, its handler (HPC checkpoint, ``scontrol requeue``)
  runs at the end of the step instead of wherever the signal lands.
* :class:`RNGStateCheckpointing` (attached by :class:`~facemargin.module.FaceRecognitionModule`
  itself) saves the torch, CUDA, numpy and Python RNG states of every rank in each checkpoint
  and restores this rank's at the start of the resumed training, after every loader is set up.
* :class:`BestCheckpoint` is Lightning's ``ModelCheckpoint`` that, resumed into another run folder,
  keeps the best score and path instead of forgetting them (that folder's files are never deleted).
"""

from __future__ import annotations

import logging
import os
import random
import shlex
import signal
import threading
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["BestCheckpoint", "LastCheckpoint", "RNGStateCheckpointing", "rng_state", "set_rng_state"]

log = logging.getLogger(__name__)

#: checkpoint key of the per-rank RNG states (a list indexed by global rank).
RNG_KEY = "rng_states"


# --------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA (when initialised), numpy and Python RNG states, as plain values
    (tensors, ints, lists) that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only onto as many devices)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a one-element list on one process)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class RNGStateCheckpointing(pl.Callback):
    """Every rank's RNG states in each checkpoint; this rank's restored when resumed training starts.

    Restoring at ``on_train_start`` (not when the checkpoint is read) puts the states back after
    the loaders were built and iterated once, so whatever set-up drew from a global RNG in the
    resumed process does not shift what the uninterrupted run drew next. Collective when saving:
    every rank saves (as Lightning's ``Trainer.save_checkpoint`` does).
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = _gather(rng_state())

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(RNG_KEY)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        states, self._pending = self._pending, None
        if not states:
            return
        if len(states) != trainer.world_size:
            if trainer.is_global_zero:
                log.warning("the checkpoint holds the RNG states of %d rank(s), this run has %d: they are not "
                            "restored, so the resumed run is not an exact continuation", len(states), trainer.world_size)
            return
        set_rng_state(states[trainer.global_rank])


# --------------------------------------------------------------------------- last.ckpt and signals
class LastCheckpoint(Checkpoint):
    """``<dirpath>/last.ckpt``: the latest state, whatever the score did; saved on SIGTERM too.

    Args:
        dirpath: checkpoint folder; default ``<trainer.default_root_dir>/checkpoints``.
        every_n_train_steps: also save every N optimizer steps (0: only at epoch ends).
        filename: the file's name in ``dirpath``.
        resume_command: the command line that resumes this run, without ``ckpt_path=`` (the entry
            point sets it); logged when the run is stopped or fails.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, every_n_train_steps: int = 0,
                 filename: str = "last.ckpt", resume_command: str | None = None) -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0 (0 = only at epoch ends), got {every_n_train_steps}")
        self.dirpath = None if dirpath is None else str(dirpath)
        self.every_n_train_steps = int(every_n_train_steps)
        self.filename = filename
        self.resume_command = resume_command
        self.saved_step: int | None = None  # global step of the last save
        self.saved_epoch: int | None = None  # the epoch that save records (Lightning's current_epoch then)
        self._validated_step: int | None = None
        self._signal: int | None = None  # the signal that stopped the run
        self._handlers: dict[int, Any] = {}  # signal -> the handler to put back at teardown
        self._slurm_requeue: Any = None  # Lightning's SLURM SIGUSR1 handler, run at the next step end
        self._requeue_signal: int | None = None
        self._announced = False  # the resume command was logged

    @property
    def path(self) -> str:
        assert self.dirpath is not None, "LastCheckpoint.path is known once the trainer is set up"
        return os.path.join(self.dirpath, self.filename)

    def resume_hint(self) -> str:
        """The one-line command that continues this run from :attr:`path`."""
        if self.resume_command is None:  # not started by facemargin.train
            return f"trainer.fit(model, datamodule, ckpt_path={self.path!r})"
        return f"{self.resume_command} ckpt_path={shlex.quote(self.path)}"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(str(trainer.default_root_dir), "checkpoints")
        if _is_local_file_protocol(self.dirpath):
            self.dirpath = os.path.realpath(self.dirpath)
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath and os.path.realpath(cb.dirpath) == self.dirpath:
                cb.save_last = False  # it would overwrite our last.ckpt with its last *improved* state
                log.info("LastCheckpoint writes %s; ModelCheckpoint(save_last=True) in the same folder turned off", self.path)

    # ---- when to save
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._maybe_requeue(trainer)
        n = self.every_n_train_steps
        # the epoch's last step is saved after its validation, or at the epoch end
        if n and trainer.global_step % n == 0 and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # where Lightning's ModelCheckpoint saves after validation: the scores and the best
        # checkpoint's state are in it, and resuming from it does not validate again
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._maybe_requeue(trainer)
            self._save(trainer, force=True)
            self._validated_step = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validated_step != trainer.global_step:  # an epoch with no validation at its end
            self._save(trainer, force=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            if self.saved_step is not None and trainer.is_global_zero:
                log.warning("training stopped (%s); the latest saved state is %s (step %d). Resume with:\n  %s",
                            type(exception).__name__, self.path, self.saved_step, self.resume_hint())
            return
        # Lightning raised this at the end of the step in progress (on every rank: rank 0's signal is
        # broadcast), or in validation; the state is consistent there and resumes exactly
        self._save(trainer)
        signum = self._signal or signal.SIGTERM
        name = signal.Signals(signum).name
        exception.code = 128 + int(signum)  # SystemExit(None) would exit 0: the scheduler would record a success
        if not trainer.is_global_zero:
            return
        if self.saved_step is None:  # stopped before the first step, or in a fast_dev_run
            log.warning("stopped by %s before any state was saved; exiting with status %d", name, exception.code)
        else:
            log.warning("stopped by %s at epoch %d, step %d: the state is saved in %s; exiting with status %d. "
                        "Resume with:\n  %s", name, self.saved_epoch, self.saved_step, self.path,
                        exception.code, self.resume_hint())

    def _save(self, trainer: pl.Trainer, force: bool = False) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        if not force and self.saved_step == trainer.global_step:
            return
        final = self.path
        if not _is_local_file_protocol(final):
            trainer.save_checkpoint(final, weights_only=False)
        else:
            Path(final).parent.mkdir(parents=True, exist_ok=True)
            tmp = os.path.join(os.path.dirname(final), f".{self.filename}.tmp")
            trainer.save_checkpoint(tmp, weights_only=False)  # collective; rank 0 writes
            if trainer.is_global_zero:
                os.replace(tmp, final)  # a kill while writing leaves the previous last.ckpt intact
        self.saved_step, self.saved_epoch = trainer.global_step, trainer.current_epoch
        self._announce_resume(trainer)

    def _announce_resume(self, trainer: pl.Trainer) -> None:
        """Log the command that resumes the run once, when its first ``last.ckpt`` exists (before
        that, there is nothing to resume from)."""
        if self._announced or not trainer.is_global_zero or not self.resume_command:
            return
        self._announced = True
        log.info("saved %s (step %d); if the run stops, resume with: %s", self.path, self.saved_step, self.resume_hint())

    # ---- signals
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wrap the handlers Lightning installed: remember which signal stopped the run; SIGUSR1
        stops it like SIGTERM, or, when Lightning's SLURM auto-requeue owns SIGUSR1, runs that
        handler (HPC checkpoint + ``scontrol requeue``) at the end of the current step, where the
        state it saves is consistent, instead of wherever the signal lands."""
        lightning_sigterm = signal.getsignal(signal.SIGTERM)
        if not callable(lightning_sigterm) or threading.current_thread() is not threading.main_thread():
            return

        def stop(signum: int, frame: FrameType | None) -> None:
            self._signal = signum
            lightning_sigterm(signal.SIGTERM, frame)

        def defer_requeue(signum: int, frame: FrameType | None) -> None:
            self._requeue_signal = signum

        self._handlers = {signal.SIGTERM: lightning_sigterm}
        signal.signal(signal.SIGTERM, stop)
        if hasattr(signal, "SIGUSR1"):
            usr1 = signal.getsignal(signal.SIGUSR1)
            self._handlers[signal.SIGUSR1] = usr1
            self._slurm_requeue = usr1 if callable(usr1) else None
            signal.signal(signal.SIGUSR1, defer_requeue if callable(usr1) else stop)
        self._stop_on_ctrl_c(stop)

    def _stop_on_ctrl_c(self, stop: Any) -> None:
        """Ctrl-C (SIGINT) stops like SIGTERM: the step in progress ends, ``last.ckpt`` is saved, the
        resume command is logged, exit status 130. A second Ctrl-C aborts at once (KeyboardInterrupt,
        nothing saved). DataLoader workers forked later inherit this handler and ignore the signal (a
        terminal's Ctrl-C reaches the whole process group): the main process stops them itself."""
        pid = os.getpid()

        def interrupt(signum: int, frame: FrameType | None) -> None:
            if os.getpid() != pid:
                return
            if self._signal is not None:
                raise KeyboardInterrupt
            os.write(2, b"\nCtrl-C: stopping after this step and saving last.ckpt (Ctrl-C again aborts without saving)\n")
            stop(signum, frame)

        self._handlers[signal.SIGINT] = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, interrupt)

    def _maybe_requeue(self, trainer: pl.Trainer) -> None:
        """Run Lightning's SLURM requeue handler if SIGUSR1 reached any rank. Under DDP the ranks agree
        first (one all-reduce a step, only while SLURM auto-requeue is on), so that all of them save
        the HPC checkpoint (a collective) at the same step."""
        if self._slurm_requeue is None:
            return
        pending = self._requeue_signal is not None
        dist = torch.distributed
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([int(pending)], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            pending = bool(flag.item())
        if pending:
            signum, self._requeue_signal = self._requeue_signal or signal.SIGUSR1, None
            self._slurm_requeue(signum, None)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, handler in self._handlers.items():
            if signal.getsignal(signum) is not handler:
                signal.signal(signum, handler)
        self._handlers, self._slurm_requeue, self._requeue_signal = {}, None, None


# --------------------------------------------------------------------------- best checkpoint
class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps ``best_model_score`` and the best path when a run is resumed into
    another folder (Lightning keeps only the path). Checkpoints outside this run's folder are never
    deleted by it, so the earlier run's best stays where it is until this run beats it."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        continued = bool(self.dirpath) and any(Path(str(self.dirpath)).glob("last*.ckpt"))
        with warnings.catch_warnings():
            if continued:  # a run folder being continued (resume, requeue): its checkpoints are expected there
                warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)
            return
        self.best_model_score = state_dict["best_model_score"]
        self.best_model_path = state_dict["best_model_path"]
        self.best_k_models = dict(state_dict.get("best_k_models", {}))
        self.kth_best_model_path = state_dict.get("kth_best_model_path", "")
        self.kth_value = state_dict.get("kth_value", self.kth_value)
        if self.best_model_score is not None:
            log.info("resumed into a new folder; the best so far stays %s (%s = %.4f)", self.best_model_path,
                     self.monitor, float(self.best_model_score))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # resumed from a checkpoint written after the epoch's validation, Lightning ends that epoch
        # again without validating; its scores are in the restored state, not in this process's metrics
        if trainer.fit_loop.restarting and self.monitor is not None and self.monitor not in trainer.callback_metrics:
            return
        super().on_train_epoch_end(trainer, pl_module)
