"""FaceRecognitionModule: a backbone, a head and evaluators, injected; Lightning runs them.

Every part is an ordinary object handed in (by ``hydra.utils.instantiate`` from ``_target_``
nodes, or by hand): the backbone maps images to embeddings, the head maps embeddings and labels
to a loss, evaluators score verification sets. The module calls the head's hooks by name (see
``docs/architecture.md``) and never asks what class it is, so a user's own head works unchanged.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .config import to_plain
from .distributed import exclude_from_ddp
from .evaluation.pairs import datamodule_evaluators
from .evaluation.thresholds import THRESHOLD_KEY, THRESHOLD_UNIT, stored_thresholds, threshold_entry
from .input_spec import InputSpec, input_spec_of
from .margins.base import check_flag

__all__ = ["FaceRecognitionModule", "RECORD_KEY"]

#: checkpoint key of the plain record a model can be rebuilt from (see :mod:`facemargin.checkpoint`).
RECORD_KEY = "facemargin"
RECORD_FORMAT = 1


def embedding_size_of(backbone: nn.Module, input_size: int = 112) -> int:
    """``backbone.embedding_size``, or the width of one dummy forward when it has none."""
    size = getattr(backbone, "embedding_size", None)
    if size is not None:
        return int(size)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            param = next(backbone.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            out = backbone(torch.zeros(2, 3, input_size, input_size, device=device))
    finally:
        backbone.train(was_training)
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise ValueError(
            f"the backbone must map images [B, 3, {input_size}, {input_size}] to embeddings [B, D]; "
            f"it returned {type(out).__name__} {tuple(getattr(out, 'shape', ()))}"
        )
    return int(out.shape[1])


def _head_loss(head: nn.Module, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Mapping[str, Tensor]]:
    """The head's loss and values to log: ``head.output`` (a HeadOutput), else ``head.loss``."""
    output = getattr(head, "output", None)
    result = output(embeddings, labels) if callable(output) else head.loss(embeddings, labels)
    if isinstance(result, Tensor):
        return result, {}
    if isinstance(result, Mapping):
        return result["loss"], result.get("logs", {})
    return result.loss, getattr(result, "logs", {}) or {}


