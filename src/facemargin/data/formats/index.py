"""The index of a RecordIO file: records in file order, built from the ``.idx`` once and cached.

:class:`RecordIndex` holds the records in *file order* (sorted by offset), so the byte span of
record ``j`` is ``[offsets[j], offsets[j + 1])`` (the last one ends at the ``.rec`` size) and each
record is read with one ``pread``. Keys that are ``k0, k0 + 1, ...`` in file order -- what every
writer produces -- are not stored at all (``first_key`` stands for them).

:func:`build_index` parses the ``.idx`` text (:mod:`facemargin.data.formats.idxtext`) and streams the
offsets into a :class:`~facemargin.data.formats.stamped.StampedWriter` chunk by chunk, checking them
on the way (ascending, 4-byte aligned, inside the ``.rec``, no two keys at one offset, no key twice):
a 44 M-line ``.idx`` is indexed without a 44 M-element temporary, and the cache it writes is then
mapped by every rank and worker. Lines out of offset order are sorted in memory instead.
"""

from __future__ import annotations

import os

import numpy as np

from .idxtext import RecordIOError, iter_idx, parse_idx
from .stamped import StampedWriter

__all__ = ["RecordIOError", "RecordIndex", "build_index", "parse_idx", "INDEX_SECTIONS"]

#: How many cache sections :func:`build_index` writes: offsets, keys (empty when implicit), [first key].
INDEX_SECTIONS = 3


class _NotInOrder(Exception):
    """The .idx lines are not in increasing offset order, or hold a defect: build in memory instead."""


