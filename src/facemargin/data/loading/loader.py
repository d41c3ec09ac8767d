"""The training loader shared by every source: plan in the main process, stateless workers.

* :class:`PlanSampler` (main process) walks the rank's :class:`~facemargin.data.loading.plan.EpochPlan`
  and emits one :class:`BatchRequest` per batch: the epoch, the sample indices and, when
  streaming, the stored bytes it read sequentially (window by window, one read per run of
  neighbouring records, the next window read ahead in a thread). Nothing about the plan lives in
  the workers, so their number, start-up time and persistence cannot change what is trained on.
* :class:`BatchReader` (a DataLoader worker, or the main process with ``num_workers=0``) turns a
  request into ``(images uint8 [B, 3, H, W] RGB, labels int64 [B], sample_index int64 [B])``:
  reads what it was not given (one read per record), validates, checks each image's declared
  size, decodes, flips with probability ``flip_p`` from ``hash(seed, epoch, index)``.
  ``on_corrupt="skip"`` replaces a damaged sample -- one that cannot be read (a deleted file),
  parsed or decoded -- by another one chosen from the same hash, with that sample's own label and
  index (batches keep their size, so every rank keeps stepping together), counts it and logs the
  file and key; ``"raise"`` stops naming them. A remote file that changed or stays unreachable
  (``RemoteReadError``) always stops: it is not a damaged sample.
* :class:`TrainLoader` is the ``DataLoader``: its iterator starts the real one at the first
  ``next()`` (after Lightning's ``set_epoch``, whatever the order of calls), counts the batches it
  delivers, and it implements ``state_dict`` / ``load_state_dict``, so Lightning saves the exact
  position in every checkpoint and treats the loader as resumable.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from ..formats.image import CorruptImageError
from ..sources.base import FaceSource
from ..storage.remote import RemoteReadError
from .plan import EpochPlan, PlanSpec, hash_uniform

__all__ = ["BatchRequest", "PlanSampler", "BatchReader", "TrainLoader", "OnCorrupt"]

log = logging.getLogger(__name__)

OnCorrupt = Literal["raise", "skip"]
_MAX_SUBSTITUTES = 64
_SLOTS = 128  # skip counters: slot 0 = main process, 1 + worker id = DataLoader workers


class BatchRequest(NamedTuple):
    """One batch to make: ``epoch``, sample ``indices`` (int64) and their stored bytes if already read."""

    epoch: int
    indices: np.ndarray
    raws: list[bytes | Exception] | None = None  # a sample that could not be read: its error


class PlanSampler(DistributedSampler):
    """Emits the :class:`BatchRequest` s of this rank's plan, from the resume point on.

    It subclasses ``DistributedSampler`` only so that Lightning, under DDP, keeps it instead of
    injecting its own (it already shards: ``rank`` of ``num_replicas``).
    """

    def __init__(self, source: FaceSource, batch_size: int, spec: PlanSpec, rank: int = 0,
                 world_size: int = 1, epoch: int = 0) -> None:
        # DistributedSampler.__init__ would need a process group; set what Lightning reads instead
        self.dataset = source
        self.num_replicas, self.rank = int(world_size), int(rank)
        self.shuffle, self.drop_last, self.seed = True, True, spec.seed
        self.batch_size = int(batch_size)
        self.spec = spec
        self.source = source
        self.plan = EpochPlan.start(spec, epoch, len(source), self.num_replicas, self.batch_size)
        self.delivered = 0  # batches of the running segment handed to the trainer
        self._executor: ThreadPoolExecutor | None = None

    @property
    def epoch(self) -> int:  # type: ignore[override]
        """The planned epoch (change it with :meth:`set_epoch`)."""
        return self.plan.epoch

    def set_epoch(self, epoch: int) -> None:
        """Plan ``epoch`` (Lightning calls this every epoch); the running epoch keeps its resume point."""
        if int(epoch) != self.plan.epoch:
            self.plan = EpochPlan.start(self.spec, epoch, len(self.source), self.num_replicas, self.batch_size)
            self.delivered = 0

    def __len__(self) -> int:
        """Batches of the current epoch, counted from its start (what Lightning's batch index runs to)."""
        fresh = len(self.source) // (self.num_replicas * self.batch_size)
        return max(self.plan.epoch_batches(), fresh) if len(self.plan.segments) > 1 else fresh

    def state_dict(self) -> dict[str, Any]:
        """The plan and how many batches the trainer consumed."""
        self.plan.segments[-1][2] = self.delivered
        return self.plan.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved plan with this run's world size and batch size (see :class:`EpochPlan`)."""
        self.plan = EpochPlan.from_state(state, self.spec, len(self.source), self.num_replicas, self.batch_size)
        self.delivered = self.plan.consumed

    def __iter__(self) -> Iterator[BatchRequest]:
        start = self.delivered if self.delivered < self.plan.num_batches() else 0
        self.delivered = start
        self.plan.segments[-1][2] = start
        return self._requests(self.plan, start)

    def _requests(self, plan: EpochPlan, start: int) -> Iterator[BatchRequest]:
        seq, b = plan.sequence(self.rank), self.batch_size
        if not self.spec.streaming:
            for k in range(start, plan.num_batches()):
                yield BatchRequest(plan.epoch, seq[k * b: (k + 1) * b])
            return
        window = self.spec.window
        loaded: dict[int, dict[int, bytes]] = {}  # window -> {sample: stored bytes}
        pending: dict[int, Future] = {}
        for k in range(start, plan.num_batches()):
            first, last = k * b // window, ((k + 1) * b - 1) // window
            for w in range(first, last + 1):
                if w not in loaded:
                    loaded[w] = (pending.pop(w, None) or self._read_window(seq, w)).result()
            if (last + 1) * window < seq.size and last + 1 not in pending:
                pending[last + 1] = self._read_window(seq, last + 1)  # read ahead
            for w in [w for w in loaded if w < first]:
                del loaded[w]
            indices = seq[k * b: (k + 1) * b]
            raws = [loaded[(k * b + j) // window][int(i)] for j, i in enumerate(indices)]
            yield BatchRequest(plan.epoch, indices, raws)

    def _read_window(self, seq: np.ndarray, w: int) -> Future:
        """Read window ``w``'s samples in storage order, in a background thread."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facemargin-read")
        members = np.sort(seq[w * self.spec.window: (w + 1) * self.spec.window])
        source = self.source

        def read() -> dict[int, bytes]:
            return dict(zip(members.tolist(), source.read_raws_or_errors(members)))

        return self._executor.submit(read)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_executor": None}


class BatchReader(Dataset):
    """Makes the batch a :class:`BatchRequest` describes; runs in DataLoader workers.

    Args:
        source: the training source.
        seed, flip_p: horizontal flip when ``hash_uniform(seed, epoch, index) < flip_p``.
        on_corrupt: ``"raise"`` or ``"skip"`` (see the module docstring).
    """

    def __init__(self, source: FaceSource, seed: int = 0, flip_p: float = 0.5, on_corrupt: OnCorrupt = "raise") -> None:
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        if source.image_size is None:
            raise ValueError(f"{source.name}: the image size is unknown (empty set without a property file)")
        self.source = source
        self.seed = int(seed)
        self.flip_p = float(flip_p)
        self.on_corrupt = on_corrupt
        self.skipped = torch.zeros(_SLOTS, dtype=torch.int64).share_memory_()
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.source)

    @property
    def num_skipped(self) -> int:
        """Damaged samples replaced so far, summed over this process and its DataLoader workers."""
        return int(self.skipped.sum())

    def __getitem__(self, request: BatchRequest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, w = self.source.image_size  # type: ignore[misc]
        planned = np.asarray(request.indices, dtype=np.int64)
        images = np.empty((planned.size, 3, h, w), dtype=np.uint8)
        decoded = np.empty((h, w, 3), dtype=np.uint8)  # libjpeg-turbo writes here, then one strided copy
        flips = hash_uniform(self.seed, request.epoch, planned) < self.flip_p

        def keep(j: int, index: int) -> None:
            flip = flips[j] if index == planned[j] else self._flip(request.epoch, index)
            np.copyto(images[j], (decoded[:, ::-1] if flip else decoded).transpose(2, 0, 1))

        indices, labels = self._read_samples(request, decoded, keep)
        return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(indices)

    def _read_samples(self, request: BatchRequest, out: np.ndarray | None,
                      keep: Callable[[int, int], None]) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, labels)`` of the request's samples, each decoded into ``out`` then ``keep(j, index)``.

        A damaged sample raises, or (``on_corrupt="skip"``) is replaced by a substitute whose index
        and label take its place.
        """
        epoch, indices = int(request.epoch), np.array(request.indices, dtype=np.int64)
        raws = request.raws if request.raws is not None else self.source.read_raws_or_errors(indices)
        labels = np.empty(indices.size, dtype=np.int64)
        for j in range(indices.size):
            i, raw = int(indices[j]), raws[j]
            try:
                if isinstance(raw, Exception):
                    raise raw
                labels[j] = self._decode(i, raw, out)
            except (ValueError, OSError) as exc:
                if self.on_corrupt == "raise" or isinstance(exc, RemoteReadError):
                    raise
                indices[j], labels[j] = self._substitute(epoch, i, out, exc)
            keep(j, int(indices[j]))
        return indices, labels

    def _flip(self, epoch: int, index: int) -> bool:
        return bool(hash_uniform(self.seed, epoch, np.array([index]))[0] < self.flip_p)

    def _decode(self, i: int, raw: bytes, out: np.ndarray | None) -> int:
        """Label of sample ``i``; its image decoded into ``out``. Errors name the sample."""
        label, image = self.source.parse(i, raw)
        self.source.decode_into(i, image, out)  # type: ignore[arg-type]
        return label

    def _substitute(self, epoch: int, i: int, out: np.ndarray | None, exc: BaseException) -> tuple[int, int]:
        """Another sample in place of the damaged ``i``: ``(its index, its label)``, decoded into ``out``."""
        info = get_worker_info()
        n = len(self.source)
        if i not in self._warned:
            self._warned.add(i)
            log.warning("%s; substituting another sample (on_corrupt='skip')", exc)
        for attempt in range(1, _MAX_SUBSTITUTES + 1):
            self.skipped[0 if info is None else 1 + info.id % (_SLOTS - 1)] += 1
            step = 1 + int(hash_uniform(self.seed + attempt, epoch, np.array([i]))[0] * max(n - 1, 1))
            s = (i + step) % n
            try:
                return s, self._decode(s, self.source.read_raw(s), out)
            except (ValueError, OSError) as again:
                if isinstance(again, RemoteReadError):
                    raise
                exc = again
        raise CorruptImageError(
            f"{self.source.name}: {_MAX_SUBSTITUTES} substitutes for sample {i} are damaged as well "
            f"(last: {exc}); the set looks broken"
        )


def _as_is(batch: Any) -> Any:
    return batch


class _CountingIterator:
    """Starts the DataLoader's iterator at the first ``next()`` and counts delivered batches."""

    def __init__(self, loader: "TrainLoader") -> None:
        self.loader = loader
        self._it: Iterator | None = None

    def __iter__(self) -> "_CountingIterator":
        return self

    def __len__(self) -> int:
        return len(self.loader)

    def __next__(self) -> Any:
        if self._it is None:
            self._it = DataLoader.__iter__(self.loader)
        try:
            batch = next(self._it)
        except StopIteration:
            raise
        except BaseException:  # a data error: stop the workers now, not whenever the traceback is freed
            shutdown = getattr(self._it, "_shutdown_workers", None)
            if shutdown is not None and not self.loader.persistent_workers:
                shutdown()
            self._it = iter(())
            raise
        self.loader.sampler.delivered += 1
        return batch


class TrainLoader(DataLoader):
    """``DataLoader`` of ``(images uint8 [B,3,H,W], labels int64 [B], sample_index int64 [B])`` batches.

    Resumable: ``state_dict()`` / ``load_state_dict()`` save and restore the plan position.
    ``sampler.set_epoch`` chooses the epoch. Extra keyword arguments go to ``DataLoader``
    (``num_workers``, ``pin_memory``, ``persistent_workers``, ``prefetch_factor``, ...).
    """

    def __init__(self, reader: BatchReader, sampler: PlanSampler, **kwargs: Any) -> None:
        # worker seeds come from the loader's own generator: starting an iterator (each epoch, and
        # on resume) never draws from the global torch RNG, which a resumed run restores
        kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.spec.seed))
        super().__init__(reader, batch_size=None, sampler=sampler, collate_fn=_as_is, **kwargs)

    def __iter__(self) -> _CountingIterator:  # type: ignore[override]
        return _CountingIterator(self)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)  # type: ignore[attr-defined]
