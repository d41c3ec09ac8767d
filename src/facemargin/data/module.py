"""FaceRecordDataModule: a training source (RecordIO set or image folder) + insightface verification sets."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from ..config import to_plain
from ..errors import UserError
from ..input_spec import DEFAULT, InputSpec
from .formats.setfiles import SetFiles
from .loading.device_decode import EncodedBatch, EncodedBatchReader, JpegBatchDecoder, decode_batch
from .loading.layout import to_training_batch
from .loading.loader import BatchReader, OnCorrupt, PlanSampler, TrainLoader
from .loading.plan import PlanSpec
from .sources.base import FaceSource
from .sources.photos import PhotoFolder, size_advice
from .sources.recordio import FaceRecordSet
from .storage.source import is_remote

log = logging.getLogger(__name__)

__all__ = ["FaceRecordDataModule", "STANDARD_VAL_SETS", "Augment"]

#: The verification sets shipped next to insightface training sets.
STANDARD_VAL_SETS = ("lfw", "cfp_fp", "agedb_30")

#: ``(images uint8 [B,3,H,W] on the device, sample_index int64 [B], epoch) -> images uint8``.
Augment = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def _is_demo(root: str | os.PathLike | None) -> bool:
    return root is None or str(root) == "demo"


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


class FaceRecordDataModule(pl.LightningDataModule):
    """Training batches from a face set, verification batches from ``.bin`` files.

    Args:
        root: the training set: a RecordIO directory (``train.rec/.idx/property``, plus
            ``<name>.bin`` val sets) for ``source="recordio"``, or an image folder / list file for
            ``source="folder"``; ``None`` or ``"demo"`` (or ``demo=True``) uses the built-in synthetic set.
            A RecordIO set may be a URL (``http(s)://``, ``s3://``, ``gs://``, any fsspec URL, see
            :mod:`facemargin.data.storage`): ``train.rec`` is read in place with ranged reads, the
            small files (``.idx``, ``property``, ``.bin``) are cached locally; val-set names resolve
            inside it. Map-style random access over a network is slower than ``streaming=True``.
        remote: options of the remote reads (:func:`~facemargin.data.storage.source.remote_options`):
            ``retry`` (``{attempts, base_delay, max_delay}``), ``timeout`` (HTTP seconds),
            ``readahead``, ``concurrency``, ``storage_options`` (fsspec); ignored for a local root.
        source: ``"recordio"``, ``"folder"`` (:class:`~facemargin.data.sources.folder.FolderSource`) or a
            callable ``root -> FaceSource`` (Hydra: ``_target_: my.Source`` with ``_partial_: true``).
        val_sets: names (``"lfw"`` -> ``root/lfw.bin``) or paths of verification ``.bin`` files,
            offered to the LightningModule by :meth:`verification_files` (it builds the evaluators).
            In demo mode ``demo_val.bin`` comes first.
        batch_size: per-rank training batch size (whole batches only: the head gathers across ranks).
        num_workers: DataLoader workers, capped at the CPU cores available.
        pin_memory: ``None`` (default): pinned only when the trainer runs on CUDA.
        persistent_workers: keep workers (and their shared batch slots) between epochs (default):
            the plan lives in the main process, so they cannot change what is trained on, and
            each epoch saves the workers' start.
        streaming: ``False``: random reads, full shuffle. ``True``: blocks of ``chunk_size``
            neighbouring samples read sequentially (one read each), shuffled within windows of
            ``shuffle_buffer`` samples (see :mod:`facemargin.data.loading.plan`).
        seed: every order and flip comes from ``(seed, epoch, sample index)``.
        flip_p: training horizontal flip probability.
        on_corrupt: ``"raise"`` or ``"skip"`` (see :mod:`facemargin.data.loading.loader`).
        image_size: ``(height, width)`` of a folder source's images (default: the first image's, or
            what ``crop``/``resize``/alignment make of it).
        crop, resize, resize_quality, landmarks, detect, detect_options, choice, min_score, face_cache: a
            folder of photos made into faces in the DataLoader workers, as ``pack --crop/--resize/--align``
            (``detect``: a detector finds the 5 points once per photo, kept in ``face_cache`` by
            content); see :class:`~facemargin.data.sources.photos.PhotoFolder`.
        num_classes: identities of a RecordIO or folder source (default: ``property``, the number
            of folders, or the largest label of a list file + 1), e.g. for a subset that lost its
            last identities (``python -m facemargin.clean``) and keeps the model's class numbering.
        augment: optional callable applied to training batches on the device, on uint8 images,
            before normalisation (see :data:`Augment`).
        decode: ``"cpu"``: DataLoader workers decode the JPEGs. ``"gpu"``: workers ship the encoded
            bytes and the batch is decoded on the training device with nvJPEG
            (:mod:`facemargin.data.loading.device_decode`; without CUDA: on the CPU, with a warning).
        demo: force the demo set; ``demo_cache_dir`` is where it is generated (default
            ``$FACEMARGIN_CACHE`` or ``~/.cache/facemargin``); ``demo_options`` overrides its
            generation parameters (``num_identities``, ``images_per_identity``, ...).

    Loaders yield uint8 RGB images (under a Trainer the training images as ``HWCImages``: uint8
    ``[B, H, W, 3]`` unflipped + flips, as the workers decoded them); :meth:`on_after_batch_transfer`
    turns and flips those on the device, augments (training) and
    normalises them to float32 on the device with the module's ``input_spec`` (facemargin's
    ``(x / 255 - 0.5) / 0.5`` RGB; an AdaFace IR net's the same in BGR).
    ``num_classes`` and ``image_size`` are known right after construction. The train loader is
    resumable: its position is saved in every checkpoint and restored exactly.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        val_sets: Sequence[str | os.PathLike] = (),
        batch_size: int = 128,
        num_workers: int = 2,
        streaming: bool = False,
        shuffle_buffer: int = 32768,
        chunk_size: int = 32,
        seed: int = 0,
        flip_p: float = 0.5,
        on_corrupt: OnCorrupt = "raise",
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        demo: bool = False,
        demo_cache_dir: str | os.PathLike | None = None,
        demo_options: dict[str, Any] | None = None,
        source: str | Callable[[str], FaceSource] = "recordio",
        image_size: Sequence[int] | None = None,
        augment: Augment | None = None,
        decode: str = "cpu",
        remote: Mapping[str, Any] | None = None,
        num_classes: int | None = None,
        crop: str | None = None,
        resize: int | None = None,
        resize_quality: str = "fast",
        landmarks: str | os.PathLike | None = None,
        detect: str | Mapping[str, Any] | Any | None = None,
        detect_options: Mapping[str, Any] | None = None,
        choice: str = "largest",
        min_score: float = 0.0,
        face_cache: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        val_list = [val_sets] if isinstance(val_sets, (str, os.PathLike)) else list(val_sets or [])
        # plain types only: checkpoints must load with torch.load(weights_only=True) (no pathlib objects)
        self.save_hyperparameters(
            dict(
                root=None if root is None else str(root), val_sets=[str(v) for v in val_list],
                batch_size=batch_size, num_workers=num_workers,
                streaming=streaming, shuffle_buffer=shuffle_buffer, chunk_size=chunk_size, seed=seed,
                flip_p=flip_p, on_corrupt=on_corrupt, pin_memory=pin_memory,
                persistent_workers=persistent_workers, demo=demo,
                demo_cache_dir=None if demo_cache_dir is None else str(demo_cache_dir),
                demo_options=dict(demo_options or {}),
                source=source if isinstance(source, str) else getattr(source, "__qualname__", repr(source)),
                image_size=None if image_size is None else [int(x) for x in image_size], decode=decode,
                remote=to_plain(remote),  # plain: checkpoints load with weights_only
                crop=None if crop is None else str(crop), resize=resize, resize_quality=str(resize_quality),
                landmarks=None if landmarks is None else str(landmarks),
                detect=detect if detect is None or isinstance(detect, str) else (
                    to_plain(detect) if isinstance(detect, Mapping) else getattr(detect, "cache_key", repr(detect))),
                detect_options=to_plain(detect_options or {}), choice=choice, min_score=float(min_score),
                face_cache=None if face_cache is None else str(face_cache),
                # only when set: it then equals the model's, and Lightning merges the two hparams
                **({} if num_classes is None else {"num_classes": int(num_classes)}),
            )
        )
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        self.demo = bool(demo) or _is_demo(root)
        if self.demo:
            from .tools.synthetic import ensure_demo_dataset

            root = ensure_demo_dataset(demo_cache_dir, **dict(demo_options or {}))
            source = "recordio"
        # data.root resolved once: the set's files (local or remote) and the checked remote options
        # (a bad key fails here, before any file is read); everything below receives self.files
        self.files = SetFiles.at(root, self.hparams.remote)  # type: ignore[arg-type]
        self.root = self.files.root
        if self.files.is_remote and source == "folder":
            raise ValueError(f"a remote data.root ({root}) must be a packed RecordIO set; "
                             "data=folder reads local folders (pack them: python -m facemargin.data.pack)")
        if self.demo:
            demo_bin = self.files.verification_file("demo_val")
            val_list = [demo_bin] + [v for v in val_list if Path(v) != demo_bin and str(v) != "demo_val"]
        self.val_paths = [self.files.verification_file(v) for v in val_list]
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.persistent_workers = bool(persistent_workers)
        self.spec = PlanSpec(int(seed), bool(streaming), int(chunk_size), int(shuffle_buffer))
        self.seed = int(seed)
        self.flip_p = float(flip_p)
        self.on_corrupt = on_corrupt
        self.augment = augment
        if decode not in ("cpu", "gpu"):
            raise ValueError(f"decode must be 'cpu' or 'gpu', got {decode!r}")
        self.decode = decode
        self._decoder: Any = None
        self._source_kind = source
        self._source: FaceSource | None = None
        self._photos: PhotoFolder | None = None
        self._num_classes = None if num_classes is None else int(num_classes)
        photo_options = dict(crop=crop, resize=resize, landmarks=landmarks, detect=detect)
        given = [f"data.{k}" for k, v in photo_options.items() if v is not None]
        if given and source != "folder":
            raise UserError(f"{', '.join(given)}: options of data=folder (photos prepared while training); "
                            f"a packed set is prepared once: python -m facemargin.data.pack SRC OUT --crop/--resize/--align")
        if source == "recordio":
            self.num_classes, self.image_size = FaceRecordSet.peek(self.files, num_classes=self._num_classes)
        else:
            if source == "folder":
                self._photos = PhotoFolder(self.root, image_size=image_size, num_classes=self._num_classes,
                                           detect_options=detect_options, choice=choice, min_score=min_score,
                                           face_cache=face_cache, on_corrupt=on_corrupt,
                                           resize_quality=resize_quality, **photo_options)
                self._source = self._photos.source  # None until the faces are found (setup)
            elif callable(source):
                self._source = source(str(self.root))
            else:
                raise ValueError(f"source must be 'recordio', 'folder' or a callable root -> FaceSource, got {source!r}")
            shown = self._photos if self._photos is not None else self._source
            self.num_classes, self.image_size = shown.num_classes, shown.image_size  # type: ignore[union-attr,assignment]
        if decode == "gpu" and self._photos is not None and self._photos.framing.changes_pixels:
            raise UserError(f"data.decode=gpu decodes the stored JPEGs as they are; {', '.join(given)} prepare each "
                            "photo in the DataLoader workers: use data.decode=cpu, or pack the prepared faces once")
        self._val: list[Path] | None = None  # local copies of the verification files
        self._train_loader: TrainLoader | None = None
        self._resume: dict[str, Any] | None = None  # loader state from a checkpoint, for the next train loader

    # ---- datasets
    @property
    def source(self) -> FaceSource:
        """The training source (opened on first use; a RecordIO set maps its cached index; with
        ``detect``, every photo's face is found first, by all ranks together)."""
        if self._source is None:
            if self._photos is not None:
                self._source = self._photos.open(**self._collective())
            else:
                self._source = FaceRecordSet(self.files, num_classes=self._num_classes)
        return self._source

    def _collective(self) -> dict[str, Any]:
        """How this process takes part in finding faces: its rank, the all-gather, where lists go."""
        trainer = self._trainer_or_none()
        rank, world = self._rank_world()
        exchange = None
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            def exchange(payload: Any) -> list[Any]:
                gathered: list[Any] = [None] * world
                torch.distributed.all_gather_object(gathered, payload)
                return gathered
        else:
            rank, world = 0, 1  # no process group: this process finds every face itself
        local_rank = int(trainer.local_rank) if trainer is not None else int(os.environ.get("LOCAL_RANK", 0))
        return dict(rank=rank, world=world, exchange=exchange, fill_gaps=local_rank == 0,
                    report_dir=None if trainer is None else Path(trainer.default_root_dir) / "faces",
                    progress=rank == 0 and sys.stderr.isatty())

    def known_num_samples(self) -> int | None:
        """The number of training samples where counting them finds no faces: ``None`` for a photo
        folder with ``detect`` before :meth:`setup` (every rank takes part in finding them there)."""
        if self._source is None and self._photos is not None and self._photos.source is None:
            return None
        return len(self.source)

    def size_hint(self, input_size: int | Sequence[int] = 112) -> str:
        """How to make this set's images ``input_size`` (for a message about the model's input size)."""
        n = input_size if isinstance(input_size, int) else int(input_size[0])
        if self._photos is not None:
            return f"for a folder of photos: {size_advice((n, n))}"
        return f"repack the photos: python -m facemargin.data.pack IMAGES OUT --resize {n} (or --align LANDMARKS)"

    def verification_files(self) -> list[Path]:
        """Local copies of the verification ``.bin`` files, in ``val_sets`` order (remote ones are
        fetched once into the cache). Missing files raise, naming them. The code above the data
        layer builds the evaluators from these (the LightningModule, at ``setup``)."""
        if self._val is None:
            missing = [str(p) for p in self.val_paths if not is_remote(p) and not Path(p).is_file()]
            if missing:
                raise FileNotFoundError(f"verification set(s) not found: {', '.join(missing)}")
            self._val = [self.files.fetch(p) for p in self.val_paths]
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

    def prepare_data(self) -> None:
        """Open the training set once per node (Lightning: local rank 0) to build the index cache.
        Faces are found in :meth:`setup`, where every rank takes part."""
        if self._photos is None or self._photos.source is not None:
            self.source  # noqa: B018

    def setup(self, stage: str | None = None) -> None:
        """Open the training set (fit) and check the verification files."""
        if stage in (None, "fit"):
            self.source  # noqa: B018 - validates the files early, on every rank
        if stage in (None, "fit", "validate"):
            self.verification_files()  # fail early on a missing verification file

    # ---- loaders
    def _loader_kwargs(self) -> dict[str, Any]:
        workers = min(self.num_workers, available_cores())
        if workers < self.num_workers:
            log.info("num_workers=%d capped at the %d CPU cores available", self.num_workers, workers)
        pin = self.pin_memory
        if pin is None:
            trainer = self._trainer_or_none()
            pin = trainer is not None and trainer.strategy.root_device.type == "cuda"
        kw: dict[str, Any] = dict(num_workers=workers, pin_memory=bool(pin))
        if workers > 0:
            kw.update(persistent_workers=self.persistent_workers, prefetch_factor=4)
        return kw

    def train_dataloader(self) -> TrainLoader:
        """This rank's batches of ``(images uint8, labels int64, sample_index int64)``, resumable.

        Under a Trainer the images come as :class:`~facemargin.data.loading.layout.HWCImages`
        and :meth:`on_after_batch_transfer` turns and flips them on the device (see :meth:`training_loader`).
        """
        return self.training_loader(layout_on_device=self._trainer_or_none() is not None)

    def training_loader(self, layout_on_device: bool = False) -> TrainLoader:
        """The train loader; ``layout_on_device=True``: its images are ``HWCImages`` (``uint8 [B, H, W, 3]``
        unflipped + flips) that :meth:`on_after_batch_transfer` (or
        :func:`~facemargin.data.loading.layout.to_training_batch`) turns into the usual batch, bit for bit."""
        rank, world = self._rank_world()
        trainer = self._trainer_or_none()
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        sampler = PlanSampler(self.source, self.batch_size, self.spec, rank=rank, world_size=world, epoch=epoch)
        if self._resume is not None:
            sampler.load_state_dict(self._resume)
            self._resume = None
        reader_class = EncodedBatchReader if self.decode == "gpu" else BatchReader
        reader = reader_class(self.source, seed=self.seed, flip_p=self.flip_p, on_corrupt=self.on_corrupt)
        self._train_loader = TrainLoader(reader, sampler, layout_on_device=layout_on_device, **self._loader_kwargs())
        return self._train_loader

    @property
    def num_skipped(self) -> int:
        """Damaged training samples replaced so far (``on_corrupt="skip"``)."""
        return 0 if self._train_loader is None else self._train_loader.dataset.num_skipped  # type: ignore[attr-defined]

    def val_dataloader(self) -> list[DataLoader]:
        """The LightningModule's evaluator loaders: evaluators own their images (those built from this
        DataModule's :meth:`verification_files` among them), the module runs them; Lightning asks the DataModule."""
        from lightning.pytorch.utilities.model_helpers import is_overridden

        module = self.trainer.lightning_module if self._trainer_or_none() is not None else None
        if module is None or not is_overridden("val_dataloader", module):
            return []
        return module.val_dataloader()

    # ---- device-side augmentation and normalisation
    @staticmethod
    def normalize_batch(batch: Any, spec: InputSpec = DEFAULT) -> Any:
        """``(uint8 RGB images, ...)`` -> ``(the network's float input, ...)`` by ``spec``; float batches pass through."""
        if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]) and batch[0].dtype == torch.uint8:
            images = spec.normalize(batch[0])
            return [images, *batch[1:]] if isinstance(batch, list) else (images, *batch[1:])
        return batch

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """``data.decode=gpu``: decode a training batch's JPEGs on the training device, then flip."""
        if isinstance(batch, (list, tuple)) and len(batch) == 3 and isinstance(batch[0], EncodedBatch):
            if self._decoder is None:
                trainer = self._trainer_or_none()
                device = trainer.strategy.root_device if trainer is not None else torch.device("cuda")
                if device.type != "cuda":
                    warnings.warn(f"data.decode=gpu but training runs on {device.type}: the JPEGs are decoded "
                                  "there, in the training process (slower than in DataLoader workers); "
                                  "use data.decode=cpu", RuntimeWarning, stacklevel=2)
                self._decoder = JpegBatchDecoder(device)
            return decode_batch(batch, self._decoder, self.source.where)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches: HWC -> CHW and flips, then augment (uint8, on the device); then normalise every batch."""
        batch = to_training_batch(batch)
        trainer = self._trainer_or_none()
        if self.augment is not None and trainer is not None and trainer.training and len(batch) == 3:
            images, labels, index = batch
            batch = (self.augment(images, index, int(trainer.current_epoch)), labels, index)
        # the module's backbone says what it takes (an AdaFace IR net: BGR)
        spec = getattr(trainer.lightning_module, "input_spec", DEFAULT) if trainer is not None else DEFAULT
        return self.normalize_batch(batch, spec if isinstance(spec, InputSpec) else DEFAULT)

    # ---- resume: Lightning restores this before it asks for the train loader (and its length)
    def state_dict(self) -> dict[str, Any]:
        """The train loader's position (also saved by Lightning as the loader's own state)."""
        return {"loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = state_dict.get("loader") or None
