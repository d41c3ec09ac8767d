"""Training and verification datasets over RecordIO face sets.

* :class:`RecordDataset` -- map-style, one random read per sample; shuffled and sharded by the
  sampler (:class:`EpochDistributedSampler`, or Lightning's ``DistributedSampler``).
* :class:`RecordStream` -- iterable, reads the ``.rec`` sequentially in blocks of ``chunk_bytes``;
  block order is a seeded permutation per epoch, split into equal contiguous spans per
  (rank, DataLoader worker), then mixed by a shuffle buffer. Every rank yields the same number
  of samples and batches, so DDP collectives never hang.

All yield ``(image float32 [3, H, W] RGB normalised, label/index int64)``.

Corrupt images (``on_corrupt="skip"``): the record is replaced by *another valid record with
its own true label* (chosen deterministically), the skip is counted (``num_skipped``, shared
across DataLoader workers) and logged once per key with the file and key. Batches therefore
keep their size -- dropping samples at collate time would give ranks unequal batch sizes and
break the cross-rank gathers of the margin head -- and no image is ever paired with a wrong
label. Structural errors (bad magic, label out of range, index/record mismatch) always raise.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, IterableDataset, get_worker_info

from .decode import CorruptImageError, decode_image, normalize_uint8, to_uint8_chw
from .faceset import FaceRecordSet
from .recordio import RecordIOError, unpack_record

__all__ = [
    "RecordDataset",
    "RecordStream",
    "EpochDistributedSampler",
    "shard_span",
    "resolve_rank_world",
]

log = logging.getLogger(__name__)

OnCorrupt = Literal["raise", "skip"]
Output = Literal["float", "uint8"]
_MASK64 = (1 << 64) - 1
_MAX_COUNTER_SLOTS = 128  # slot 0: main process, slot 1 + worker_id: DataLoader workers


# --------------------------------------------------------------------------- helpers
def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _hash_uniform(*values: int) -> float:
    """Deterministic uniform [0, 1) from integers (cheap; independent of worker assignment)."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return (h >> 11) * (1.0 / (1 << 53))


def resolve_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: explicit args win, else ``torch.distributed`` if initialised, else ``(0, 1)``."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
        else:
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}")
    return int(rank), int(world_size)


def _check_on_corrupt(value: str) -> str:
    if value not in ("raise", "skip"):
        raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {value!r}")
    return value


def _check_output(value: str) -> str:
    if value not in ("float", "uint8"):
        raise ValueError(f"output must be 'float' or 'uint8', got {value!r}")
    return value


def _convert(img: np.ndarray, flip: bool, output: str) -> torch.Tensor:
    chw = to_uint8_chw(img, flip)
    return chw if output == "uint8" else normalize_uint8(chw)


def _as_faceset(root: str | os.PathLike | FaceRecordSet) -> FaceRecordSet:
    return root if isinstance(root, FaceRecordSet) else FaceRecordSet(root)


class _SharedState:
    """Small int64 tensors in shared memory: visible to (persistent) DataLoader workers."""

    def __init__(self) -> None:
        self.values = torch.zeros(2, dtype=torch.int64).share_memory_()  # [epoch, start_batch]
        self.skipped = torch.zeros(_MAX_COUNTER_SLOTS, dtype=torch.int64).share_memory_()

    def count_skip(self) -> None:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (_MAX_COUNTER_SLOTS - 1)
        self.skipped[slot] += 1  # one writer per slot: no race


def _corrupt_message(path: Path, key: int, exc: BaseException) -> str:
    return f"{path} (key {key}): corrupt image: {exc}"