def _call_with_known(factory: Callable[..., Any], first: Any, **optional: Any) -> Any:
    """``factory(first, **optional)`` passing only the keywords ``factory`` accepts."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory(first)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return factory(first, **optional)
    return factory(first, **{k: v for k, v in optional.items() if k in params})


class FaceRecognitionModule(pl.LightningModule):
    """Train a face embedder with any head; validate with any evaluators.

    Args:
        backbone: images ``[B, 3, H, W]`` (float, normalised; uint8 is normalised here with the
            backbone's :class:`~facemargin.input_spec.InputSpec`, e.g. flipped to BGR for an AdaFace
            IR net) -> embeddings ``[B, D]``. ``D`` is ``backbone.embedding_size`` or measured once.
        head: a ready ``nn.Module``, or a factory called as ``head(embedding_size=D, num_classes=C)``
            (Hydra ``_partial_``). See the head contract in ``docs/architecture.md``.
        optimizer: ``optimizer(params) -> Optimizer`` (Hydra ``_partial_``); default SGD(lr=0.1).
        scheduler: ``scheduler(optimizer, total_steps=, steps_per_epoch=)`` (the keywords it accepts),
            stepped every optimizer step; ``None`` = constant learning rate.
        evaluators: :class:`facemargin.evaluation.Evaluator` objects run in validation; one
            :class:`~facemargin.evaluation.BinPairsEvaluator` per file of the DataModule's
            ``verification_files()`` is added at ``setup``.
        num_classes: identities (needed when ``head`` is a factory).
        flip_test: embed image + horizontal flip (summed) in validation and prediction.
        val_batch_size, val_num_workers: the evaluators' DataLoaders.
        config: the plain ``_target_`` nodes the parts were built from (``backbone``, ``head``,
            ``optimizer``, ``scheduler``); stored in checkpoints so that
            :func:`facemargin.checkpoint.load_module` rebuilds the model from the checkpoint alone.
        compile: ``torch.compile`` the backbone and the head's loss (``model.compile=true``), once
            per process at their first call; parameters and checkpoints are unchanged.
        compile_options: keywords for ``torch.compile`` (``model.compile_options={mode: max-autotune}``).
        channels_last: the backbone's weights and its input images in NHWC memory
            (``model.channels_last=true``); same results, faster convolutions on GPUs.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module | Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        evaluators: Sequence[nn.Module] = (),
        num_classes: int | None = None,
        flip_test: bool = True,
        val_batch_size: int = 256,
        val_num_workers: int = 2,
        config: Mapping[str, Any] | None = None,
        compile: bool = False,
        channels_last: bool = False,
        compile_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.use_compile = check_flag("model", "compile", compile)
        self.compile_options = dict(to_plain(compile_options or {}))
        self.channels_last = check_flag("model", "channels_last", channels_last)
        if self.channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        self.backbone = backbone
        self.input_size = int(getattr(backbone, "input_size", 112))
        self.embedding_size = embedding_size_of(backbone, self.input_size)
        if isinstance(head, nn.Module):
            self.head = head
        else:
            if num_classes is None:
                raise ValueError("num_classes is needed to build the head from a factory")
            self.head = head(embedding_size=self.embedding_size, num_classes=int(num_classes))
        self.num_classes = int(num_classes if num_classes is not None else getattr(self.head, "num_classes", 0))
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.evaluators = nn.ModuleList(evaluators)
        self._datamodule_evaluators_added = False
        self.flip_test = bool(flip_test)
        self.val_batch_size = int(val_batch_size)
        self.val_num_workers = int(val_num_workers)
        self.config = to_plain(dict(config or {}))
        #: per set: the threshold validation chose (``threshold_cosine``) and the accuracy at it
        self.verification: dict[str, dict[str, float]] = {}
        #: per set that could not choose a threshold: why (see facemargin.evaluation.thresholds)
        self.verification_notes: dict[str, str] = {}
        # plain values only: checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "config": self.config,
                "num_classes": self.num_classes,
                "embedding_size": self.embedding_size,
                "flip_test": self.flip_test,
                "val_batch_size": self.val_batch_size,
                "val_num_workers": self.val_num_workers,
            }
        )

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], num_classes: int, evaluators: Sequence[nn.Module] = (), **kwargs: Any
    ) -> "FaceRecognitionModule":
        """Build every part from plain/OmegaConf ``_target_`` nodes (``backbone``, ``head``,
        ``optimizer``, ``scheduler``; ``flip_test`` optional) and record them for checkpoints."""
        from hydra.utils import instantiate

        cfg = to_plain(config)
        parts = {
            "backbone": instantiate(cfg["backbone"]),
            "head": instantiate(cfg["head"], _partial_=True),
            "optimizer": instantiate(cfg["optimizer"]) if cfg.get("optimizer") else None,
            "scheduler": instantiate(cfg["scheduler"]) if cfg.get("scheduler") else None,
        }
        kwargs.setdefault("flip_test", cfg.get("flip_test", True))
        return cls(**parts, evaluators=evaluators, num_classes=num_classes, config=cfg, **kwargs)

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        setup_distributed = getattr(self.head, "setup_distributed", None)
        if callable(setup_distributed):
            setup_distributed()  # e.g. shard the class centres for this process group
        ignored = getattr(self.head, "ddp_ignored_parameters", None)
        if callable(ignored) and ignored():
            exclude_from_ddp(self, [f"head.{n}" for n in ignored()])
        self.add_datamodule_evaluators(getattr(self.trainer, "datamodule", None) if self._trainer is not None else None)

    def add_datamodule_evaluators(self, datamodule: Any) -> None:
        """Add one evaluator per verification file ``datamodule`` names (its ``verification_files()``);
        the first call with a DataModule does it, later calls change nothing (each set is read once)."""
        if not self._datamodule_evaluators_added and datamodule is not None:
            self.evaluators.extend(datamodule_evaluators(datamodule))
            self._datamodule_evaluators_added = True

    # ------------------------------------------------------------------ forward
    @property
    def input_spec(self) -> InputSpec:
        """What the backbone takes (``backbone.input_spec``; facemargin's RGB default without one)."""
        return input_spec_of(self.backbone)

    def forward(self, images: Tensor) -> Tensor:
        """Un-normalised embeddings ``[B, D]``; uint8 RGB images are normalised first (:attr:`input_spec`)."""
        if images.dtype == torch.uint8:
            images = self.input_spec.normalize(images)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return self._compiled("backbone", self.backbone)(images)

    def _compiled(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, or with ``compile`` its ``torch.compile`` made at the first call in this process
        (after any spawn; kept out of the module tree, so state dicts keep their keys)."""
        if not self.use_compile:
            return fn
        cache = self.__dict__.setdefault("_compiled_parts", {})
        if name not in cache:
            cache[name] = torch.compile(fn, **self.compile_options)
        return cache[name]

    def embed(self, images: Tensor) -> Tensor:
        """Verification embedding: image (+ its horizontal flip when ``flip_test``), summed."""
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
    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        images, labels = batch[0], batch[1]
        head_loss = self._compiled("head", functools.partial(_head_loss, self.head))
        loss, logs = head_loss(self(images), labels.long())
        n = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        for key, value in logs.items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=False, batch_size=n)
        return loss

    # ------------------------------------------------------------------ validation
    def val_dataloader(self) -> list[DataLoader]:
        """One loader of ``(uint8 images, indices)`` per evaluator. Each owns the generator its
        worker seeds come from, so validating never advances the global torch RNG (training
        randomness does not depend on how often, or with how many workers, the run validates)."""
        workers = self.val_num_workers
        return [
            DataLoader(ev.dataset(), batch_size=self.val_batch_size, shuffle=False, num_workers=workers,
                       generator=torch.Generator().manual_seed(i))
            for i, ev in enumerate(self.evaluators)
        ]

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, indices = batch[0], batch[1]
        embeddings, view_norms = self._embed_views(images)
        self.evaluators[dataloader_idx].update(embeddings, indices, view_norms)

    def _validated_whole_set(self, dataloader_idx: int) -> bool:
        """False when the Trainer limited this loader (fast_dev_run, limit_val_batches)."""
        loaders = self.trainer.val_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        try:
            return self.trainer.num_val_batches[dataloader_idx] >= len(loader)
        except (TypeError, IndexError):
            return True

    def on_validation_epoch_end(self) -> None:
        """Log every set's figures; average the monitored figure of the sets that can support one
        (:meth:`~facemargin.evaluation.Evaluator.monitor_undefined` is ``None``: the same test
        ``train.py`` makes before fitting) into ``val/acc``, and keep their thresholds. A set that
        cannot is left out; a figure null for a run-time reason (NaN embeddings of a diverged
        model) makes ``val/acc`` NaN, which checkpoint callbacks rank last."""
        monitored = []
        for i, ev in enumerate(self.evaluators):
            if self.trainer.sanity_checking or not ev.update_called:
                ev.reset()
                continue
            if not self._validated_whole_set(i):
                rank_zero_warn(f"evaluation set {ev.name!r} not scored: validation was limited to part of it")
                ev.reset()
                continue
            scores = ev.compute()
            ev.reset()
            for key, value in scores.items():
                self.log(f"val/{ev.name}/{key}", value, sync_dist=False, add_dataloader_idx=False)
            monitor = getattr(ev, "monitor", None)
            if monitor in scores and ev.monitor_undefined() is None:
                monitored.append(scores[monitor])
            entry = threshold_entry(scores)
            if entry is not None:
                self.verification[ev.name] = entry
                self.verification_notes.pop(ev.name, None)
            elif THRESHOLD_KEY in scores:  # a set that cannot choose a threshold stores none, and why
                self.verification.pop(ev.name, None)
                self.verification_notes[ev.name] = f"{ev.name}: {ev.notes.get(THRESHOLD_KEY, 'its threshold is null')}"
        if monitored:
            self.log("val/acc", torch.stack([torch.as_tensor(a) for a in monitored]).mean(), prog_bar=True)

    # ------------------------------------------------------------------ prediction
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """L2-normalised embeddings (image + flip summed when ``flip_test``)."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return F.normalize(self.embed(images), dim=1)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        factory = self.optimizer_factory
        optimizer = factory(self.parameters()) if factory is not None else torch.optim.SGD(self.parameters(), lr=0.1)
        attach = getattr(self.head, "attach_optimizer", None)
        if callable(attach):
            attach(optimizer)  # e.g. sampled Partial FC swaps its optimizer rows in and out
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)  # also sizes the train loader
        batches = self.trainer.num_training_batches
        per_epoch = math.ceil(batches / self.trainer.accumulate_grad_batches) if 0 < batches < math.inf else None
        scheduler = _call_with_known(self.scheduler_factory, optimizer, total_steps=total, steps_per_epoch=per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _clip_parameters(self) -> Iterable[nn.Parameter]:
        """Backbone parameters plus the head's parameters that are identical on every rank."""
        head_params = getattr(self.head, "grad_clip_parameters", None)
        yield from self.backbone.parameters()
        yield from (head_params() if callable(head_params) else self.head.parameters())

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if not gradient_clip_val:
            return
        # never a norm over per-rank centre shards: it would differ per rank and make the
        # data-parallel replicas drift apart
        params = [p for p in self._clip_parameters() if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    # ------------------------------------------------------------------ checkpoints
    def configure_callbacks(self) -> list[pl.Callback]:
        """Every fit of this module saves each rank's RNG states in its checkpoints and restores them
        on resume (:class:`facemargin.callbacks.RNGStateCheckpointing`), with or without Hydra."""
        from .callbacks import RNGStateCheckpointing

        return [RNGStateCheckpointing()]

    def record(self) -> dict[str, Any]:
        """The plain record saved as ``checkpoint["facemargin"]``."""
        return {
            "format": RECORD_FORMAT,
            "config": self.config,
            "num_classes": self.num_classes,
            "embedding_size": self.embedding_size,
            **self.input_spec.to_dict(),  # input_size, channel_order, mean, std, alignment, descriptions
            "verification": {k: dict(v) for k, v in self.verification.items()},
            "verification_notes": dict(self.verification_notes),
            "threshold_unit": THRESHOLD_UNIT,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save = getattr(self.head, "on_save_checkpoint", None)
        if callable(save):  # every rank: e.g. gather the centre shards and their optimizer rows
            save(checkpoint, "head.", self.trainer.optimizers if self._trainer is not None else [])
        checkpoint[RECORD_KEY] = self.record()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load = getattr(self.head, "on_load_checkpoint", None)
        if callable(load):  # e.g. slice the full centres for this rank, at any world size
            load(checkpoint, "head.")
        record = checkpoint.get(RECORD_KEY) or {}
        self.verification = stored_thresholds(record.get("verification"))  # old squared distances converted
        self.verification_notes = dict(record.get("verification_notes") or {})
