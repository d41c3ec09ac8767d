"""MXNet RecordIO, read and written without MXNet.

File format (dmlc-core ``RecordIOWriter``, as used by ``mx.recordio.MXIndexedRecordIO``):

* ``.rec``: a sequence of *parts*. Each part is ``uint32 magic (0xCED7230A)``, ``uint32 lrec``
  (low 29 bits: part length, high 3 bits: continuation flag), the part bytes, then zero padding
  to a multiple of 4. A payload that contains the magic number at a 4-byte-aligned offset is
  split there (the magic itself is dropped): flag 1 = first part, 2 = middle, 3 = last;
  0 = a whole record. Readers join the parts with the magic number between them.
* ``.idx``: text, one ``key<TAB>offset`` line per record (offset of the record's first part).
* Payload: :class:`IRHeader` packed ``<IfQQ``; if ``flag > 0``, ``flag`` float32 labels follow
  and the header's ``label`` field is unused; the rest is the encoded image.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

__all__ = [
    "MAGIC",
    "IRHeader",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "pack_record",
    "unpack_record",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24
_LEN_MASK = (1 << 29) - 1
MAX_RECORD_LENGTH = 1 << 29
_SCAN_BUFFER = 1 << 22


class RecordIOError(ValueError):
    """A malformed .rec/.idx file; the message names the file and the key or offset."""


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


def unpack_record(payload: bytes) -> tuple[IRHeader, float | np.ndarray, bytes]:
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
    out = bytearray()
    dptr = 0
    i = payload.find(_MAGIC_BYTES)
    while i != -1:
        if i % 4 == 0:
            cflag = 1 if dptr == 0 else 2
            out += _MAGIC_BYTES + struct.pack("<I", (cflag << 29) | (i - dptr)) + payload[dptr:i]
            dptr = i + 4
            i = payload.find(_MAGIC_BYTES, dptr)
        else:
            i = payload.find(_MAGIC_BYTES, i + 1)
    cflag = 3 if dptr != 0 else 0
    out += _MAGIC_BYTES + struct.pack("<I", (cflag << 29) | (n - dptr)) + payload[dptr:]
    out += b"\0" * (-n % 4)
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
        data = _encode_parts(bytes(payload))
        offset = self._rec.tell()
        self._rec.write(data)
        self._idx.write(f"{key}\t{offset}\n")
        self._keys.add(key)
        return offset

    def close(self) -> None:
        """Flush and close both files."""
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- index
def _parse_idx_slow(text: bytes, idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    keys: list[int] = []
    offsets: list[int] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            key, off = int(parts[0]), int(parts[1])
            if off < 0:
                raise ValueError
        except ValueError:
            raise RecordIOError(
                f"{idx_path}: line {lineno} is not 'key<TAB>offset': {line[:80]!r}"
            ) from None
        keys.append(key)
        offsets.append(off)
    return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


def _parse_idx(idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse an .idx file into (keys, offsets) int64 arrays; vectorised for well-formed files."""
    text = idx_path.read_bytes()
    if text and not text.endswith(b"\n"):
        text += b"\n"
    raw = np.frombuffer(text, dtype=np.uint8)
    seps = raw[(raw == 9) | (raw == 10)]
    well_formed = (
        seps.size % 2 == 0
        and bool(np.all(seps[0::2] == 9))
        and bool(np.all(seps[1::2] == 10))
        and b" " not in text
        and b"\r" not in text
        and b"\n\n" not in text
        and b"\t\t" not in text
        and not text.startswith((b"\n", b"\t"))
    )
    if well_formed:
        try:
            tokens = np.array(text.split(), dtype=bytes).astype(np.int64)
        except ValueError:
            tokens = None
        if tokens is not None and not np.any(tokens[1::2] < 0):
            return tokens[0::2].copy(), tokens[1::2].copy()
    return _parse_idx_slow(text, idx_path)  # raises with the bad line, or handles odd whitespace