# --------------------------------------------------------------------------- map-style
class RecordDataset(Dataset):
    """Map-style dataset over a RecordIO face set: ``(image float[3,H,W], label int64)``.

    Args:
        root: directory with ``train.rec/.idx/property`` (or a :class:`FaceRecordSet`).
        train: apply the random horizontal flip (``flip_p``); ``False`` = no augmentation.
        flip_p: flip probability. The decision is a hash of ``(seed, epoch, index)``: reproducible
            and independent of the worker that loads the sample; :meth:`set_epoch` varies it.
        on_corrupt: ``"raise"`` (a :class:`CorruptImageError` naming file and key) or ``"skip"``
            (substitute another valid record with its own label; see the module docstring).
        seed: seed of the flips and of the substitute choice.
        transform: optional ``uint8 [H, W, 3] RGB -> Tensor`` replacing the default
            normalisation (applied after the flip).
        output: ``"float"`` (normalised float32) or ``"uint8"`` (``[3, H, W]`` uint8, normalise
            later with :func:`~facemargin.data.decode.normalize_uint8`, e.g. on the GPU).
    """

    def __init__(
        self,
        root: str | os.PathLike | FaceRecordSet,
        train: bool = True,
        flip_p: float = 0.5,
        on_corrupt: OnCorrupt = "raise",
        seed: int = 0,
        transform: Callable[[np.ndarray], torch.Tensor] | None = None,
        output: Output = "float",
    ) -> None:
        self.faceset = _as_faceset(root)
        self.output = _check_output(output)
        self.keys = np.asarray(self.faceset.image_keys, dtype=np.int64)
        self.train = bool(train)
        self.flip_p = float(flip_p) if train else 0.0
        self.on_corrupt = _check_on_corrupt(on_corrupt)
        self.seed = int(seed)
        self.transform = transform
        self._state = _SharedState()
        self._warned: set[int] = set()

    @property
    def num_classes(self) -> int:
        return int(self.faceset.num_classes)

    @property
    def epoch(self) -> int:
        return int(self._state.values[0])

    def set_epoch(self, epoch: int) -> None:
        """Change the flip pattern for ``epoch`` (shared with running workers)."""
        self._state.values[0] = int(epoch)

    @property
    def num_skipped(self) -> int:
        """Corrupt records replaced so far, summed over this process and its DataLoader workers."""
        return int(self._state.skipped.sum())

    def __len__(self) -> int:
        return int(self.keys.size)

    def labels(self) -> np.ndarray:
        """Label of every sample (int64), in index order."""
        return self.faceset.labels()

    def _load(self, index: int) -> tuple[np.ndarray, int, int]:
        key = int(self.keys[index])
        label, data = self.faceset.read(key)
        try:
            img = decode_image(data)
        except CorruptImageError as exc:
            raise CorruptImageError(_corrupt_message(self.faceset.rec_path, key, exc)) from exc
        return img, label, key

    def _flip(self, index: int) -> bool:
        return self.flip_p > 0 and _hash_uniform(self.seed, self.epoch, index) < self.flip_p

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples in {self.faceset.rec_path}")
        index %= n
        src = index
        attempts = 0
        while True:
            try:
                img, label, _ = self._load(src)
                break
            except CorruptImageError as exc:
                if self.on_corrupt == "raise":
                    raise
                self._state.count_skip()
                key = int(self.keys[src])
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning("%s; substituting another record (on_corrupt='skip')", exc)
                attempts += 1
                if attempts > 64:
                    raise CorruptImageError(
                        f"{self.faceset.rec_path}: 64 consecutive substitutes for index {index} are corrupt "
                        "as well; the file looks damaged"
                    ) from exc
                # a deterministic other index: its own label travels with it, never the corrupt one's
                src = (src + 1 + int(_hash_uniform(self.seed, index, attempts) * (n - 1))) % n if n > 1 else src
        flip = self._flip(index)
        if self.transform is not None:
            image = self.transform(np.ascontiguousarray(img[:, ::-1]) if flip else img)
        else:
            image = _convert(img, flip, self.output)
        return image, torch.tensor(label, dtype=torch.long)


class EpochDistributedSampler(DistributedSampler):
    """``DistributedSampler`` whose ``set_epoch`` also reaches the dataset (for epoch-dependent flips).

    Lightning calls ``set_epoch`` on the sampler at each training epoch and leaves a
    ``DistributedSampler`` in place. ``num_replicas``/``rank`` default like
    :func:`resolve_rank_world` (so it also works without a process group).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        rank, num_replicas = resolve_rank_world(rank, num_replicas)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self._resume_epoch: int | None = None
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self._resume_epoch is not None and int(epoch) != self._resume_epoch:
            self._resume_epoch, self._skip = None, 0  # a resume point is valid for its own epoch only
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def resume(self, epoch: int, samples_consumed: int) -> None:
        """Continue epoch ``epoch`` after its first ``samples_consumed`` indices (of this rank)."""
        self.set_epoch(epoch)
        self._resume_epoch, self._skip = int(epoch), max(0, min(int(samples_consumed), self.num_samples))

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self._skip :])

    # __len__ stays the full epoch's (DistributedSampler's): Lightning counts the restored
    # batches against it, so after a resume the loader simply ends early.


# --------------------------------------------------------------------------- streaming
def shard_span(
    total: int,
    world_size: int,
    rank: int,
    batch_size: int,
    drop_last: bool = True,
    num_workers: int = 1,
    worker_id: int = 0,
) -> tuple[int, int, int]:
    """Where one (rank, worker) reads in an epoch's virtual sample sequence.

    Returns ``(start, num_samples, num_batches_of_rank)``. Each rank gets the same number of
    samples: ``floor(total / (world * B)) * B`` with ``drop_last`` (the tail is dropped), else
    ``ceil(total / world)`` (positions past ``total`` wrap around, like ``DistributedSampler``).
    A rank's batches are dealt to its workers round-robin (worker ``w`` makes batches
    ``w, w + W, ...``, exactly the order the DataLoader collects them in), so every worker yields
    whole batches and only the rank's last batch can be partial.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if drop_last:
        nb = total // (world_size * batch_size)
        per_rank = nb * batch_size
    else:
        per_rank = math.ceil(total / world_size) if total else 0
        nb = math.ceil(per_rank / batch_size)
    last = per_rank - (nb - 1) * batch_size if nb else 0  # size of the rank's last batch

    def worker_samples(w: int) -> int:
        nbw = len(range(w, nb, num_workers))
        n = nbw * batch_size
        if nb and (nb - 1) % num_workers == w:
            n -= batch_size - last
        return n

    start = rank * per_rank + sum(worker_samples(w) for w in range(worker_id))
    return start, worker_samples(worker_id), nb