class RecordIndex:
    """Records of a ``.rec`` in file order: ``offsets`` (int64, ascending) and their keys.

    ``keys`` is an int64 array, or ``None`` when the keys are ``first_key, first_key + 1, ...`` in
    file order (then :attr:`keys` makes that array on first use; :meth:`key_at`, :meth:`keys_at` and
    :meth:`positions` never do). The byte span of the record at file position ``j`` is
    ``[offsets[j], offsets[j + 1])`` (the last ends at ``rec_size``): everything it holds, read in one call.
    """

    def __init__(self, keys: np.ndarray | None, offsets: np.ndarray, rec_size: int, first_key: int = 0) -> None:
        if keys is not None and keys.size and keys.size == offsets.size and _consecutive(keys):
            first_key, keys = int(keys[0]), None
        self._keys = keys
        self.first_key = int(first_key)
        self.offsets = offsets
        self.rec_size = int(rec_size)
        self._made: np.ndarray | None = None  # implicit keys, made on demand
        self._sorted_keys: np.ndarray | None = None
        self._key_pos: np.ndarray | None = None

    @classmethod
    def from_entries(cls, keys: np.ndarray, offsets: np.ndarray, rec_size: int, idx_name: str,
                     rec_name: str) -> "RecordIndex":
        """Validate ``.idx`` entries (line order) against the ``.rec`` size and sort them into file order."""
        if offsets.size > 1 and not bool(np.all(offsets[1:] >= offsets[:-1])):  # usual files are in order
            order = np.argsort(offsets, kind="stable")
            keys, offsets = keys[order], offsets[order]
        k, o = keys, offsets
        bad = np.flatnonzero((o >= rec_size) | (o % 4 != 0))
        if bad.size:
            j = int(bad[0])
            why = (f"is past the end of {rec_name} ({rec_size} bytes)" if o[j] >= rec_size
                   else "is not a multiple of 4 (records start 4-byte aligned)")
            raise RecordIOError(f"{idx_name}: key {int(k[j])} -> offset {int(o[j])} {why}")
        _check_unique_keys(k, idx_name)
        same = np.flatnonzero(np.diff(o) == 0)
        if same.size:
            j = int(same[0])
            raise RecordIOError(
                f"{idx_name}: keys {int(k[j])} and {int(k[j + 1])} both point at offset {int(o[j])} "
                "(one record would be read twice)"
            )
        return cls(k, o, rec_size)

    @classmethod
    def from_sections(cls, sections: list[np.ndarray], rec_size: int) -> "RecordIndex":
        """The index from the :data:`INDEX_SECTIONS` sections :func:`build_index` wrote."""
        offsets, keys, first = sections
        return cls(keys if first.size == 0 else None, offsets, rec_size, int(first[0]) if first.size else 0)

    def sections(self) -> list[np.ndarray]:
        """What :meth:`from_sections` takes."""
        if self._keys is None:
            return [self.offsets, np.zeros(0, np.int64), np.asarray([self.first_key], np.int64)]
        return [self.offsets, self._keys, np.zeros(0, np.int64)]

    def __len__(self) -> int:
        return int(self.offsets.size)

    @property
    def implicit_keys(self) -> bool:
        """Whether the keys are ``first_key, first_key + 1, ...`` in file order (not stored)."""
        return self._keys is None

    @property
    def keys(self) -> np.ndarray:
        """Keys in file order (int64; made on first use when implicit)."""
        if self._keys is not None:
            return self._keys
        if self._made is None:
            self._made = np.arange(self.first_key, self.first_key + len(self), dtype=np.int64)
            self._made.flags.writeable = False
        return self._made

    def key_at(self, pos: int) -> int:
        """Key of the record at file position ``pos``."""
        return self.first_key + int(pos) if self._keys is None else int(self._keys[pos])

    def keys_at(self, pos: np.ndarray) -> np.ndarray:
        """Keys of the records at file positions ``pos``."""
        pos = np.asarray(pos, dtype=np.int64)
        return pos + self.first_key if self._keys is None else self._keys[pos]

    def _lookup(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._sorted_keys is None:
            keys = self.keys
            if keys.size < 2 or bool(np.all(keys[1:] > keys[:-1])):
                self._sorted_keys, self._key_pos = keys, None  # file order is key order (the usual case)
            else:
                pos = np.argsort(keys, kind="stable")
                self._sorted_keys, self._key_pos = keys[pos], pos
        return self._sorted_keys, self._key_pos

    def positions(self, keys: np.ndarray | int) -> np.ndarray:
        """File positions of ``keys`` (-1 where absent)."""
        keys = np.asarray(keys, dtype=np.int64)
        n = len(self)
        if self._keys is None:
            pos = keys - self.first_key
            return np.where((pos >= 0) & (pos < n), pos, -1)
        if n == 0:
            return np.full(keys.shape, -1, dtype=np.int64)
        sorted_keys, key_pos = self._lookup()
        i = np.minimum(np.searchsorted(sorted_keys, keys), n - 1)
        found = sorted_keys[i] == keys
        pos = i if key_pos is None else key_pos[i]
        return np.where(found, pos, -1)

    def key_run(self, first: int, end: int) -> int | None:
        """File position of key ``first`` when keys ``first .. end - 1`` are consecutive records in file
        order, else ``None`` (nothing of that size is made for implicit keys)."""
        if self._keys is None:
            start = first - self.first_key
            return start if end <= first or (start >= 0 and end - self.first_key <= len(self)) else None
        start = int(self.positions(first))
        if start < 0 or start + end - first > len(self):
            return None
        run = self._keys[start: start + end - first]
        return start if int(run[-1]) - first == end - first - 1 and _consecutive(run) else None

    def span(self, pos: int) -> tuple[int, int]:
        """``(offset, end)`` of the record at file position ``pos``."""
        end = int(self.offsets[pos + 1]) if pos + 1 < self.offsets.size else self.rec_size
        return int(self.offsets[pos]), end

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_made": None, "_sorted_keys": None, "_key_pos": None}


def _increasing(values: np.ndarray) -> bool:
    return values.size < 2 or bool(np.all(values[1:] > values[:-1]))


def _consecutive(keys: np.ndarray) -> bool:
    """``k, k + 1, k + 2, ...``: strictly increasing integers that span exactly their count."""
    return keys.size < 2 or (int(keys[-1]) - int(keys[0]) == keys.size - 1 and _increasing(keys))


def _check_unique_keys(keys: np.ndarray, idx_name: str) -> None:
    sk = keys if keys.size < 2 or bool(np.all(keys[1:] > keys[:-1])) else np.sort(keys)
    dup = np.flatnonzero(np.diff(sk) == 0)
    if dup.size:
        raise RecordIOError(f"{idx_name}: key {int(sk[dup[0]])} appears more than once")


def build_index(idx_file: str | os.PathLike, idx_name: str, rec_size: int, rec_name: str,
                writer: StampedWriter) -> RecordIndex:
    """Index the ``.idx`` file ``idx_file`` against a ``.rec`` of ``rec_size`` bytes.

    Writes the :data:`INDEX_SECTIONS` sections into ``writer`` (it must have none yet) and returns the
    index over them. Lines in offset order (the usual case) are checked and written chunk by chunk;
    otherwise the whole index is parsed, sorted and checked in memory. Defects raise
    :class:`RecordIOError` naming ``idx_name`` and the line or key.
    """
    first, expect, last = None, 0, -1
    explicit: list[np.ndarray] | None = None
    chunks = iter_idx(idx_file, idx_name)
    try:
        for keys, offsets in chunks:
            if (int(offsets[0]) <= last or int(offsets[-1]) >= rec_size or int(np.bitwise_or.reduce(offsets)) & 3
                    or not _increasing(offsets)):
                raise _NotInOrder
            if explicit is None:
                if first is None:
                    first = expect = int(keys[0])
                if int(keys[0]) == expect and _consecutive(keys):
                    expect += keys.size
                else:
                    explicit = [np.arange(first, expect, dtype=np.int64)]
            if explicit is not None:
                explicit.append(keys.copy())  # the parser reuses its buffers
            writer.add(offsets)
            last = int(offsets[-1])
    except _NotInOrder:
        chunks.close()
        writer.rewind()
        return _index_in_memory(idx_file, idx_name, rec_size, rec_name, writer)
    offsets = writer.end_section()
    if explicit is None:
        keys, head = np.zeros(0, np.int64), np.asarray([first], np.int64)
    else:
        keys, head = np.concatenate(explicit), np.zeros(0, np.int64)
        _check_unique_keys(keys, idx_name)
    keys = writer.section(keys)
    writer.section(head)
    return RecordIndex(None if explicit is None else keys, offsets, rec_size, first if explicit is None else 0)


def _index_in_memory(idx_file: str | os.PathLike, idx_name: str, rec_size: int, rec_name: str,
                     writer: StampedWriter) -> RecordIndex:
    parts = [(k.copy(), o.copy()) for k, o in iter_idx(idx_file, idx_name)]
    keys = np.concatenate([k for k, _ in parts])
    offsets = np.concatenate([o for _, o in parts])
    del parts
    index = RecordIndex.from_entries(keys, offsets, rec_size, idx_name, rec_name)
    sections = [writer.section(s) for s in index.sections()]
    return RecordIndex.from_sections(sections, rec_size)
