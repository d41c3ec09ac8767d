"""A RecordIO face set (``train.rec`` / ``train.idx`` / ``property``) as a training source.

Samples are the image records in file order (the layouts: :mod:`facemargin.data.formats.faceset`).
A sample's identity is its first label, checked on every read: an integer in ``[0, num_classes)``
and, when the set has identity ranges, one whose range holds the record's key -- a bit flip in a
stored float label then fails naming the key instead of silently training another class.

Opening validates ``property``, the index (:mod:`facemargin.data.formats.index`) and the layout,
then caches the result as one memory-mapped array next to the ``.idx`` (or under
``$FACEMARGIN_CACHE`` when that folder is read-only), so later opens -- every rank, every worker --
only ``stat`` the files and map the cache.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..formats.faceset import (INSIGHTFACE, LAYOUT_ARRAYS, LAYOUT_NAMES, MAX_CLASSES, check_classes, read_layout,
                               read_runs)
from ..formats.index import INDEX_SECTIONS, RecordIndex, build_index
from ..formats.recordio import MAGIC, RecordIOError, RecordIOReader, unindexed_record
from ..formats.setfiles import SetFiles
from ..formats.stamped import CacheWriteError, StampedWriter, build_lock, load_stamped, save_stamped
from .base import FaceSource

__all__ = ["FaceRecordSet"]

log = logging.getLogger(__name__)

_HEAD = struct.Struct("<IIIf")  # magic, lrecord, IRHeader flag, IRHeader label
#: sections of the cache: the index's, then the layout's
_SECTIONS = INDEX_SECTIONS + LAYOUT_ARRAYS
_FLOAT = struct.Struct("<f")


def _files(root: str | os.PathLike | SetFiles, name: str, remote: Mapping[str, Any] | None) -> SetFiles:
    if isinstance(root, SetFiles):
        if remote is not None or name != "train":
            raise TypeError("name= and remote= belong to SetFiles.at(); they cannot be given with a SetFiles")
        return root
    return SetFiles.at(root, remote, name)


class FaceRecordSet(FaceSource):
    """An insightface/im2rec RecordIO face set directory (local path or URL).

    Args:
        root: directory (or URL) holding ``train.rec``, ``train.idx`` and ``property``, or the
            :class:`~facemargin.data.formats.setfiles.SetFiles` already resolved from it.
        num_classes: override (or replace a missing) ``property`` class count.
        image_size: ``(h, w)`` override; needed only when ``property`` is missing
            (otherwise the most common size of 64 image headers spread over the set).
        name: base name of the record files (``train``).
        remote: options of remote reads (:func:`~facemargin.data.storage.source.remote_options`).

    Attributes: ``num_classes``, ``image_size``, ``image_keys`` (int64, file order), ``layout``
    (``"insightface"`` or ``"im2rec"``), ``identity_range`` (``(a, b)`` or ``None``), ``reader``,
    ``subset`` (the ``.idx`` lists a subset of the records on purpose: ``train.idx.subset`` exists;
    otherwise a record must end where the next indexed one starts, else it is an error),
    ``files`` (``root``, ``rec_path``, ``idx_path``, ``property_path`` read from it).
    """

    def __init__(self, root: str | os.PathLike | SetFiles, num_classes: int | None = None,
                 image_size: tuple[int, int] | None = None, name: str = "train",
                 remote: Mapping[str, Any] | None = None) -> None:
        self.files = files = _files(root, name, remote)
        self.name = str(files.rec)
        files.refuse_image_folder()
        self._idx_local = files.local_index()
        self.subset = files.lists_subset()
        source = files.open_rec()
        if files.has_property():
            classes, h, w = files.read_property()
            self.num_classes = int(num_classes) if num_classes is not None else classes
            self.image_size: tuple[int, int] | None = tuple(image_size) if image_size else (h, w)  # type: ignore[assignment]
        elif num_classes is not None:
            self.num_classes = int(num_classes)
            self.image_size = tuple(image_size) if image_size else None  # type: ignore[assignment]
        else:
            raise FileNotFoundError(
                f"property file not found: {files.property} (expected 'num_classes,height,width'; "
                "or pass num_classes= explicitly)"
            )
        self._cache_file = files.cache_file(self._idx_local, "facemargin")
        self._stamp = files.stamp(source, self._idx_local)
        self._open_index(source)
        check_classes(self.num_classes, int(self._lo.size), num_classes is not None, files.property, files.rec)
        if self.image_size is None:
            self.image_size = self.sampled_image_size()  # the most common of 64 headers, bounded
        self._labels: np.ndarray | None = None

    @staticmethod
    def peek(root: str | os.PathLike | SetFiles, name: str = "train", remote: Mapping[str, Any] | None = None,
             num_classes: int | None = None) -> tuple[int, tuple[int, int]]:
        """``(num_classes, image_size)`` without opening the index when ``property`` is there (else the
        set is opened: ``num_classes`` then stands in for ``property``'s, as in the constructor)."""
        files = _files(root, name, remote)
        files.refuse_image_folder()
        if files.has_property():
            classes, h, w = files.read_property()
            return (int(num_classes) if num_classes is not None else classes), (h, w)
        fs = FaceRecordSet(files, num_classes=num_classes)
        return fs.num_classes, fs.image_size  # type: ignore[return-value]

    # ---- where the files are (resolved once, in ``files``)
    @property
    def root(self) -> Path | str:
        return self.files.root

    @property
    def rec_path(self) -> Path | str:
        return self.files.rec

    @property
    def idx_path(self) -> Path | str:
        return self.files.idx

    @property
    def property_path(self) -> Path | str:
        return self.files.property

    # ---- index and layout (built once, cached)
    def _open_index(self, source) -> None:
        arrays = load_stamped(self._cache_file, self._stamp, _SECTIONS)
        if arrays is None:
            with build_lock(self._cache_file):  # one rank builds, the others wait and map its cache
                arrays = load_stamped(self._cache_file, self._stamp, _SECTIONS)
                if arrays is None:
                    try:
                        arrays = self._build_index(source, StampedWriter(self._cache_file, self._stamp, _SECTIONS))
                    except CacheWriteError as exc:
                        log.info("%s: cannot write the index cache (%s); kept in memory", self.idx_path, exc)
                        arrays = self._build_index(source, StampedWriter(None, self._stamp, _SECTIONS))
        self._set_arrays(arrays, source)

    def _set_arrays(self, arrays: list[np.ndarray], source) -> None:
        self.index = RecordIndex.from_sections(arrays[:INDEX_SECTIONS], source.size)
        samples, lo, hi, meta = arrays[INDEX_SECTIONS:]
        self.reader = RecordIOReader(self.rec_path, self.idx_path, index=self.index, source=source,
                                     exact_spans=not self.subset)
        layout, a, b, start, count = (int(x) for x in meta[:5])
        self.layout = LAYOUT_NAMES[layout]
        self.identity_range = (a, b) if layout == INSIGHTFACE and b > a else None
        self._samples = samples if samples.size else None
        self._sample_start, self._count = start, count
        self._lo, self._hi = lo, hi
        self._arrays = arrays

    def _build_index(self, source, writer: StampedWriter) -> list[np.ndarray]:
        """The cache's sections: the ``.idx`` streamed into ``writer``, then the layout read through it."""
        try:
            index = build_index(self._idx_local, str(self.idx_path), source.size, source.name, writer)
            reader = RecordIOReader(self.rec_path, self.idx_path, index=index, source=source, exact_spans=not self.subset)
            for array in read_layout(reader):
                writer.section(array)
            return writer.finish()
        finally:
            writer.abort()

    # ---- samples
    def __len__(self) -> int:
        return int(self._count)

    def positions(self, indices: np.ndarray | int) -> np.ndarray:
        """File positions of samples ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        return idx + self._sample_start if self._samples is None else self._samples[idx]

    @property
    def image_keys(self) -> np.ndarray:
        """Key of every sample, in sample (file) order."""
        return self.index.keys_at(self.positions(np.arange(len(self))))

    def where(self, i: int) -> str:
        return self.reader.where(int(self.positions(i)))

    def read_raw(self, i: int) -> bytes:
        return self.reader.read_span(int(self.positions(i)))

    def read_raws(self, indices: np.ndarray) -> list[bytes]:
        return read_runs(self.reader, self.positions(indices))

    def parse(self, i: int, raw: bytes) -> tuple[int, bytes]:
        pos = i + self._sample_start if self._samples is None else int(self._samples[i])
        if len(raw) >= 36:  # fast path: one part, valid label (anything else: the checks below, with messages)
            magic, lrec, flag, value = _HEAD.unpack_from(raw, 0)
            end = 8 + lrec
            fills = ((end + 3) & ~3) == len(raw) or (self.subset and end <= len(raw))  # no bytes in no .idx line
            if magic == MAGIC and lrec >> 29 == 0 and fills:
                start = 32 + 4 * flag
                if flag:
                    (value,) = _FLOAT.unpack_from(raw, 32)
                label = int(value) if value == value and abs(value) < MAX_CLASSES else -1
                key = self.index.key_at(pos)
                if (start <= end and label == value and 0 <= label < self.num_classes
                        and (not self._lo.size or (label < self._lo.size and self._lo[label] <= key < self._hi[label]))):
                    return label, raw[start:end]
        payload = self.reader.payload_at(pos, raw)  # names a framing defect, or bytes in no .idx line
        return self._label_and_image(payload, self.index.key_at(pos), self.reader.where(pos))

    def _label_and_image(self, payload: bytes, key: int, where: str) -> tuple[int, bytes]:
        n = len(payload)
        if n < 24:
            raise RecordIOError(f"{where}: record payload truncated ({n} bytes, the header needs 24)")
        flag, value = struct.unpack_from("<If", payload, 0)
        start = 24
        if flag:
            start = 24 + 4 * flag
            if n < start:
                raise RecordIOError(f"{where}: record payload truncated: flag={flag} labels need {start} bytes, it has {n}")
            (value,) = struct.unpack_from("<f", payload, 24)
        return self.check_label(value, key, where), payload[start:]

    def check_label(self, value: float, key: int, where: str | None = None) -> int:
        """Validate a stored float label of ``key``; returns it as int.

        An integer in ``[0, num_classes)``; with identity ranges, the identity whose range holds ``key``.
        """
        where = where or f"{self.rec_path} (key {key})"
        if not math.isfinite(value) or value != int(value):
            raise RecordIOError(f"{where}: label {value!r} is not an integer")
        label = int(value)
        if not 0 <= label < self.num_classes:
            raise RecordIOError(f"{where}: label {label} is outside [0, {self.num_classes}) (num_classes from {self.property_path})")
        if self._lo.size and not (label < self._lo.size and self._lo[label] <= key < self._hi[label]):
            c = int(np.searchsorted(self._lo, key, side="right")) - 1
            raise RecordIOError(
                f"{where}: label {label} does not match the identity ranges of the meta record: key {key} belongs to "
                f"identity {c} (keys {int(self._lo[c])}..{int(self._hi[c]) - 1}); the stored label is damaged"
            )
        return label

    def read(self, key: int) -> tuple[int, bytes]:
        """``(identity label, encoded image bytes)`` for the record under ``key``."""
        pos = self.reader.position(int(key))
        return self._label_and_image(self.reader.payload_at(pos), int(key), self.reader.where(pos))

    def label(self, key: int) -> int:
        """Identity label of ``key`` (validated)."""
        return self.read(key)[0]

    def label_from_head(self, head: bytes, key: int) -> int:
        """Identity label from the start of ``key``'s payload (the first 28 bytes suffice; validated)."""
        where = f"{self.rec_path} (key {key})"
        flag, value = struct.unpack_from("<If", head, 0) if len(head) >= 24 else (0, None)
        if value is None or (flag and len(head) < 28):
            raise RecordIOError(f"{where}: record payload truncated ({len(head)} bytes)")
        if flag:
            (value,) = struct.unpack_from("<f", head, 24)
        return self.check_label(value, int(key), where)

    # ---- label table
    @property
    def labels_cache_path(self) -> Path:
        """Where :meth:`labels` caches the label table of an im2rec set."""
        return self.files.cache_file(self._idx_local, "labels")

    def labels(self) -> np.ndarray:
        """Identity of every sample (int64, sample order).

        insightface sets: from the identity ranges (no reads). im2rec sets: every record header,
        read once sequentially and cached next to the index (keyed like the index cache).
        """
        if self._labels is not None:
            return self._labels
        keys = self.image_keys
        if self._lo.size:
            self._labels = np.searchsorted(self._lo, keys, side="right").astype(np.int64) - 1
            return self._labels
        cached = load_stamped(self.labels_cache_path, [*self._stamp, self.num_classes], 1)
        if cached is not None and cached[0].size == len(self):
            self._labels = np.asarray(cached[0])
            return self._labels
        labels = np.full(len(self), -1, dtype=np.int64)
        sample = np.full(len(self.index), -1, dtype=np.int64)  # file position -> sample index
        sample[self.positions(np.arange(len(self)))] = np.arange(len(self))
        for offset, pos, payload in self.reader.walk():  # one sequential read of the .rec
            if pos < 0:
                if self.subset:
                    continue  # left out of the index on purpose
                raise unindexed_record(self.reader, offset)
            if payload is None:
                self.reader.payload_at(pos)  # names the framing defect
                raise RecordIOError(f"{self.reader.where(pos)}: not the start of a record (the .idx points inside one)")
            if sample[pos] >= 0:
                labels[sample[pos]] = self._label_and_image(payload, self.index.key_at(pos), self.reader.where(pos))[0]
        save_stamped(self.labels_cache_path, [*self._stamp, self.num_classes], [labels])
        self._labels = labels
        return labels

    # ---- pickling (DataLoader workers): re-map the cache instead of copying the arrays
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if load_stamped(self._cache_file, self._stamp, _SECTIONS) is not None:
            for name in ("index", "reader", "_samples", "_lo", "_hi", "_arrays"):
                state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "_arrays" not in state:
            arrays = load_stamped(self._cache_file, self._stamp, _SECTIONS)
            if arrays is None:
                raise RecordIOError(f"{self._cache_file}: the index cache changed while workers were starting")
            self._set_arrays(arrays, self.files.open_rec())

    def __repr__(self) -> str:
        return (
            f"FaceRecordSet({str(self.root)!r}, images={len(self)}, num_classes={self.num_classes}, "
            f"image_size={self.image_size}, layout={self.layout!r})"
        )
