"""Hydra entry point: ``python -m facemargin.train [group=option ...] [key=value ...]``.

With no overrides it trains the demo backbone on the built-in synthetic face set on the CPU.
``-m`` sweeps (``-m loss=expface loss.m=0.5,0.6,0.7,0.8``) run each job in its own folder and
end with a summary table and plot (see :mod:`facemargin.sweep`).

Before the Trainer starts, the run checks that the set's images have the backbone's input size
and that the batch fits in free memory (:mod:`facemargin.preflight`). Lightning, timm and torch
are imported when a run starts, so ``--help`` answers at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .hydra_entry import config_dir, hydra_main

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from omegaconf import DictConfig

    from .callbacks import LastCheckpoint
    from .module import FaceRecognitionModule

__all__ = ["MODEL_NODES", "build", "build_model", "config_dir", "main", "preflight", "resume_command", "run",
           "why_unscored"]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


#: the config nodes a model is built from; recorded in every checkpoint (facemargin.checkpoint).
MODEL_NODES = ("backbone", "head", "optimizer", "scheduler")


def build_model(cfg: DictConfig, num_classes: int) -> FaceRecognitionModule:
    """The LightningModule from the composed config: every part a ``_target_`` node."""
    from hydra.utils import instantiate

    from .module import FaceRecognitionModule

    evaluators = [instantiate(node) for node in (cfg.get("eval") or {}).values() if node]
    model_cfg = {key: cfg[key] for key in MODEL_NODES}
    model_cfg["flip_test"] = cfg.flip_test
    options = cfg.get("model") or {}
    return FaceRecognitionModule.from_config(
        model_cfg, num_classes=num_classes, evaluators=evaluators,
        val_batch_size=cfg.val_batch_size, val_num_workers=cfg.val_num_workers,
        compile=options.get("compile", False), channels_last=options.get("channels_last", False),
        compile_options=options.get("compile_options"),
    )


def why_unscored(cfg: DictConfig, model: FaceRecognitionModule, datamodule: Any) -> str | None:
    """Why no verification set can choose the best checkpoint in this run, or ``None`` when one can.

    Known before training: validation off or limited to part of each set, no sets, or sets none of
    which can support an accuracy (:meth:`~facemargin.evaluation.Evaluator.monitor_undefined`,
    e.g. a ``.bin`` of same-person pairs only). Sets that cannot, beside sets that can, are named
    once: they are left out of ``val/acc``.
    """
    limit = cfg.trainer.get("limit_val_batches", 1.0)
    if limit == 0:
        return "no verification pairs are scored in this run (trainer.limit_val_batches=0)"
    if isinstance(limit, float) and limit < 1.0:
        return (f"no verification pairs are scored in this run (trainer.limit_val_batches={limit}: only whole "
                "verification sets are scored)")
    model.add_datamodule_evaluators(datamodule)  # read each set once, here; setup finds them added
    evaluators = list(model.evaluators)
    if not evaluators:
        return "no verification sets (data.val_sets is empty and there are no eval= sets)"
    refused = [why for why in (ev.monitor_undefined() for ev in evaluators) if why]
    if len(refused) == len(evaluators):
        return "no verification set can choose the best checkpoint: " + "; ".join(refused)
    if refused:
        log.info("left out of val/acc, they cannot choose the best checkpoint: %s", "; ".join(refused))
    return None


#: what the checkpoint callbacks monitor when no verification set can choose the best checkpoint
TRAIN_MONITOR = {"monitor": "train/loss_epoch", "mode": "min", "filename": "epoch{epoch:02d}-loss{train/loss_epoch:.4f}"}


def _callback_nodes(cfg: DictConfig, unscored: str | None) -> list[DictConfig]:
    """The callback nodes; when no verification set can choose the best checkpoint (``unscored`` says
    why), a ``val/`` monitor becomes the training loss, and the run says so once."""
    nodes = []
    for name, node in (cfg.callbacks or {}).items():
        if not node:
            continue
        if unscored and str(node.get("monitor") or "").startswith("val/"):
            node = node.copy()
            log.info("%s: callbacks.%s keeps the checkpoint with the lowest %s instead of the highest %s",
                     unscored, name, TRAIN_MONITOR["monitor"], node.monitor)
            node.monitor, node.mode = TRAIN_MONITOR["monitor"], TRAIN_MONITOR["mode"]
            if "{val/" in str(node.get("filename") or ""):
                node.filename = TRAIN_MONITOR["filename"]
        nodes.append(node)
    return nodes


def _with_metrics_csv(loggers: list[Any], output_dir: str) -> list[Any]:
    """Every run writes ``<run folder>/metrics.csv``: a :class:`MetricsCSVLogger` is added to the
    configured loggers (``tensorboard``, ``wandb``, ``none``) unless a CSV logger is among them."""
    from lightning.pytorch.loggers import CSVLogger

    from .metrics_csv import MetricsCSVLogger

    if any(isinstance(lg, CSVLogger) for lg in loggers):
        return loggers
    return [*loggers, MetricsCSVLogger(save_dir=output_dir, name="", version="")]


def build(cfg: DictConfig) -> tuple[pl.Trainer, FaceRecognitionModule, pl.LightningDataModule]:
    """Instantiate the DataModule, the LightningModule and the Trainer from a composed config."""
    from hydra.utils import instantiate

    from .checkpoint import init_weights

    datamodule = instantiate(cfg.data)
    model = build_model(cfg, datamodule.num_classes)
    if cfg.get("init_weights") and not cfg.get("ckpt_path"):  # resuming restores everything anyway
        init_weights(model, cfg.init_weights)
    loggers = _with_metrics_csv([instantiate(node) for node in (cfg.logger or {}).values() if node], cfg.output_dir)
    callbacks = [instantiate(node) for node in _callback_nodes(cfg, why_unscored(cfg, model, datamodule))]
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks)
    return trainer, model, datamodule


def resume_command(cfg: DictConfig) -> str | None:
    """``python -m facemargin.train <this run's overrides> hydra.run.dir=<its folder>`` (no ``ckpt_path``),
    or ``None`` outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    keep = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") != "ckpt_path"]
    args = ["python", "-m", "facemargin.train", *keep, f"hydra.run.dir={hydra_cfg.runtime.output_dir}"]
    return " ".join(shlex.quote(a) for a in args)