# --------------------------------------------------------------------------- reader
class RecordIOReader:
    """Random-access and sequential reader of an indexed RecordIO pair.

    The file descriptor is opened lazily and re-opened after a fork (DataLoader workers);
    instances pickle without it. Random reads use ``os.pread`` so threads may share a reader.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path)
        if not self.idx_path.is_file():
            raise FileNotFoundError(f"RecordIO index not found: {self.idx_path}")
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"RecordIO file not found: {self.rec_path}")
        self._key_array, self._offset_array = _parse_idx(self.idx_path)
        order = np.argsort(self._key_array, kind="stable")
        self._sorted_keys = self._key_array[order]
        self._sorted_offsets = self._offset_array[order]
        dup = np.flatnonzero(np.diff(self._sorted_keys) == 0)
        if dup.size:
            raise RecordIOError(f"{self.idx_path}: key {int(self._sorted_keys[dup[0]])} appears more than once")
        self._keys_list: list[int] | None = None
        self._fd: int | None = None
        self._pid: int | None = None
        self._size = 0

    # ---- index
    @property
    def keys(self) -> list[int]:
        """Keys in .idx file order."""
        if self._keys_list is None:
            self._keys_list = self._key_array.tolist()
        return self._keys_list

    @property
    def key_array(self) -> np.ndarray:
        """Keys in .idx file order as an int64 array (read-only view)."""
        view = self._key_array.view()
        view.flags.writeable = False
        return view

    @property
    def offset_array(self) -> np.ndarray:
        """Offsets in .idx file order as an int64 array (read-only view)."""
        view = self._offset_array.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return int(self._key_array.size)

    def __contains__(self, key: object) -> bool:
        try:
            return self._find(int(key)) >= 0  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False

    def _find(self, key: int) -> int:
        pos = int(np.searchsorted(self._sorted_keys, key))
        if pos < self._sorted_keys.size and self._sorted_keys[pos] == key:
            return pos
        return -1

    def offset(self, key: int) -> int:
        """Byte offset of ``key``'s record in the .rec file."""
        pos = self._find(int(key))
        if pos < 0:
            raise KeyError(f"key {key} is not in the index {self.idx_path}")
        return int(self._sorted_offsets[pos])

    # ---- file handle
    def _handle(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            if self._fd is not None:  # inherited across fork: close this process's copy only
                try:
                    os.close(self._fd)
                except OSError:
                    pass
            self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._pid = pid
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def _pread(self, n: int, offset: int) -> bytes:
        fd = self._handle()
        if hasattr(os, "pread"):
            return os.pread(fd, n, offset)
        os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - Windows
        return os.read(fd, n)  # pragma: no cover

    def close(self) -> None:
        """Close the file descriptor (it is re-opened on the next read)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        self._pid = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "RecordIOReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_fd=None, _pid=None, _keys_list=None)
        return state

    # ---- reading
    def _where(self, offset: int, key: int | None) -> str:
        return f"{self.rec_path} at offset {offset}" + ("" if key is None else f" (key {key})")

    def _read_parts(self, offset: int, key: int | None, limit: int | None = None) -> bytes:
        """Read (and join) the record starting at ``offset``; stop early once ``limit`` bytes are known."""
        self._handle()
        fd_size = self._size
        if offset < 0 or offset >= fd_size:
            raise RecordIOError(
                f"{self._where(offset, key)}: offset is past the end of the file ({fd_size} bytes)"
            )
        chunks: list[bytes] = []
        have = 0
        pos = offset
        expect_first = True
        while True:
            head = self._pread(8, pos)
            if len(head) < 8:
                raise RecordIOError(f"{self._where(offset, key)}: truncated record (part header at {pos})")
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise RecordIOError(
                    f"{self._where(offset, key)}: bad magic 0x{magic:08x} at offset {pos} "
                    f"(expected 0x{MAGIC:08x}); the index may not match the .rec file"
                )
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            if expect_first and cflag not in (0, 1):
                raise RecordIOError(
                    f"{self._where(offset, key)}: bad continuation flag {cflag} at offset {pos} "
                    "(a record must start with flag 0 or 1)"
                )
            if not expect_first and cflag not in (2, 3):
                raise RecordIOError(
                    f"{self._where(offset, key)}: bad continuation flag {cflag} at offset {pos} "
                    "(expected 2 or 3 after a first part)"
                )
            want = length if limit is None else min(length, max(limit - have, 0))
            data = self._pread(want, pos + 8) if want else b""
            if len(data) < want or pos + 8 + length > self._size:
                raise RecordIOError(
                    f"{self._where(offset, key)}: truncated record: part at {pos} needs {length} bytes, "
                    f"file has {max(self._size - pos - 8, 0)}"
                )
            if not expect_first:
                chunks.append(_MAGIC_BYTES)
                have += 4
            chunks.append(data)
            have += len(data)
            if cflag in (0, 3) or (limit is not None and have >= limit):
                return b"".join(chunks)
            expect_first = False
            pos += 8 + length + (-length % 4)

    def read_at(self, offset: int) -> bytes:
        """Read the payload of the record whose first part starts at ``offset``."""
        return self._read_parts(int(offset), None)

    def read(self, key: int) -> bytes:
        """Read the payload stored under ``key``."""
        return self._read_parts(self.offset(key), int(key))

    def read_head(self, key: int, n: int) -> bytes:
        """The first ``n`` bytes of ``key``'s payload (fewer if it is shorter), without reading the rest."""
        return self._read_parts(self.offset(key), int(key), limit=n)[:n]

    def scan(self, start_offset: int = 0, end_offset: int | None = None) -> Iterator[tuple[int, bytes]]:
        """Stream ``(offset, payload)`` for records starting in ``[start_offset, end_offset)``, in file order.

        ``start_offset`` must be a record start (e.g. from :meth:`offset`). Uses its own buffered
        handle with large reads, so it is independent of random-access reads.
        """
        with open(self.rec_path, "rb", buffering=_SCAN_BUFFER) as f:
            size = os.fstat(f.fileno()).st_size
            end = size if end_offset is None else min(int(end_offset), size)
            if start_offset < 0 or (start_offset > size) or (start_offset == size and end > start_offset):
                raise RecordIOError(f"{self.rec_path} at offset {start_offset}: offset is past the end of the file")
            f.seek(start_offset)
            pos = int(start_offset)
            while pos < end:
                payload, nxt = self._scan_one(f, pos, size)
                yield pos, payload
                pos = nxt

    def _scan_one(self, f: io.BufferedReader, offset: int, size: int) -> tuple[bytes, int]:
        chunks: list[bytes] = []
        pos = offset
        first = True
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise RecordIOError(f"{self.rec_path} at offset {offset}: truncated record (part header at {pos})")
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise RecordIOError(
                    f"{self.rec_path} at offset {offset}: bad magic 0x{magic:08x} at offset {pos} "
                    f"(expected 0x{MAGIC:08x})"
                )
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            if (first and cflag not in (0, 1)) or (not first and cflag not in (2, 3)):
                raise RecordIOError(
                    f"{self.rec_path} at offset {offset}: bad continuation flag {cflag} at offset {pos}"
                )
            padded = length + (-length % 4)
            data = f.read(padded)
            if len(data) < length:
                raise RecordIOError(
                    f"{self.rec_path} at offset {offset}: truncated record: part at {pos} needs "
                    f"{length} bytes, file has {len(data)}"
                )
            if not first:
                chunks.append(_MAGIC_BYTES)
            chunks.append(data[:length] if padded != length else data)
            pos += 8 + padded
            if cflag in (0, 3):
                return b"".join(chunks), min(pos, size)
            first = False
