"""The framing of a ``.rec`` file: records split into parts behind a magic number, and joined again.

A ``.rec`` is a sequence of *parts*. Each part is ``uint32 magic (0xCED7230A)``, ``uint32 lrec``
(low 29 bits: part length, high 3 bits: continuation flag), the part bytes, then zero padding to a
multiple of 4. A payload that contains the magic number at a 4-byte-aligned offset is split there
(the magic itself is dropped): flag 1 = first part, 2 = middle, 3 = last; 0 = a whole record.
Readers join the parts with the magic number between them. :func:`_encode_parts` writes exactly
what dmlc-core's ``RecordIOWriter`` writes; :func:`unframe` reads it back and names every defect.
"""

from __future__ import annotations

import struct

from .idxtext import RecordIOError

__all__ = ["MAGIC", "MAX_RECORD_LENGTH", "TruncatedRecordError", "aligned_magic", "unframe", "whole_record"]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
MAX_RECORD_LENGTH = 1 << 29
_U32 = struct.Struct("<I")
_PADDING = (b"", b"\0", b"\0\0", b"\0\0\0")


class TruncatedRecordError(RecordIOError):
    """The bytes end before the record does (a truncated file, or more bytes are needed)."""


def aligned_magic(data: bytes, start: int = 0) -> int:
    """The first 4-byte-aligned offset ``>= start`` where ``data`` holds the magic number (-1: none)."""
    i = data.find(_MAGIC_BYTES, start)
    while i != -1 and i % 4:
        i = data.find(_MAGIC_BYTES, i + 1)
    return i


def whole_record(n: int, *chunks: bytes) -> bytes:
    """A record of ``n`` bytes (``chunks`` joined) with no aligned magic number: one part, padded."""
    return b"".join((_MAGIC_BYTES, _U32.pack(n), *chunks, _PADDING[-n % 4]))


def _encode_parts(payload: bytes) -> bytes:
    """The exact bytes dmlc-core writes for one record (split at aligned magic numbers, padded)."""
    n = len(payload)
    if n >= MAX_RECORD_LENGTH:
        raise ValueError(f"record of {n} bytes is too large for RecordIO (limit {MAX_RECORD_LENGTH - 1})")
    i = aligned_magic(payload)
    if i == -1:  # the common case: one whole part
        return whole_record(n, payload)
    out = bytearray()
    dptr = 0
    while i != -1:
        cflag = 1 if dptr == 0 else 2
        out += _MAGIC_BYTES + _U32.pack((cflag << 29) | (i - dptr)) + payload[dptr:i]
        dptr = i + 4
        i = aligned_magic(payload, dptr)
    out += _MAGIC_BYTES + _U32.pack((3 << 29) | (n - dptr)) + payload[dptr:]
    out += _PADDING[-n % 4]
    return bytes(out)


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