def _checkpoint_callbacks(trainer: pl.Trainer) -> tuple[Any, LastCheckpoint | None]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .callbacks import LastCheckpoint

    best = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    last = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
    return best, last


def _training_device(cfg: DictConfig) -> tuple[str, int]:
    """``(device whose memory a rank uses, training processes sharing it)`` from the trainer config."""
    import torch

    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    devices = cfg.trainer.get("devices", 1)
    count = int(devices) if isinstance(devices, int) or str(devices).isdigit() else 1
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if cuda and torch.cuda.is_available():
        return "cuda:0", 1  # one process per GPU
    return "cpu", max(count, 1)  # CPU processes share the machine's memory


def preflight(cfg: DictConfig, model: FaceRecognitionModule, datamodule: Any) -> None:
    """The checks of :mod:`facemargin.preflight`, before the Trainer starts (the launching process only)."""
    from .preflight import check_batches, check_input_size, check_memory, estimate_memory, optimizer_states

    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return  # ranks started by the launcher: the launching process checked
    name = str(cfg.backbone.get("name", "") or type(model.backbone).__name__)
    side = getattr(model.backbone, "input_size", None)
    size_hint = getattr(datamodule, "size_hint", None)
    hint = size_hint(int(side)) if side is not None and callable(size_hint) else None
    check_input_size(getattr(datamodule, "image_size", None), model.backbone, getattr(datamodule, "root", None), name,
                     hint)
    device, processes = _training_device(cfg)
    world = processes * int(cfg.trainer.get("num_nodes", 1) or 1)
    known = getattr(datamodule, "known_num_samples", None)
    samples = known() if callable(known) else None  # photos to detect faces in: counted at setup, by every rank
    if samples is not None:
        check_batches(samples, int(cfg.data.batch_size), world)
    if not cfg.get("memory_check", True):
        return
    if side is None:
        return
    if device.startswith("cuda") and "fork" in str(cfg.trainer.get("strategy", "")):
        return  # measuring CUDA memory would initialise CUDA before the fork
    head = model.head
    rows = getattr(getattr(head, "weight", None), "shape", (0,))[0]
    sharded = callable(getattr(head, "setup_distributed", None)) and world > 1
    logits = int(rows / world * float(getattr(head, "sample_rate", 1.0) or 1.0)) if sharded else None
    estimate = estimate_memory(model.backbone, head, int(side), optimizer_states(cfg.get("optimizer")),
                               str(cfg.trainer.get("precision", "32-true")), head_logits=logits)
    check_memory(estimate, int(cfg.data.batch_size), processes, device, what=f"backbone={name}")


class MissingCheckpoint(UserError, FileNotFoundError):
    """``ckpt_path`` names no file."""


def check_checkpoint_path(ckpt: Any) -> None:
    """``ckpt_path`` names a file (or Lightning's ``last`` / ``hpc``, or a URL)."""
    if ckpt and ckpt not in ("last", "hpc") and "://" not in str(ckpt) and not Path(ckpt).is_file():
        raise MissingCheckpoint(f"ckpt_path={ckpt}: no such checkpoint",
                        hint="a run prints the ckpt_path that resumes it once its first last.ckpt is saved")


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (or resume from ``cfg.ckpt_path``) and return the final logged metrics."""
    from .install_check import require_compatible_torchvision

    check_checkpoint_path(cfg.ckpt_path)
    require_compatible_torchvision()
    import lightning.pytorch as pl

    from .progress import one_log_stream, warnings_once

    one_log_stream()
    pl.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.output_dir).resolve()
    trainer, model, datamodule = build(cfg)
    preflight(cfg, model, datamodule)
    best_cb, last_cb = _checkpoint_callbacks(trainer)
    if last_cb is not None:
        last_cb.resume_command = resume_command(cfg)
    if trainer.is_global_zero:
        log.info("run folder: %s", out)
    with warnings_once():
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["global_step"] = float(trainer.global_step)
    best = getattr(best_cb, "best_model_score", None)
    if best is not None:
        metrics[f"best/{best_cb.monitor}"] = float(best)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        finite = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}  # strict JSON: NaN -> null
        (out / METRICS_FILE).write_text(json.dumps(finite, indent=2, sort_keys=True))
        if best is not None:
            log.info("best checkpoint: %s (%s = %.4f)", best_cb.best_model_path, best_cb.monitor, float(best))
        if last_cb is not None and last_cb.saved_step is not None:
            log.info("last checkpoint: %s (step %d)", last_cb.path, last_cb.saved_step)
        shown = {k: metrics[k] for k in ("val/acc", f"best/{getattr(best_cb, 'monitor', '')}", "train/loss_epoch") if k in metrics}
        log.info("metrics: %s (%s)", out / METRICS_FILE, ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    return metrics


def _job(cfg: DictConfig) -> Any:
    from omegaconf import OmegaConf

    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    metrics = run(cfg)
    return metrics.get("best/val/acc", metrics.get("val/acc"))


def main() -> Any:
    """``python -m facemargin.train``; the value a Hydra sweeper optimises is the best ``val/acc``."""
    return hydra_main("facemargin.train", "config", __doc__, _job)


if __name__ == "__main__":
    main()
