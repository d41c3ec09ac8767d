"""MXNet RecordIO, read and written without MXNet.

File format (dmlc-core ``RecordIOWriter``, as used by ``mx.recordio.MXIndexedRecordIO``):

* ``.rec``: a sequence of *parts*, each behind a magic number, a record split where its payload
  holds the magic (:mod:`facemargin.data.formats.framing`).
* ``.idx``: text, one ``key<TAB>offset`` line per record (offset of the record's first part);
  parsed strictly by :mod:`facemargin.data.formats.idxtext`, indexed by :mod:`facemargin.data.formats.index`.
* Payload: :class:`IRHeader` packed ``<IfQQ``; if ``flag > 0``, ``flag`` float32 labels follow
  and the header's ``label`` field is unused; the rest is the encoded image.

Reading: the index gives every record's offset, and the next offset in file order (or the file
size) bounds its bytes, so :class:`RecordIOReader` reads a record with **one** ``pread`` through a
:class:`~facemargin.data.storage.source.ByteSource` and splits the parts in memory (:func:`unframe`).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from ..storage.cache import cached_copy
from ..storage.source import ByteSource, open_source
from .framing import (_LEN_MASK, MAGIC, MAX_RECORD_LENGTH, TruncatedRecordError, _encode_parts, aligned_magic, unframe,
                      whole_record)
from .index import INDEX_SECTIONS, RecordIndex, RecordIOError, build_index
from .stamped import StampedWriter

__all__ = [
    "MAGIC",
    "IRHeader",
    "RecordIOError",
    "TruncatedRecordError",
    "RecordIOReader",
    "RecordIOWriter",
    "pack_record",
    "unpack_record",
    "unframe",
    "load_index",
    "unindexed_bytes",
    "unindexed_record",
]

_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24
_IR_STRUCT = struct.Struct(_IR_FORMAT)
_SCAN_BLOCK = 4 << 20
_ONE_READ_LIMIT = 16 << 20  # a record span larger than this (a damaged index) is read header-first


class IRHeader(NamedTuple):
    """Image record header: ``flag`` (label count, 0 = scalar label), ``label``, ``id``, ``id2``."""

    flag: int
    label: float
    id: int
    id2: int


# --------------------------------------------------------------------------- payload encoding
def pack_record(
    header: IRHeader | Sequence, image_bytes: bytes, labels: Sequence[float] | np.ndarray | None = None
) -> bytes:
    """Pack a header, optional label vector and image bytes into a record payload.

    Mirrors ``mx.recordio.pack``: with ``labels`` (or a sequence in ``header.label``) the flag becomes
    the number of labels, the header label 0 and the float32 labels follow the header; otherwise
    the flag is 0 and the scalar ``header.label`` is stored.
    """
    header = IRHeader(*header)
    if labels is None and isinstance(header.label, (list, tuple, np.ndarray)):
        labels = header.label
    if labels is None:
        head = struct.pack(_IR_FORMAT, 0, float(header.label), int(header.id), int(header.id2))
        return head + bytes(image_bytes)
    arr = np.asarray(labels, dtype="<f4").reshape(-1)
    if arr.size == 0:
        raise ValueError("pack_record: labels must be non-empty (use a scalar label instead)")
    head = struct.pack(_IR_FORMAT, arr.size, 0.0, int(header.id), int(header.id2))
    return head + arr.tobytes() + bytes(image_bytes)


def unpack_record(payload: bytes | memoryview) -> tuple[IRHeader, float | np.ndarray, bytes]:
    """Split a payload into ``(header, labels, image_bytes)``.

    ``labels`` is ``header.label`` (a float) when ``flag == 0``, else a float32 array of ``flag`` labels.
    """
    if len(payload) < _IR_SIZE:
        raise ValueError(f"record payload truncated: {len(payload)} bytes, the header needs {_IR_SIZE}")
    header = IRHeader(*struct.unpack_from(_IR_FORMAT, payload, 0))
    if header.flag == 0:
        return header, header.label, bytes(payload[_IR_SIZE:])
    end = _IR_SIZE + 4 * header.flag
    if len(payload) < end:
        raise ValueError(
            f"record payload truncated: flag={header.flag} labels need {end} bytes, payload has {len(payload)}"
        )
    labels = np.frombuffer(payload, dtype="<f4", count=header.flag, offset=_IR_SIZE).astype(np.float32)
    return header, labels, bytes(payload[end:])


# --------------------------------------------------------------------------- writer (framing: .framing)
class RecordIOWriter:
    """Write an indexed RecordIO pair byte-for-byte as ``mx.recordio.MXIndexedRecordIO(..., 'w')``."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path)
        self._rec = open(self.rec_path, "wb", buffering=1 << 20)  # one write syscall per MiB, not per record
        self._idx = open(self.idx_path, "w", encoding="ascii", newline="\n")
        self._keys: set[int] = set()

    def write(self, key: int, payload: bytes) -> int:
        """Append one record under ``key``; returns its offset in the .rec file."""
        key = int(key)
        if key in self._keys:
            raise ValueError(f"duplicate key {key} written to {self.idx_path}")
        if len(payload) >= MAX_RECORD_LENGTH:
            raise ValueError(
                f"record {key} of {len(payload)} bytes is too large for RecordIO (limit {MAX_RECORD_LENGTH - 1})"
            )
        return self._append(key, _encode_parts(bytes(payload)))

    def write_image(self, key: int, label: float, image: bytes) -> int:
        """``write(key, pack_record(IRHeader(0, label, key, 0), image))``, the image copied once."""
        head = _IR_STRUCT.pack(0, label, key, 0)
        n = len(head) + len(image)
        # the header is 24 bytes: a magic number aligned in the image is aligned in the payload
        if aligned_magic(image) != -1 or aligned_magic(head) != -1 or n >= MAX_RECORD_LENGTH or int(key) in self._keys:
            return self.write(key, head + image)
        return self._append(int(key), whole_record(n, head, image))

    def _append(self, key: int, data: bytes) -> int:
        offset = self._rec.tell()
        try:
            self._rec.write(data)
        except OSError as exc:  # a full disk, a file size limit: name the file
            raise OSError(exc.errno, exc.strerror, str(self.rec_path)) from None
        try:
            self._idx.write(f"{key}\t{offset}\n")
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.idx_path)) from None
        self._keys.add(key)
        return offset

    def close(self) -> None:
        """Flush and close both files (a failed flush names its file)."""
        failed = None
        for f, path in ((self._rec, self.rec_path), (self._idx, self.idx_path)):
            try:
                f.close()
            except OSError as exc:
                failed = failed or OSError(exc.errno, exc.strerror, str(path))
        if failed is not None:
            raise failed

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- reader
def load_index(idx_path: str | os.PathLike, source: ByteSource) -> RecordIndex:
    """Parse and validate an ``.idx`` (no cache: :class:`~facemargin.data.sources.recordio.FaceRecordSet` caches)."""
    memory = StampedWriter(None, [], INDEX_SECTIONS)
    return build_index(cached_copy(idx_path), str(idx_path), source.size, source.name, memory)


