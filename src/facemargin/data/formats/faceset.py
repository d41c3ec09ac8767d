"""The insightface / im2rec face-set format: the ``property`` file and the layout of the records.

A set is ``train.rec`` / ``train.idx`` / ``property`` (``num_classes,height,width``). Two layouts
are recognised:

* **insightface**: record 0 is a meta record (``flag > 0``, no image) whose labels ``(a, b)``
  say images are keys ``1 .. a-1`` and per-identity ranges are keys ``a .. b-1``; identity
  ``c``'s record holds ``(first_key, last_key + 1)`` of its images;
* **im2rec**: record 0 is an ordinary image (``flag == 0`` or it carries image bytes), so every key
  in the ``.idx`` is an image.

:func:`read_layout` validates the meta record before allocating anything it sizes (a short or huge
range, keys it does not cover) and returns the sample table that
:class:`~facemargin.data.sources.recordio.FaceRecordSet` caches and trains from.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..storage.cache import cached_copy
from .recordio import _ONE_READ_LIMIT, MAGIC, RecordIOError, RecordIOReader, unpack_record

__all__ = ["read_property", "read_layout", "check_classes", "read_runs", "MAX_CLASSES", "MAX_SIDE", "INSIGHTFACE", "IM2REC",
           "LAYOUT_NAMES", "LAYOUT_ARRAYS"]

log = logging.getLogger(__name__)

#: Float32 labels hold every integer below 2**24 exactly; no set has more identities.
MAX_CLASSES = 1 << 24
MAX_SIDE = 16384
INSIGHTFACE, IM2REC = 1, 0
LAYOUT_NAMES = {INSIGHTFACE: "insightface", IM2REC: "im2rec"}
#: How many arrays :func:`read_layout` returns.
LAYOUT_ARRAYS = 4
_RUN_BYTES = 64 << 20  # most bytes one read of neighbouring records asks for


def read_property(path: str | os.PathLike, **remote: Any) -> tuple[int, int, int]:
    """Parse a ``property`` file: ``num_classes,height,width`` within sane bounds (``remote``: see :func:`open_source`)."""
    local = Path(cached_copy(path, **remote))
    if not local.is_file():
        raise FileNotFoundError(f"property file not found: {path} (expected 'num_classes,height,width')")
    text = local.read_bytes()[:200].decode("ascii", errors="replace").strip()
    try:
        fields = [int(x) for x in text.split(",")]
        if len(fields) != 3 or min(fields) <= 0 or any(len(x.strip()) > 9 for x in text.split(",")):
            raise ValueError
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,height,width' with positive integers, got {text[:80]!r}") from None
    classes, h, w = fields
    if classes > MAX_CLASSES:
        raise ValueError(f"{path}: {classes} classes is more than float32 labels can hold exactly ({MAX_CLASSES})")
    if max(h, w) > MAX_SIDE:
        raise ValueError(f"{path}: image size {w}x{h} is larger than {MAX_SIDE} pixels a side")
    return classes, h, w


def read_layout(reader: RecordIOReader) -> list[np.ndarray]:
    """The sample table of a set whose index ``reader`` holds, checked against the meta record.

    Returns the arrays cached per set (:data:`LAYOUT_ARRAYS` of them, int64): ``samples`` (file
    positions of the images when they are not one contiguous run, else empty), ``lo``, ``hi``
    (identity ranges: identity ``c`` holds image keys ``lo[c] .. hi[c] - 1``; empty for im2rec) and
    ``meta = [layout, a, b, start, count]`` (:data:`INSIGHTFACE` or :data:`IM2REC`, the meta record's
    ``(a, b)``, the first image's file position and the number of images). Reads the meta record and
    the identity records, no image record.
    """
    index = reader.index
    empty = np.zeros(0, dtype=np.int64)
    pos0 = int(index.positions(0))
    if pos0 >= 0:
        header, labels, image = _unpack(reader.payload_at(pos0), reader.where(pos0))
        if header.flag > 0 and len(image) == 0:
            return _insightface_layout(reader, labels)
    return [empty, empty, empty, np.asarray([IM2REC, 0, 0, 0, len(index)], np.int64)]


def check_classes(num_classes: int, identities: int, given: bool, property_name: str | os.PathLike,
                  rec_name: str | os.PathLike) -> None:
    """``num_classes`` (from ``property``, or ``given`` as an argument) must cover the ``identities``
    the meta record lists (0 for im2rec sets)."""
    if identities and num_classes < identities:
        source = f"num_classes={num_classes} (given)" if given else f"{property_name}: {num_classes} classes"
        raise RecordIOError(f"{source}, but the meta record of {rec_name} lists {identities} identities")
    if identities and num_classes > identities:
        log.warning("%s: %d classes, the meta record lists %d identities",
                    "num_classes" if given else property_name, num_classes, identities)


def _insightface_layout(reader: RecordIOReader, meta_labels: np.ndarray) -> list[np.ndarray]:
    index, where = reader.index, f"{reader.rec_path} (key 0)"
    n = len(index)
    a = _as_key(meta_labels[0], where)
    b = _as_key(meta_labels[1], where) if meta_labels.size > 1 else a
    if a < 1 or b < a:
        raise RecordIOError(f"{where}: meta record says images are keys 1..{a - 1} and identities {a}..{b - 1}")
    if b > n:  # checked before anything of that size is allocated
        raise RecordIOError(
            f"{where}: meta record lists {a - 1} images and {b - a} identities (keys 0..{b - 1}) "
            f"but {reader.idx_path} has only {n} records"
        )
    image_start, ident_start = index.key_run(1, a), index.key_run(a, b)
    if image_start is None or ident_start is None:  # not one run each: look every key up
        image_pos = index.positions(np.arange(1, a, dtype=np.int64))
        ident_pos = index.positions(np.arange(a, b, dtype=np.int64))
        for name, pos, first in (("image", image_pos, 1), ("identity", ident_pos, a)):
            if (pos < 0).any():
                missing = int(np.argmax(pos < 0)) + first
                raise RecordIOError(
                    f"{reader.idx_path}: meta record (key 0) lists {name} keys {first}..{first + pos.size - 1}, "
                    f"but key {missing} is absent from the index"
                )
    else:  # the usual layout: nothing of the size of the image count is made
        image_pos, ident_pos = None, np.arange(ident_start, ident_start + b - a, dtype=np.int64)
    if n != b:
        extra = np.setdiff1d(index.keys, np.arange(b, dtype=np.int64))
        raise RecordIOError(
            f"{reader.idx_path}: {extra.size} keys are not covered by the meta record (key 0: images 1..{a - 1}, "
            f"identities {a}..{b - 1}), e.g. key {int(extra[0])}; their images would be dropped silently"
        )
    lo, hi = _identity_ranges(reader, ident_pos, a)
    samples = np.zeros(0, dtype=np.int64)
    if image_pos is None:
        start, count = int(image_start), a - 1  # type: ignore[arg-type]
    else:
        if image_pos.size > 1 and not bool(np.all(image_pos[1:] > image_pos[:-1])):
            image_pos = np.sort(image_pos)
        contiguous = image_pos.size == 0 or int(image_pos[-1] - image_pos[0]) == image_pos.size - 1
        start, count = (int(image_pos[0]) if image_pos.size else 0), int(image_pos.size)
        if not contiguous:
            samples = image_pos
    return [samples, lo, hi, np.asarray([INSIGHTFACE, a, b, start, count], np.int64)]


def _identity_ranges(reader: RecordIOReader, ident_pos: np.ndarray, a: int) -> tuple[np.ndarray, np.ndarray]:
    """``(first_key, last_key + 1)`` of every identity, checked to partition the image keys ``1..a-1``."""
    ranges = _packed_ranges(reader, ident_pos)
    if ranges is None:  # not the usual packed layout: one record at a time
        ranges = np.empty((ident_pos.size, 2), dtype=np.int64)
        for c, raw in enumerate(read_runs(reader, ident_pos)):
            pos = int(ident_pos[c])
            where = reader.where(pos)
            header, labels, image = _unpack(reader.payload_at(pos, raw), where)
            if header.flag < 2 or len(image):
                raise RecordIOError(f"{where}: identity record {c} must hold labels (first_key, end_key), no image")
            ranges[c] = _as_key(labels[0], where), _as_key(labels[1], where)
    lo, hi = ranges[:, 0].copy(), ranges[:, 1].copy()
    if lo.size:
        ends = np.r_[lo[1:], a]
        bad = np.flatnonzero((hi < lo) | (hi != ends) | (np.r_[lo[0] != 1, np.zeros(lo.size - 1, bool)]))
        if bad.size:
            c = int(bad[0])
            raise RecordIOError(
                f"{reader.where(int(ident_pos[c]))}: identity {c} claims image keys {int(lo[c])}..{int(hi[c]) - 1}; "
                f"the identity ranges must split keys 1..{a - 1} in order"
            )
    return lo, hi


def _packed_ranges(reader: RecordIOReader, positions: np.ndarray) -> np.ndarray | None:
    """Identity ranges ``[C, 2]`` read at once when the identity records are packed as insightface
    writes them (consecutive 40-byte records: one part, flag 2, two integer float labels); else ``None``."""
    index = reader.index
    if positions.size == 0 or int(positions[-1]) - int(positions[0]) != positions.size - 1:
        return None
    start, end = int(index.offsets[positions[0]]), index.span(int(positions[-1]))[1]
    if end - start != 40 * positions.size or bool(np.any(np.diff(index.offsets[positions]) != 40)):
        return None
    words = np.frombuffer(reader.source.pread(end - start, start), dtype="<u4")
    if words.size != 10 * positions.size:
        return None
    words = words.reshape(-1, 10)  # magic, lrecord, flag, label, id (2), id2 (2), first_key, end_key
    labels = words[:, 8:10].copy().view("<f4")
    if (words[:, 0] != MAGIC).any() or (words[:, 1] != 32).any() or (words[:, 2] != 2).any():
        return None
    if not np.isfinite(labels).all() or (labels != np.round(labels)).any() or (labels < 0).any():
        return None
    return labels.astype(np.int64)


def read_runs(reader: RecordIOReader, positions: np.ndarray) -> list[bytes]:
    """The spans of records at ``positions`` (any order), one read per run of neighbours.

    The runs are read with one ``pread_many``: a remote source keeps several requests in flight.
    """
    positions = np.asarray(positions, dtype=np.int64)
    out: list[bytes] = [b""] * positions.size
    if positions.size == 0:
        return out
    index, source = reader.index, reader.source
    runs: list[tuple[int, int, np.ndarray]] = []  # (start, end, members)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    for run in np.split(np.arange(positions.size), breaks):
        first = 0
        while first < run.size:
            p0 = int(positions[run[first]])
            start = int(index.offsets[p0])
            last = first
            while last + 1 < run.size and index.span(int(positions[run[last + 1]]))[1] - start <= _RUN_BYTES:
                last += 1
            end = index.span(int(positions[run[last]]))[1]
            if last == first and end - start > _ONE_READ_LIMIT:
                out[run[first]] = reader.read_span(p0)  # a damaged index: read header-first
            else:
                runs.append((start, end, run[first:last + 1]))
            first = last + 1
    for (start, _, members), data in zip(runs, source.pread_many([(e - s, s) for s, e, _ in runs])):
        for j in members:
            s, e = index.span(int(positions[j]))
            out[j] = data[s - start: e - start]
    return out


def _unpack(payload: bytes, where: str):
    try:
        return unpack_record(payload)
    except ValueError as exc:
        raise RecordIOError(f"{where}: {exc}") from None


def _as_key(value: float, where: str) -> int:
    value = float(value)
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise RecordIOError(f"{where}: meta label {value!r} is not a valid key")
    return int(value)
