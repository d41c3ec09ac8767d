"""MXNet RecordIO, read and written without MXNet.

File format (dmlc-core ``RecordIOWriter``, as used by ``mx.recordio.MXIndexedRecordIO``):

* ``.rec``: a sequence of *parts*. Each part is ``uint32 magic (0xCED7230A)``, ``uint32 lrec``
  (low 29 bits: part length, high 3 bits: continuation flag), the part bytes, then zero padding
  to a multiple of 4. A payload that contains the magic number at a 4-byte-aligned offset is
  split there (the magic itself is dropped): flag 1 = first part, 2 = middle, 3 = last;
  0 = a whole record. Readers join the parts with the magic number between them.
* ``.idx``: text, one ``key<TAB>offset`` line per record (offset of the record's first part);
  parsed strictly by :mod:`facemargin.data.formats.index`.
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
from .index import RecordIndex, RecordIOError, parse_idx

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
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24
_IR_STRUCT = struct.Struct(_IR_FORMAT)
_U32 = struct.Struct("<I")
_PADDING = (b"", b"\0", b"\0\0", b"\0\0\0")
_LEN_MASK = (1 << 29) - 1
MAX_RECORD_LENGTH = 1 << 29
_SCAN_BLOCK = 4 << 20
_ONE_READ_LIMIT = 16 << 20  # a record span larger than this (a damaged index) is read header-first


class TruncatedRecordError(RecordIOError):
    """The bytes end before the record does (a truncated file, or more bytes are needed)."""


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


# --------------------------------------------------------------------------- writer
def _encode_parts(payload: bytes) -> bytes:
    """The exact bytes dmlc-core writes for one record (split at aligned magic numbers, padded)."""
    n = len(payload)
    if n >= MAX_RECORD_LENGTH:
        raise ValueError(f"record of {n} bytes is too large for RecordIO (limit {MAX_RECORD_LENGTH - 1})")
    i = payload.find(_MAGIC_BYTES)
    while i != -1 and i % 4:
        i = payload.find(_MAGIC_BYTES, i + 1)
    if i == -1:  # the common case: one whole part
        return b"".join((_MAGIC_BYTES, _U32.pack(n), payload, _PADDING[-n % 4]))
    out = bytearray()
    dptr = 0
    while i != -1:
        if i % 4 == 0:
            cflag = 1 if dptr == 0 else 2
            out += _MAGIC_BYTES + _U32.pack((cflag << 29) | (i - dptr)) + payload[dptr:i]
            dptr = i + 4
            i = payload.find(_MAGIC_BYTES, dptr)
        else:
            i = payload.find(_MAGIC_BYTES, i + 1)
    cflag = 3 if dptr != 0 else 0
    out += _MAGIC_BYTES + _U32.pack((cflag << 29) | (n - dptr)) + payload[dptr:]
    out += _PADDING[-n % 4]
    return bytes(out)


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
        i = image.find(_MAGIC_BYTES)
        while i != -1 and i % 4:  # the header is 24 bytes: aligned in the image is aligned in the payload
            i = image.find(_MAGIC_BYTES, i + 1)
        if i != -1 or _MAGIC_BYTES in head or n >= MAX_RECORD_LENGTH or int(key) in self._keys:
            return self.write(key, head + image)
        return self._append(int(key), b"".join((_MAGIC_BYTES, _U32.pack(n), head, image, _PADDING[-n % 4])))

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


# --------------------------------------------------------------------------- framing
def unframe(buf: bytes | bytearray, where: str, at_eof: bool = True, start: int = 0,
            file_offset: int = 0) -> tuple[bytes, int]:
    """The payload of the record whose first part starts at ``buf[start]``, and where it ends.

    ``buf`` holds the record's bytes (possibly followed by others); ``file_offset`` is the file
    offset of ``buf[start]`` (for messages). ``at_eof``: ``buf`` ends where the file ends (a short
    record is *truncated*); otherwise it ends at the next indexed record (a short record means
    the index points inside a record). Errors name ``where``.
    """
    n = len(buf)
    pos = start
    chunks: list[bytes] = []

    def at(p: int) -> int:
        return file_offset + p - start

    while True:
        if pos + 8 > n:
            raise TruncatedRecordError(f"{where}: truncated record (part header at {at(pos)})")
        magic, lrec = struct.unpack_from("<II", buf, pos)
        if magic != MAGIC:
            raise RecordIOError(
                f"{where}: bad magic 0x{magic:08x} at offset {at(pos)} (expected 0x{MAGIC:08x}); "
                "the index may not match the .rec file"
            )
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        first = not chunks
        if (first and cflag not in (0, 1)) or (not first and cflag not in (2, 3)):
            expected = "a record must start with flag 0 or 1" if first else "expected 2 or 3 after a first part"
            raise RecordIOError(f"{where}: bad continuation flag {cflag} at offset {at(pos)} ({expected})")
        if pos + 8 + length > n:
            if at_eof:
                raise TruncatedRecordError(
                    f"{where}: truncated record: part at {at(pos)} needs {length} bytes, file has {max(n - pos - 8, 0)}"
                )
            raise RecordIOError(
                f"{where}: the record needs {pos + 8 + length - start} bytes but the next indexed record starts "
                f"{n - start} bytes after it (an .idx offset points inside a record, or the record is damaged)"
            )
        if not first:
            chunks.append(_MAGIC_BYTES)
        chunks.append(bytes(buf[pos + 8: pos + 8 + length]))
        pos += 8 + length + (-length % 4)
        if cflag in (0, 3):
            return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), min(pos, n)


# --------------------------------------------------------------------------- reader
def load_index(idx_path: str | os.PathLike, source: ByteSource) -> RecordIndex:
    """Parse and validate an ``.idx`` (no cache: :class:`~facemargin.data.sources.recordio.FaceRecordSet` caches)."""
    local = cached_copy(idx_path)
    keys, offsets = parse_idx(Path(local).read_bytes(), str(idx_path))
    return RecordIndex.from_entries(keys, offsets, source.size, str(idx_path), source.name)


class RecordIOReader:
    """Random-access and sequential reader of an indexed RecordIO pair.

    Each record is read with one ``pread`` of ``[offset, next offset)``. Keys and offsets are
    kept in file order. Instances pickle without open handles (DataLoader workers re-open).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike,
                 index: RecordIndex | None = None, source: ByteSource | None = None) -> None:
        self.rec_path = rec_path
        self.idx_path = idx_path
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
        return f"{self.source.name} at offset {int(self.index.offsets[pos])} (key {int(self.index.keys[pos])})"

    def read_span(self, pos: int) -> bytes:
        """All bytes of the record at file position ``pos`` (one ``pread``; header first if the span is huge)."""
        offset, end = self.index.span(pos)
        n = end - offset
        if n > _ONE_READ_LIMIT:
            head = self.source.pread(8, offset)
            if len(head) == 8 and struct.unpack_from("<I", head, 0)[0] == MAGIC:
                lrec = struct.unpack_from("<I", head, 4)[0]
                if lrec >> 29 == 0:
                    n = min(n, 8 + (lrec & _LEN_MASK))
        return self.source.pread(n, offset)

    def payload_at(self, pos: int, data: bytes | None = None) -> bytes:
        """Payload of the record at file position ``pos`` (from ``data`` = its span, if already read)."""
        data = self.read_span(pos) if data is None else data
        at_eof = pos + 1 >= len(self.index)
        return unframe(data, self.where(pos), at_eof=at_eof, file_offset=int(self.index.offsets[pos]))[0]

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