def unindexed_record(reader: "RecordIOReader", offset: int) -> RecordIOError:
    """A record that starts at ``offset`` but that no ``.idx`` line points at, named with its neighbours."""
    offsets = reader.index.offsets
    j = int(np.searchsorted(offsets, offset))
    around = ([f"after key {reader.index.key_at(j - 1)} at offset {int(offsets[j - 1])}"] if j > 0 else []) + (
        [f"before key {reader.index.key_at(j)} at offset {int(offsets[j])}"] if j < offsets.size else [])
    return RecordIOError(
        f"{reader.source.name}: the record at offset {offset} ({', '.join(around)}) is in no .idx line: "
        "its image is never read (a deleted .idx line?)"
    )


def unindexed_bytes(where: str, stop: int, end: int, rec_size: int) -> RecordIOError:
    """The record at ``where`` ends at offset ``stop`` but its index span runs to ``end``: the bytes between
    are a record no ``.idx`` line points at (a deleted line), or garbage."""
    after = "the end of the file" if end >= rec_size else f"the next indexed record at offset {end}"
    return RecordIOError(
        f"{where}: the record ends at offset {stop}, but {after} is {end - stop} bytes further: those bytes are "
        "in no .idx line (a deleted .idx line leaves its record out of training), or the .rec is damaged"
    )