class _StreamEpochSampler(torch.utils.data.Sampler):
    """Stand-in ``DataLoader.sampler`` for a stream: infinite like PyTorch's, plus ``set_epoch``."""

    def __init__(self, stream: "RecordStream") -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[None]:
        while True:
            yield None

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)


class StreamDataLoader(torch.utils.data.DataLoader):
    """``DataLoader`` for a :class:`RecordStream` that forwards Lightning's per-epoch ``set_epoch``.

    PyTorch forbids samplers with iterable datasets, and Lightning only calls ``set_epoch`` on
    ``loader.sampler``; this loader exposes a sampler object that forwards it to the stream.
    Batch size and ``drop_last`` come from the stream.
    """

    def __init__(self, stream: "RecordStream", **kwargs: Any) -> None:
        for k in ("batch_size", "drop_last", "shuffle", "sampler", "batch_sampler"):
            if k in kwargs:
                raise TypeError(f"StreamDataLoader takes {k} from the stream; do not pass {k}=")
        super().__init__(stream, batch_size=stream.batch_size, drop_last=stream.drop_last, **kwargs)

    @property  # type: ignore[override]
    def sampler(self) -> torch.utils.data.Sampler:
        return self._epoch_sampler

    @sampler.setter
    def sampler(self, value: torch.utils.data.Sampler) -> None:  # set once by DataLoader.__init__
        self._epoch_sampler = _StreamEpochSampler(self.dataset)  # type: ignore[arg-type]


