"""Hydra entry point: ``python -m facemargin.train [group=option ...] [key=value ...]``.

With no overrides it trains the demo backbone on the built-in synthetic face set on the CPU.
``-m`` sweeps (``-m loss=expface loss.m=0.5,0.6,0.7,0.8``) run each job in its own folder and
end with a summary table and plot (see :mod:`facemargin.sweep`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from .module import FaceRecognitionModule

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


def config_dir() -> Path:
    """The packaged ``facemargin/conf`` (wheel installs) or the repository's ``conf/`` (editable)."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "conf"


#: the config nodes a model is built from; recorded in every checkpoint (facemargin.checkpoint).
MODEL_NODES = ("backbone", "head", "optimizer", "scheduler")


def build_model(cfg: DictConfig, num_classes: int) -> FaceRecognitionModule:
    """The LightningModule from the composed config: every part a ``_target_`` node."""
    evaluators = [instantiate(node) for node in (cfg.get("eval") or {}).values() if node]
    model_cfg = {key: cfg[key] for key in MODEL_NODES}
    model_cfg["flip_test"] = cfg.flip_test
    return FaceRecognitionModule.from_config(
        model_cfg, num_classes=num_classes, evaluators=evaluators,
        val_batch_size=cfg.val_batch_size, val_num_workers=cfg.val_num_workers,
    )


def build(cfg: DictConfig) -> tuple[pl.Trainer, FaceRecognitionModule, pl.LightningDataModule]:
    """Instantiate the DataModule, the LightningModule and the Trainer from a composed config."""
    datamodule = instantiate(cfg.data)
    model = build_model(cfg, datamodule.num_classes)
    loggers = [instantiate(node) for node in (cfg.logger or {}).values() if node]
    callbacks = [instantiate(node) for node in (cfg.callbacks or {}).values() if node]
    if not loggers:  # nothing to log learning rates to (logger=none)
        dropped = [c for c in callbacks if isinstance(c, LearningRateMonitor)]
        callbacks = [c for c in callbacks if c not in dropped]
        if dropped:
            log.info("logger=none: LearningRateMonitor left out")
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    return trainer, model, datamodule


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (or resume from ``cfg.ckpt_path``) and return the final logged metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    trainer, model, datamodule = build(cfg)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["global_step"] = float(trainer.global_step)
    best = getattr(trainer.checkpoint_callback, "best_model_score", None)
    if best is not None:
        metrics["best/val/acc"] = float(best)
    if trainer.is_global_zero:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        finite = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}  # strict JSON: NaN -> null
        (out / METRICS_FILE).write_text(json.dumps(finite, indent=2, sort_keys=True))
        log.info("metrics: %s", json.dumps(metrics, sort_keys=True))
    return metrics


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> Any:
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    metrics = run(cfg)
    return metrics.get("best/val/acc", metrics.get("val/acc"))


if __name__ == "__main__":
    main()
