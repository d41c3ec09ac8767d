"""FaceRecordDataModule: RecordIO training set + insightface verification sets for Lightning."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from .datasets import (
    EpochDistributedSampler,
    OnCorrupt,
    RecordDataset,
    RecordStream,
    StreamDataLoader,
)
from .decode import normalize_uint8
from .faceset import FaceRecordSet, read_property

log = logging.getLogger(__name__)

__all__ = ["FaceRecordDataModule", "STANDARD_VAL_SETS"]

#: The verification sets shipped next to insightface training sets.
STANDARD_VAL_SETS = ("lfw", "cfp_fp", "agedb_30")


def _is_demo(root: str | os.PathLike | None) -> bool:
    return root is None or str(root) == "demo"


class FaceRecordDataModule(pl.LightningDataModule):
    """Training batches from a RecordIO face set, verification batches from ``.bin`` files.

    Args:
        root: directory with ``train.rec/.idx/property`` (+ ``<name>.bin`` val sets);
            ``None`` or ``"demo"`` (or ``demo=True``) uses the built-in synthetic set.
        val_sets: names (``"lfw"`` -> ``root/lfw.bin``) or paths of verification ``.bin`` files,
            offered to the LightningModule by :meth:`evaluators`. In demo mode ``demo_val.bin`` comes first.
        batch_size: per-rank training batch size (``drop_last`` always: the head gathers across ranks).
        num_workers, pin_memory, persistent_workers: DataLoader options.
        streaming: ``True`` = :class:`RecordStream` (sequential reads + shuffle buffer),
            ``False`` = :class:`RecordDataset` (random reads, full shuffle).
        shuffle_buffer, chunk_bytes: :class:`RecordStream` options.
        seed: shuffling / flip seed (epoch ``e`` uses ``seed`` and ``e``).
        flip_p: training horizontal flip probability.
        on_corrupt: ``"raise"`` or ``"skip"`` (see :mod:`facemargin.data.datasets`).
        demo: force the demo set; ``demo_cache_dir`` is where it is generated (default
            ``$FACEMARGIN_CACHE`` or ``~/.cache/facemargin``); ``demo_options`` overrides its
            generation parameters (``num_identities``, ``images_per_identity``, ...).
        normalize_on_device: the loaders yield ``uint8 [B, 3, H, W]`` images and
            :meth:`on_after_batch_transfer` normalises them to float32 on the training device
            (4x less data through worker IPC and host-to-device copies). Inside a Trainer the
            model always receives normalised float32; iterating the loaders by hand gives uint8
            (use :meth:`normalize_batch`). ``False``: the loaders yield float32 directly.

    ``num_classes`` and ``image_size`` are known right after construction. The per-epoch
    reshuffle is driven by Lightning's ``set_epoch`` calls on the train loader's sampler; the
    stream's position within an epoch is saved in checkpoints (``state_dict``) and restored.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        val_sets: Sequence[str | os.PathLike] = (),
        batch_size: int = 128,
        num_workers: int = 2,
        streaming: bool = False,
        shuffle_buffer: int = 10_000,
        seed: int = 0,
        flip_p: float = 0.5,
        on_corrupt: OnCorrupt = "raise",
        pin_memory: bool = False,
        persistent_workers: bool = False,
        demo: bool = False,
        chunk_bytes: int = 4 << 20,
        demo_cache_dir: str | os.PathLike | None = None,
        demo_options: dict[str, Any] | None = None,
        normalize_on_device: bool = True,
    ) -> None:
        super().__init__()
        val_list = [val_sets] if isinstance(val_sets, (str, os.PathLike)) else list(val_sets or [])
        # plain types only: checkpoints must load with torch.load(weights_only=True) (no pathlib objects)
        self.save_hyperparameters(
            dict(
                root=None if root is None else str(root), val_sets=[str(v) for v in val_list],
                batch_size=batch_size, num_workers=num_workers,
                streaming=streaming, shuffle_buffer=shuffle_buffer, seed=seed, flip_p=flip_p,
                on_corrupt=on_corrupt, pin_memory=pin_memory, persistent_workers=persistent_workers,
                demo=demo, chunk_bytes=chunk_bytes,
                demo_cache_dir=None if demo_cache_dir is None else str(demo_cache_dir),
                demo_options=dict(demo_options or {}),
                normalize_on_device=normalize_on_device,
            )
        )
        self.demo = bool(demo) or _is_demo(root)
        if self.demo:
            from .synthetic import ensure_demo_dataset

            self.root = Path(ensure_demo_dataset(demo_cache_dir, **dict(demo_options or {})))
            demo_bin = self.root / "demo_val.bin"
            val_list = [demo_bin] + [v for v in val_list if Path(v) != demo_bin and str(v) != "demo_val"]
        else:
            self.root = Path(root).expanduser()  # type: ignore[arg-type]
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        self.val_paths = [self._resolve_val(v) for v in val_list]
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.streaming = bool(streaming)
        self.shuffle_buffer = int(shuffle_buffer)
        self.chunk_bytes = int(chunk_bytes)
        self.seed = int(seed)
        self.flip_p = float(flip_p)
        self.on_corrupt = on_corrupt
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.normalize_on_device = bool(normalize_on_device)
        self._output = "uint8" if self.normalize_on_device else "float"

        prop = self.root / "property"
        if prop.is_file():
            self.num_classes, h, w = read_property(prop)
            self.image_size: tuple[int, int] = (h, w)
        else:  # FaceRecordSet raises a clear error (or infers the size) without it
            fs = FaceRecordSet(self.root)
            self.num_classes, self.image_size = int(fs.num_classes), tuple(fs.image_size)  # type: ignore[assignment]

        self._faceset: FaceRecordSet | None = None
        self._train_map: RecordDataset | None = None
        self._stream: RecordStream | None = None
        self._val: list | None = None
        self._resume: dict[str, int] | None = None  # from a checkpoint, applied to the next train loader
        self._consumed_epoch = -1
        self._consumed = 0

    # ---- paths and datasets
    def _resolve_val(self, v: str | os.PathLike) -> Path:
        p = Path(v).expanduser()
        if p.suffix == ".bin" or p.is_file() or len(p.parts) > 1:
            return p if p.is_absolute() or p.is_file() else self.root / p
        return self.root / f"{p}.bin"

    @property
    def faceset(self) -> FaceRecordSet:
        """The training :class:`FaceRecordSet` (opened on first use)."""
        if self._faceset is None:
            self._faceset = FaceRecordSet(self.root)
        return self._faceset

    def evaluators(self) -> list:
        """One :class:`~facemargin.evaluation.BinPairsEvaluator` per verification set, in ``val_sets``
        order (the LightningModule runs them in validation). Missing files raise, naming them."""
        if self._val is None:
            from ..evaluation.pairs import BinPairsEvaluator

            missing = [str(p) for p in self.val_paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"verification set(s) not found: {', '.join(missing)}")
            self._val = [BinPairsEvaluator(p) for p in self.val_paths]
        return list(self._val)

    def _rank_world(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        trainer = self._trainer_or_none()
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return 0, 1

    def _trainer_or_none(self) -> pl.Trainer | None:
        return getattr(self, "trainer", None)

    def setup(self, stage: str | None = None) -> None:
        """Open the training set (fit) and check the verification files."""
        if stage in (None, "fit"):
            self.faceset  # noqa: B018 - validates the files early, on every rank
            if not self.streaming and self._train_map is None:
                self._train_map = RecordDataset(
                    self.faceset,
                    train=True,
                    flip_p=self.flip_p,
                    on_corrupt=self.on_corrupt,
                    seed=self.seed,
                    output=self._output,  # type: ignore[arg-type]
                )
        if stage in (None, "fit", "validate"):
            self.evaluators()  # fail early on a missing verification file

    # ---- loaders
    def _loader_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(num_workers=self.num_workers, pin_memory=self.pin_memory)
        if self.num_workers > 0:
            kw.update(persistent_workers=self.persistent_workers, prefetch_factor=4)
        return kw

    def train_dataloader(self) -> DataLoader:
        """Shuffled, sharded, ``drop_last`` training batches of ``(images, labels)``."""
        rank, world = self._rank_world()
        trainer = self._trainer_or_none()
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        if self.streaming:
            self._stream = RecordStream(
                self.faceset,
                batch_size=self.batch_size,
                shuffle_buffer=self.shuffle_buffer,
                seed=self.seed,
                flip_p=self.flip_p,
                chunk_bytes=self.chunk_bytes,
                drop_last=True,
                on_corrupt=self.on_corrupt,
                rank=rank,
                world_size=world,
                output=self._output,  # type: ignore[arg-type]
            )
            self._stream.set_epoch(epoch)
            if self._resume is not None:
                self._stream.load_state_dict(self._resume)
                self._resume = None
            return StreamDataLoader(self._stream, **self._loader_kwargs())
        if self._train_map is None:
            self.setup("fit")
        assert self._train_map is not None
        sampler = EpochDistributedSampler(
            self._train_map, num_replicas=world, rank=rank, shuffle=True, seed=self.seed, drop_last=True
        )
        sampler.set_epoch(epoch)
        if self._resume is not None:
            sampler.resume(self._resume["epoch"], self._resume["batches_consumed"] * self.batch_size)
            self._resume = None
        return DataLoader(
            self._train_map, batch_size=self.batch_size, sampler=sampler, drop_last=True, **self._loader_kwargs()
        )

    def val_dataloader(self) -> list[DataLoader]:
        """The LightningModule's evaluator loaders: evaluators own their images (this DataModule's
        :meth:`evaluators` among them), the module runs them; Lightning asks the DataModule."""
        from lightning.pytorch.utilities.model_helpers import is_overridden

        module = self.trainer.lightning_module if self._trainer_or_none() is not None else None
        if module is None or not is_overridden("val_dataloader", module):
            return []
        return module.val_dataloader()

    # ---- device-side normalisation
    @staticmethod
    def normalize_batch(batch: Any) -> Any:
        """``(uint8 images, ...)`` -> ``(float32 normalised images, ...)``; float batches pass through."""
        if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]) and batch[0].dtype == torch.uint8:
            images = normalize_uint8(batch[0])
            return [images, *batch[1:]] if isinstance(batch, list) else (images, *batch[1:])
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalise uint8 images on the device (all loops: fit, validate, test, predict)."""
        return self.normalize_batch(batch)

    # ---- resume (Lightning saves this in checkpoints)
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self._trainer_or_none()
        if trainer is not None and trainer.training:
            epoch = int(trainer.current_epoch)
            if epoch != self._consumed_epoch:
                self._consumed_epoch, self._consumed = epoch, self._resumed_offset(epoch)
            self._consumed += 1
        return batch

    def _resumed_offset(self, epoch: int) -> int:
        state = getattr(self, "_restored", None)
        if state and int(state["epoch"]) == epoch:
            return int(state["batches_consumed"])
        return 0

    def state_dict(self) -> dict[str, Any]:
        """Epoch and training batches consumed in it (per rank; equal on every rank)."""
        trainer = self._trainer_or_none()
        epoch = int(trainer.current_epoch) if trainer is not None else max(self._consumed_epoch, 0)
        consumed = self._consumed if epoch == self._consumed_epoch else 0
        _, world = self._rank_world()
        return {
            "epoch": epoch,
            "batches_consumed": consumed,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "world_size": world,
            "streaming": int(self.streaming),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume inside the checkpoint's epoch: the next train loader skips the consumed batches."""
        if not state_dict:
            return
        _, world = self._rank_world()
        now = {"batch_size": self.batch_size, "seed": self.seed, "world_size": world, "streaming": int(self.streaming)}
        same = all(int(state_dict.get(k, v)) == v for k, v in now.items())
        if not same:
            log.warning("FaceRecordDataModule: data settings changed since the checkpoint; restarting its epoch")
        state = {"epoch": int(state_dict["epoch"]), "batches_consumed": int(state_dict["batches_consumed"]) if same else 0}
        self._resume = dict(state)
        self._restored = dict(state)