class RecordStream(IterableDataset):
    """Sequential, sharded, shuffle-buffered stream over a RecordIO face set.

    Args:
        root: directory with ``train.rec/.idx/property`` (or a :class:`FaceRecordSet`).
        batch_size: the per-rank DataLoader batch size (needed to give every rank and worker
            whole batches); use :class:`StreamDataLoader` or ``DataLoader(stream,
            batch_size=stream.batch_size, drop_last=stream.drop_last)``.
        shuffle_buffer: shuffle-buffer size *per DataLoader worker* (samples held as bytes).
        seed: base seed; the block order of epoch ``e`` comes from ``(seed, e)``.
        flip_p: horizontal flip probability (0 disables).
        chunk_bytes: block size: the unit of sequential reading and of the per-epoch shuffle
            of the file. Smaller blocks mix identities better (insightface sets are sorted by
            identity); larger ones read more sequentially.
        drop_last: drop the tail so every rank gets ``floor(N / (world * B))`` full batches;
            ``False`` pads by wrapping around (a few duplicates, last batch partial).
        on_corrupt: ``"raise"`` or ``"skip"`` (a corrupt image is replaced by a recently read
            valid sample with its own label, so counts stay equal across ranks).
        rank, world_size: default from ``torch.distributed`` when initialised (at construction),
            else ``0`` and ``1``.
        output: ``"float"`` or ``"uint8"`` (see :class:`RecordDataset`).
    """

    def __init__(
        self,
        root: str | os.PathLike | FaceRecordSet,
        batch_size: int,
        shuffle_buffer: int = 10_000,
        seed: int = 0,
        flip_p: float = 0.5,
        chunk_bytes: int = 4 << 20,
        drop_last: bool = True,
        on_corrupt: OnCorrupt = "raise",
        rank: int | None = None,
        world_size: int | None = None,
        output: Output = "float",
    ) -> None:
        super().__init__()
        self.faceset = _as_faceset(root)
        self.output = _check_output(output)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.seed = int(seed)
        self.flip_p = float(flip_p)
        self.chunk_bytes = max(1, int(chunk_bytes))
        self.drop_last = bool(drop_last)
        self.on_corrupt = _check_on_corrupt(on_corrupt)
        self.rank, self.world_size = resolve_rank_world(rank, world_size)
        self._state = _SharedState()
        self._resume_epoch: int | None = None

        # image records in file order, their offsets, and block boundaries
        reader = self.faceset.reader
        keys = np.asarray(self.faceset.image_keys, dtype=np.int64)
        all_keys = np.asarray(reader.key_array, dtype=np.int64)
        all_offsets = np.asarray(reader.offset_array, dtype=np.int64)
        order = np.argsort(all_keys, kind="stable")
        pos = np.searchsorted(all_keys[order], keys)
        offsets = all_offsets[order][pos]
        file_order = np.argsort(offsets, kind="stable")
        self._keys = keys[file_order]
        self._offsets = offsets[file_order]
        n = self._keys.size
        if n:
            block_id = (self._offsets - self._offsets[0]) // self.chunk_bytes
            starts = np.flatnonzero(np.r_[True, block_id[1:] != block_id[:-1]])
        else:
            starts = np.zeros(0, dtype=np.int64)
        self._block_start = starts.astype(np.int64)
        self._block_len = np.diff(np.r_[starts, n]).astype(np.int64)
        if len(self) == 0:
            raise ValueError(
                f"{self.faceset.rec_path}: {n} images are fewer than world_size * batch_size = "
                f"{self.world_size} * {self.batch_size}; with drop_last=True every rank would get 0 batches"
            )

    # ---- sizes and epochs
    @property
    def num_classes(self) -> int:
        return int(self.faceset.num_classes)

    @property
    def num_records(self) -> int:
        """Image records in the set (before per-rank truncation)."""
        return int(self._keys.size)

    @property
    def num_blocks(self) -> int:
        return int(self._block_len.size)

    def __len__(self) -> int:
        """Samples this rank yields per epoch (identical on every rank)."""
        _, _, nb = shard_span(self.num_records, self.world_size, self.rank, self.batch_size, self.drop_last)
        if self.drop_last:
            return nb * self.batch_size
        return math.ceil(self.num_records / self.world_size)

    def num_batches(self) -> int:
        """Batches per epoch on every rank."""
        return shard_span(self.num_records, self.world_size, self.rank, self.batch_size, self.drop_last)[2]

    @property
    def epoch(self) -> int:
        return int(self._state.values[0])

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s order (shared with persistent workers: takes effect at the next ``iter``)."""
        epoch = int(epoch)
        if self._resume_epoch is not None and epoch != self._resume_epoch:
            self._state.values[1] = 0  # a resume point is valid for its own epoch only
            self._resume_epoch = None
        self._state.values[0] = epoch

    @property
    def num_skipped(self) -> int:
        """Corrupt records replaced so far, summed over this process and its DataLoader workers."""
        return int(self._state.skipped.sum())

    def state_dict(self, batches_consumed: int = 0) -> dict[str, int]:
        """Resume point: the epoch and how many of this epoch's batches the trainer consumed."""
        return {
            "epoch": self.epoch,
            "batches_consumed": int(batches_consumed),
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_records": self.num_records,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue epoch ``state['epoch']`` after its first ``batches_consumed`` batches."""
        epoch = int(state["epoch"])
        consumed = int(state.get("batches_consumed", 0))
        same_plan = all(
            int(state.get(k, v)) == v
            for k, v in (
                ("seed", self.seed),
                ("world_size", self.world_size),
                ("batch_size", self.batch_size),
                ("num_records", self.num_records),
            )
        )
        if consumed and not same_plan:
            log.warning(
                "RecordStream: seed/world_size/batch_size/num_records changed since the checkpoint; "
                "restarting epoch %d from its beginning",
                epoch,
            )
            consumed = 0
        self._state.values[0] = epoch
        self._state.values[1] = max(0, min(consumed, self.num_batches()))
        self._resume_epoch = epoch

    # ---- planning
    def _block_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])  # identical on every rank
        return rng.permutation(self.num_blocks)

    def _pieces(self, epoch: int, start: int, count: int) -> list[tuple[int, int]]:
        """File-order index ranges ``[i0, i1)`` covering virtual positions ``[start, start + count)``."""
        n = self.num_records
        perm = self._block_order(epoch)
        lens = self._block_len[perm]
        ends = np.cumsum(lens)
        starts = ends - lens
        pieces: list[tuple[int, int]] = []
        pos, remaining = start % n if n else 0, count
        while remaining > 0:
            b = int(np.searchsorted(ends, pos, side="right"))
            within = pos - int(starts[b])
            take = min(int(lens[b]) - within, remaining)
            i0 = int(self._block_start[perm[b]]) + within
            pieces.append((i0, i0 + take))
            remaining -= take
            pos = (pos + take) % n
        return pieces

    def _records(self, pieces: list[tuple[int, int]]) -> Iterator[tuple[int, int, bytes]]:
        """``(key, label, image_bytes)`` for the pieces, read sequentially with ``reader.scan``."""
        reader = self.faceset.reader
        rec_path = self.faceset.rec_path
        for i0, i1 in pieces:
            want = self._offsets[i0:i1]
            keys = self._keys[i0:i1]
            j = 0
            for offset, payload in reader.scan(int(want[0]), int(want[-1]) + 1):
                if offset != want[j]:
                    continue  # a non-image record (meta / identity range) between images
                key = int(keys[j])
                j += 1
                try:
                    header, labels, image = unpack_record(payload)
                except ValueError as exc:
                    raise RecordIOError(f"{rec_path} (key {key}): {exc}") from None
                value = float(labels) if header.flag == 0 else float(labels[0])
                yield key, self.faceset._check_label(value, key), image
                if j == want.size:
                    break
            if j != want.size:
                raise RecordIOError(
                    f"{rec_path}: sequential scan did not find the record of key {int(keys[j])} at offset "
                    f"{int(want[j])}; the .idx does not match the .rec"
                )

    def _shuffled(
        self, pieces: list[tuple[int, int]], rng: np.random.Generator
    ) -> Iterator[tuple[int, int, bytes]]:
        buf: list[tuple[int, int, bytes]] = []
        size = self.shuffle_buffer
        for item in self._records(pieces):
            if len(buf) < size:
                buf.append(item)
                continue
            j = int(rng.integers(size))
            out, buf[j] = buf[j], item
            yield out
        rng.shuffle(buf)  # type: ignore[arg-type]
        yield from buf

    # ---- iteration
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = int(self._state.values[0])
        start_batch = int(self._state.values[1])
        wid, nw = self._worker()
        start, count, _ = shard_span(
            self.num_records, self.world_size, self.rank, self.batch_size, self.drop_last, nw, wid
        )
        # batches of this worker already consumed before a resume (worker w makes batches w, w+W, ...)
        skip = len(range(wid, start_batch, nw)) * self.batch_size
        if count == 0 or skip >= count:
            return
        rng = np.random.default_rng([self.seed, epoch, self.rank, wid, nw])
        sub_rng = np.random.default_rng([self.seed, epoch, self.rank, wid, nw, 1])
        recent: deque[tuple[int, int, bytes]] = deque(maxlen=64)
        pending = 0  # corrupt samples still to replace
        rec_path = self.faceset.rec_path
        for n, (key, label, data) in enumerate(self._shuffled(self._pieces(epoch, start, count), rng)):
            flip = self.flip_p > 0 and bool(rng.random() < self.flip_p)
            if n < skip:
                continue
            try:
                img = decode_image(data)
            except CorruptImageError as exc:
                if self.on_corrupt == "raise":
                    raise CorruptImageError(_corrupt_message(rec_path, key, exc)) from exc
                self._state.count_skip()
                log.warning("%s; substituting another sample (on_corrupt='skip')", _corrupt_message(rec_path, key, exc))
                if not recent:
                    pending += 1
                    continue
                key, label, data = recent[int(sub_rng.integers(len(recent)))]
                img = decode_image(data)
            else:
                recent.append((key, label, data))
            yield self._sample(img, label, flip)
            while pending and recent:
                pending -= 1
                _, sub_label, sub_data = recent[-1]
                sub_flip = self.flip_p > 0 and bool(sub_rng.random() < self.flip_p)
                yield self._sample(decode_image(sub_data), sub_label, sub_flip)
        if pending:
            raise CorruptImageError(f"{rec_path}: every image of this worker's shard is corrupt; nothing to substitute")

    def _sample(self, img: np.ndarray, label: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _convert(img, flip, self.output), torch.tensor(label, dtype=torch.long)
