"""FaceRecognitionModule: backbone (any timm model) + embedding neck + swappable margin head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import build_embedder
from .data.decode import CHANNEL_ORDER, MEAN, STD
from .config import to_plain
from .heads import MarginHead
from .margins import Margin
from .metrics import VerificationAccuracy
from .partial_fc import PartialFCHead, consolidate_checkpoint, setup_partial_fc, shard_checkpoint
from .optim import build_optimizer, build_scheduler

__all__ = ["FaceRecognitionModule"]

VerificationSets = Sequence[tuple[str, np.ndarray]]


def build_margin_from_config(loss: str | Mapping | Margin) -> Margin:
    """``"expface"``, ``{"name": "expface", "m": 0.7, ...}`` (a ``conf/loss`` node) or a Margin."""
    if isinstance(loss, Margin):
        return loss
    if isinstance(loss, str):
        return Margin(loss)
    params = {k: v for k, v in to_plain(loss).items() if k != "_target_"}
    return Margin(**params)


class FaceRecognitionModule(pl.LightningModule):
    """Train a face embedder with a margin softmax; validate with insightface's 1:1 protocol.

    Args:
        backbone: ``{"name", "embedding_size", "dropout", "kwargs"}`` for
            :func:`facemargin.backbones.build_embedder`, or a ready ``nn.Module`` giving ``[B, D]``.
        num_classes: identities in the training set (the DataModule's ``num_classes``).
        loss: a margin name, a ``conf/loss`` mapping, or a :class:`~facemargin.margins.Margin`.
        head: ``{"partial_fc": bool, "sample_rate": float}``; Partial FC shards the class centres
            across DDP ranks.
        optimizer: keyword arguments of :func:`facemargin.optim.build_optimizer`.
        scheduler: ``{"name", "warmup_epochs" | "warmup_steps", "power", "min_factor"}``,
            stepped every optimizer step over ``trainer.estimated_stepping_batches``.
        verification_sets: ``[(name, issame), ...]`` in val-dataloader order; taken from the
            DataModule's ``verification_sets`` when not given.
        flip_test: embed image + horizontal flip (summed) in validation and prediction.
    """

    def __init__(
        self,
        backbone: Mapping | nn.Module | None = None,
        num_classes: int = 1000,
        loss: str | Mapping | Margin = "expface",
        head: Mapping | None = None,
        optimizer: Mapping | None = None,
        scheduler: Mapping | None = None,
        verification_sets: VerificationSets | None = None,
        flip_test: bool = True,
        nfolds: int = 10,
    ) -> None:
        super().__init__()
        backbone = {"name": "iresnet50"} if backbone is None else backbone
        self.save_hyperparameters(
            {
                "backbone": to_plain(backbone) if not isinstance(backbone, nn.Module) else type(backbone).__name__,
                "num_classes": num_classes,
                "loss": to_plain(loss) if not isinstance(loss, Margin) else {"name": loss.name, "s": loss.s, "grad": loss.grad, **loss.params},
                "head": to_plain(head or {}),
                "optimizer": to_plain(optimizer or {}),
                "scheduler": to_plain(scheduler or {}),
                "flip_test": flip_test,
                "nfolds": nfolds,
            }
        )
        if isinstance(backbone, nn.Module):
            self.backbone = backbone
            self.embedding_size = int(getattr(backbone, "embedding_size", 512))
        else:
            cfg = to_plain(backbone)
            kwargs = dict(cfg.get("kwargs") or {})
            self.backbone = build_embedder(
                cfg["name"],
                embedding_size=cfg.get("embedding_size", 512),
                dropout=cfg.get("dropout", 0.0),
                **({"input_size": cfg["input_size"]} if "input_size" in cfg else {}),
                **kwargs,
            )
            self.embedding_size = self.backbone.embedding_size
        self.head = self._build_head(build_margin_from_config(loss), num_classes, to_plain(head or {}))
        self.num_classes = num_classes
        self.flip_test = flip_test
        self.nfolds = nfolds
        self._verification_sets = list(verification_sets) if verification_sets is not None else None
        self.val_metrics = nn.ModuleList()
        self.val_names: list[str] = []
        if self._verification_sets is not None:
            self._build_val_metrics(self._verification_sets)

    # ------------------------------------------------------------------ building
    def _build_head(self, margin: Margin, num_classes: int, head: dict) -> nn.Module:
        if head.get("partial_fc", False):
            return PartialFCHead(
                self.embedding_size, num_classes, margin=margin, sample_rate=head.get("sample_rate", 1.0)
            )
        if head.get("sample_rate", 1.0) != 1.0:
            raise ValueError("head.sample_rate < 1 needs head.partial_fc=true")
        return MarginHead(self.embedding_size, num_classes, margin=margin)

    def _build_val_metrics(self, sets: VerificationSets) -> None:
        self.val_names = [name for name, _ in sets]
        self.val_metrics = nn.ModuleList(VerificationAccuracy(issame, nfolds=self.nfolds) for _, issame in sets)

    @property
    def uses_partial_fc(self) -> bool:
        return isinstance(self.head, PartialFCHead)

    def setup(self, stage: str) -> None:
        if self.uses_partial_fc:
            setup_partial_fc(self)  # shard the centres for this process group; keep DDP off them
        if self._verification_sets is None and self.trainer is not None:
            datamodule = getattr(self.trainer, "datamodule", None)
            sets = getattr(datamodule, "verification_sets", None)
            if sets is not None:
                self._verification_sets = list(sets)
                self._build_val_metrics(self._verification_sets)

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> Tensor:
        """Un-normalised embeddings ``[B, D]``."""
        return self.backbone(images)

    def embed(self, images: Tensor) -> Tensor:
        """Embedding used for verification: image (+ its horizontal flip when ``flip_test``), summed."""
        return self._embed_views(images)[0]

    def _embed_views(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Summed embedding of the views and each image's mean view norm (insightface's XNorm)."""
        emb = self(images).float()
        norms = emb.norm(dim=1)
        if self.flip_test:
            flipped = self(torch.flip(images, dims=[3])).float()
            emb, norms = emb + flipped, (norms + flipped.norm(dim=1)) / 2
        return emb, norms

    # ------------------------------------------------------------------ training
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch[0], batch[1]  # (images, labels, sample_index) from the data loaders
        loss = self.head.loss(self(images), labels.long())
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=images.shape[0])
        return loss

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, indices = batch
        if dataloader_idx >= len(self.val_metrics):
            raise RuntimeError(
                f"validation loader {dataloader_idx} has no verification set; pass verification_sets or "
                "use a DataModule with a `verification_sets` property"
            )
        embeddings, view_norms = self._embed_views(images)
        self.val_metrics[dataloader_idx].update(embeddings, indices, view_norms)

    def _validated_whole_set(self, dataloader_idx: int) -> bool:
        """False when the Trainer limited this loader (fast_dev_run, limit_val_batches)."""
        loaders = self.trainer.val_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        try:
            return self.trainer.num_val_batches[dataloader_idx] >= len(loader)
        except (TypeError, IndexError):  # loaders without a length: let the metric check
            return True

    def on_validation_epoch_end(self) -> None:
        accs = []
        for i, (name, metric) in enumerate(zip(self.val_names, self.val_metrics)):
            if self.trainer.sanity_checking or not metric.update_called:
                metric.reset()
                continue
            if not self._validated_whole_set(i):
                rank_zero_warn(f"verification set {name!r} not scored: validation was limited to part of it")
                metric.reset()
                continue
            scores = metric.compute()
            metric.reset()
            for key, value in scores.items():
                self.log(f"val/{name}/{key}", value, sync_dist=False, add_dataloader_idx=False)
            accs.append(scores["acc"])
        if accs:
            self.log("val/acc", torch.stack([torch.as_tensor(a) for a in accs]).mean(), prog_bar=True)

    # ------------------------------------------------------------------ prediction
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """L2-normalised embeddings (image + flip summed when ``flip_test``)."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return F.normalize(self.embed(images), dim=1)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        opt_cfg = dict(self.hparams.optimizer)
        optimizer = build_optimizer(self.parameters(), **opt_cfg)
        if self.uses_partial_fc:
            self.head.attach_optimizer(optimizer)  # sampled centres swap their optimizer rows in/out
        sched_cfg = dict(self.hparams.scheduler)
        if not sched_cfg or sched_cfg.get("name") in (None, "none"):
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(sched_cfg.pop("warmup_steps", 0))
        warmup_epochs = float(sched_cfg.pop("warmup_epochs", 0.0))
        if warmup_epochs and self.trainer.max_epochs and self.trainer.max_epochs > 0:
            warmup = int(round(warmup_epochs * total / self.trainer.max_epochs))
        scheduler = build_scheduler(optimizer, total_steps=total, warmup_steps=warmup, **sched_cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if not self.uses_partial_fc or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        # the centre shards differ per rank: a norm over them would differ per rank too and make the
        # data-parallel backbone replicas drift apart, so clip the backbone (+ neck) only
        params = [p for p in self.backbone.parameters() if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.uses_partial_fc:  # every rank: gather all centre shards (and their optimizer rows)
            consolidate_checkpoint(checkpoint, self, self.trainer.optimizers)
        # what a consumer of the checkpoint or an exported model must know about the inputs
        checkpoint["facemargin"] = {
            "channel_order": CHANNEL_ORDER,
            "normalize_mean": MEAN,
            "normalize_std": STD,
            "embedding_size": self.embedding_size,
            "num_classes": self.num_classes,
            "margin": self.hparams.loss,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.uses_partial_fc:  # slice the full centres for this rank, at any world size
            shard_checkpoint(checkpoint, self)