class RecordIOReader:
    """Random-access and sequential reader of an indexed RecordIO pair.

    Each record is read with one ``pread`` of ``[offset, next offset)``. Keys and offsets are
    kept in file order. Instances pickle without open handles (DataLoader workers re-open).
    ``exact_spans=False``: the index lists a subset of the records on purpose (bytes after a record
    up to the next indexed one are allowed).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike,
                 index: RecordIndex | None = None, source: ByteSource | None = None, exact_spans: bool = True) -> None:
        self.rec_path = rec_path
        self.idx_path = idx_path
        self.exact_spans = exact_spans
        if index is None and not Path(cached_copy(idx_path)).is_file():
            raise FileNotFoundError(f"RecordIO index not found: {idx_path}")
        self.source = source if source is not None else open_source(rec_path)
        self.index = index if index is not None else load_index(idx_path, self.source)

    # ---- index
    @property
    def keys(self) -> list[int]:
        """Keys in file order."""
        return self.index.keys.tolist()

    @property
    def key_array(self) -> np.ndarray:
        """Keys in file order (int64, read-only)."""
        return _read_only(self.index.keys)

    @property
    def offset_array(self) -> np.ndarray:
        """Offsets in file order (int64, ascending, read-only)."""
        return _read_only(self.index.offsets)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: object) -> bool:
        try:
            return int(self.index.positions(int(key))) >= 0  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False

    def position(self, key: int) -> int:
        """File position (rank by offset) of ``key``'s record."""
        pos = int(self.index.positions(int(key)))
        if pos < 0:
            raise KeyError(f"key {key} is not in the index {self.idx_path}")
        return pos

    def offset(self, key: int) -> int:
        """Byte offset of ``key``'s record in the .rec file."""
        return int(self.index.offsets[self.position(key)])

    # ---- reading
    def where(self, pos: int) -> str:
        """``"<file> at offset O (key K)"`` for the record at file position ``pos``."""
        return f"{self.source.name} at offset {int(self.index.offsets[pos])} (key {self.index.key_at(pos)})"

    def read_span(self, pos: int) -> bytes:
        """All bytes of the record at file position ``pos`` (one ``pread``).

        A span over ``16 MiB`` (a damaged index) is read header first: a one-part record shorter
        than its span is read with the 8 bytes after it, enough for :meth:`payload_at` to see that
        the span holds more than the record.
        """
        offset, end = self.index.span(pos)
        n = end - offset
        if n > _ONE_READ_LIMIT:
            head = self.source.pread(8, offset)
            if len(head) == 8 and struct.unpack_from("<I", head, 0)[0] == MAGIC:
                lrec = struct.unpack_from("<I", head, 4)[0]
                if lrec >> 29 == 0:
                    n = min(n, 16 + (lrec & _LEN_MASK) + (-lrec % 4))
        return self.source.pread(n, offset)

    def payload_at(self, pos: int, data: bytes | None = None) -> bytes:
        """Payload of the record at file position ``pos`` (from ``data`` = its span, if already read).

        The record must fill its span exactly -- end where the next indexed record starts (or the
        file ends): bytes left over are a record no ``.idx`` line points at, an error naming both
        offsets (unless ``exact_spans`` is false: an index that lists a subset on purpose).
        """
        data = self.read_span(pos) if data is None else data
        offset, end = self.index.span(pos)
        where = self.where(pos)
        payload, stop = unframe(data, where, at_eof=end >= self.index.rec_size, file_offset=offset)
        if stop != end - offset and self.exact_spans:
            raise unindexed_bytes(where, offset + stop, end, self.index.rec_size)
        return payload

    def read(self, key: int) -> bytes:
        """Read the payload stored under ``key``."""
        return self.payload_at(self.position(key))

    def read_at(self, offset: int) -> bytes:
        """Read the payload of the record whose first part starts at ``offset`` (an indexed offset)."""
        offset = int(offset)
        size = self.source.size
        if offset < 0 or offset >= size:
            raise RecordIOError(f"{self.source.name} at offset {offset}: offset is past the end of the file ({size} bytes)")
        pos = int(np.searchsorted(self.index.offsets, offset))
        if pos < len(self.index) and int(self.index.offsets[pos]) == offset:
            return self.payload_at(pos)
        end = int(self.index.offsets[pos]) if pos < len(self.index) else size
        data = self.source.pread(min(end - offset, _ONE_READ_LIMIT), offset)
        return unframe(data, f"{self.source.name} at offset {offset}", at_eof=end == size, file_offset=offset)[0]

    def scan(self, start_offset: int = 0, end_offset: int | None = None) -> Iterator[tuple[int, bytes]]:
        """Stream ``(offset, payload)`` for records starting in ``[start_offset, end_offset)``, in file order.

        Reads the file sequentially in large blocks (``ByteSource.iter_range``); independent of
        the index (``start_offset`` must be a record start).
        """
        size = self.source.size
        end = size if end_offset is None else min(int(end_offset), size)
        start = int(start_offset)
        if start < 0 or start > size or (start == size and end > start):
            raise RecordIOError(f"{self.source.name} at offset {start}: offset is past the end of the file")
        buf = bytearray()
        buf_start = start  # file offset of buf[0]
        blocks = self.source.iter_range(start, size, _SCAN_BLOCK)
        eof = False
        pos = start
        while pos < end:
            while True:
                try:
                    payload, stop = unframe(buf, f"{self.source.name} at offset {pos}", at_eof=True,
                                            start=pos - buf_start, file_offset=pos)
                    break
                except TruncatedRecordError:
                    if eof:
                        raise
                    block = next(blocks, None)
                    if block is None:
                        eof = True
                    else:
                        del buf[: pos - buf_start]
                        buf_start = pos
                        buf += block
            yield pos, payload
            pos = buf_start + stop

    def walk(self) -> Iterator[tuple[int, int, bytes | None]]:
        """Every record of the file and every index entry, in file order, reading the file once.

        Yields ``(offset, pos, payload)``: a record an index entry points at (``pos`` its file
        position); ``(offset, -1, payload)``: a record no ``.idx`` line points at;
        ``(offset, pos, None)``: an index entry that is not the start of a record. A framing defect
        raises :class:`RecordIOError`; the entries after it are not yielded.
        """
        offsets, n, j = self.index.offsets, len(self.index), 0
        for offset, payload in self.scan():
            while j < n and int(offsets[j]) < offset:
                yield int(offsets[j]), j, None
                j += 1
            if j < n and int(offsets[j]) == offset:
                yield offset, j, payload
                j += 1
            else:
                yield offset, -1, payload
        while j < n:
            yield int(offsets[j]), j, None
            j += 1

    def close(self) -> None:
        """Close the file handle (it is re-opened on the next read)."""
        self.source.close()

    def __enter__(self) -> "RecordIOReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view
