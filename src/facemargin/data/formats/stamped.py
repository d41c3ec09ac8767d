"""Cache files keyed on the files they were built from: flat int64 ``.npy`` files every process maps.

A cache holds int64 *sections* (an index's offsets, a layout's identity ranges, ...) after a head
``[version, magic, len(stamp), sections, *stamp, *section lengths]``. :func:`load_stamped` maps it
read-only (``mmap_mode='r'``), so every rank and DataLoader worker on a node shares the same
page-cache pages, and returns ``None`` when the stamp differs (the files changed since).
:class:`StampedWriter` writes one section by section -- a section may be streamed in chunks, so
building a cache never holds a second copy of it -- into a temporary file renamed into place;
:func:`build_lock` lets one process build it while the others wait, then map it.
A stamp is what a changed file cannot keep: :func:`file_stamp` (size, ``mtime_ns``, inode,
``ctime_ns``: ``cp -p`` and ``rsync -t`` keep the mtime, not the inode or ctime; an edit in place
changes the ctime).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

__all__ = ["file_stamp", "text_stamp", "cache_dir_for", "StampedWriter", "CacheWriteError", "save_stamped",
           "load_stamped", "build_lock"]

CACHE_VERSION = 3
_CACHE_MAGIC = 0x46_4D_49_44_58  # "FMIDX"


class CacheWriteError(OSError):
    """A cache file could not be written (the caller keeps the data in memory instead)."""


def file_stamp(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """``(size, mtime_ns, inode, ctime_ns)``: changes whenever the file is replaced or edited."""
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns), int(st.st_ino), int(st.st_ctime_ns)


def text_stamp(text: str | bytes) -> int:
    """A non-negative int64 that stands for ``text`` (e.g. a remote file's ETag / Last-Modified)."""
    data = text.encode() if isinstance(text, str) else bytes(text)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def cache_dir_for(path: str | os.PathLike) -> Path:
    """Where caches derived from ``path`` live: next to it when writable, else under ``$FACEMARGIN_CACHE``."""
    local = Path(path)
    if os.access(local.parent, os.W_OK):
        return local.parent
    base = Path(os.environ.get("FACEMARGIN_CACHE", Path.home() / ".cache" / "facemargin"))
    digest = hashlib.sha1(str(local.resolve()).encode()).hexdigest()[:16]
    return base / "index" / digest


def _npy_header(total: int) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "<i8", "fortran_order": False, "shape": (int(total),)})
    return out.getvalue()


_HEADER_BYTES = len(_npy_header(0))  # the same for every length up to 10**30


class StampedWriter:
    """Write a stamped cache of ``sections`` int64 arrays, one after the other.

    :meth:`add` appends a chunk to the open section, :meth:`end_section` closes it and returns it
    (mapped from the file being written, or in memory), :meth:`section` does both for a whole
    array, :meth:`finish` publishes the file (atomically) and returns every section mapped from it.
    ``path=None``, or a folder that cannot be written, keeps the sections in memory.
    """

    def __init__(self, path: Path | None, stamp: Sequence[int], sections: int) -> None:
        self.path = path
        self._stamp = [int(x) for x in stamp]
        self._count = int(sections)
        self._head = 4 + len(self._stamp) + self._count
        self._lengths: list[int] = []
        self._open = 0
        self._chunks: list[np.ndarray] = []
        self._memory: list[np.ndarray] = []
        self._file = None
        self._tmp = ""
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, self._tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
                self._file = os.fdopen(fd, "wb")
                self._file.write(bytes(_HEADER_BYTES + 8 * self._head))
            except OSError:
                self.abort()

    @property
    def to_file(self) -> bool:
        """Whether the sections go to a file (else they stay in memory)."""
        return self._file is not None

    def add(self, chunk: np.ndarray) -> None:
        """Append ``chunk`` (int64) to the open section."""
        chunk = np.ascontiguousarray(chunk, dtype="<i8")
        if self._file is None:
            self._chunks.append(chunk)
        else:
            try:
                self._file.write(memoryview(chunk).cast("B"))
            except OSError as exc:
                self.abort()
                raise CacheWriteError(f"{self.path}: {exc}") from exc
        self._open += int(chunk.size)

    def rewind(self) -> None:
        """Drop what the open section holds (no section may have been closed yet)."""
        if self._lengths:
            raise ValueError("rewind() only before the first section is closed")
        self._open, self._chunks = 0, []
        if self._file is not None:
            try:
                self._file.seek(_HEADER_BYTES + 8 * self._head)
                self._file.truncate()
            except OSError as exc:
                self.abort()
                raise CacheWriteError(f"{self.path}: {exc}") from exc

    def end_section(self) -> np.ndarray:
        """Close the open section; returns it (read-only)."""
        start, n = sum(self._lengths), self._open
        self._lengths.append(n)
        self._open = 0
        if self._file is None:
            array = np.concatenate(self._chunks) if len(self._chunks) > 1 else (
                self._chunks[0] if self._chunks else np.zeros(0, np.int64))
            self._chunks = []
            self._memory.append(array)
            return array
        if n == 0:
            return np.zeros(0, np.int64)
        try:
            self._file.flush()
            offset = _HEADER_BYTES + 8 * (self._head + start)
            return np.memmap(self._tmp, dtype="<i8", mode="r", offset=offset, shape=(n,)).view(np.ndarray)
        except OSError as exc:
            self.abort()
            raise CacheWriteError(f"{self.path}: {exc}") from exc

    def section(self, array: np.ndarray) -> np.ndarray:
        """Write ``array`` as the next section; returns it."""
        self.add(array)
        return self.end_section()

    def finish(self) -> list[np.ndarray]:
        """Publish the file under ``path`` and return the sections mapped from it (or from memory)."""
        if len(self._lengths) != self._count:
            raise ValueError(f"{self.path}: {len(self._lengths)} sections written, {self._count} expected")
        if self._file is None:
            return self._memory
        head = [CACHE_VERSION, _CACHE_MAGIC, len(self._stamp), self._count, *self._stamp, *self._lengths]
        try:
            self._file.seek(0)
            self._file.write(_npy_header(self._head + sum(self._lengths)))
            self._file.write(np.asarray(head, dtype="<i8").tobytes())
            self._file.close()
            self._file = None
            arrays = load_stamped(Path(self._tmp), self._stamp, self._count)  # mapped; survives the rename
            if arrays is None:  # pragma: no cover - what was just written reads back
                raise OSError("the cache just written does not read back")
            try:
                os.replace(self._tmp, self.path)  # type: ignore[arg-type]
                self._tmp = ""
            except OSError:
                pass  # e.g. a folder in the way: the mapping of the temporary file serves this process
            return arrays
        except OSError as exc:
            raise CacheWriteError(f"{self.path}: {exc}") from exc
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the temporary file (what is mapped from it stays readable)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        if self._tmp:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = ""


def save_stamped(path: Path, stamp: Sequence[int], arrays: Sequence[np.ndarray]) -> bool:
    """Save int64 ``arrays`` with ``stamp`` as one flat ``.npy``, atomically (no concatenated copy).

    Returns ``False`` (nothing written) when the folder is not writable: callers keep the data in
    memory only.
    """
    writer = StampedWriter(path, stamp, len(arrays))
    if not writer.to_file:
        return False
    try:
        for array in arrays:
            writer.section(array)
        writer.finish()
    except CacheWriteError:
        return False
    return path.is_file()


def load_stamped(path: Path, stamp: Sequence[int], count: int) -> list[np.ndarray] | None:
    """The ``count`` arrays saved by :func:`save_stamped` (memory-mapped, read-only), or ``None``
    when the file is absent, unreadable, or was built from other files (``stamp`` differs)."""
    try:
        # a plain ndarray over the mapping: np.memmap's Python-level indexing costs microseconds per item
        flat = np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)
    except (OSError, ValueError):
        return None
    stamp = [int(x) for x in stamp]
    fixed = 4 + len(stamp) + count
    if flat.dtype != np.int64 or flat.ndim != 1 or flat.size < fixed:
        return None
    head = [int(x) for x in flat[:fixed]]
    if head[:4] != [CACHE_VERSION, _CACHE_MAGIC, len(stamp), count] or head[4: 4 + len(stamp)] != stamp:
        return None
    lengths = head[4 + len(stamp):]
    if min(lengths, default=0) < 0 or flat.size != fixed + sum(lengths):
        return None
    out, pos = [], fixed
    for n in lengths:
        out.append(flat[pos: pos + n])
        pos += n
    return out


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` while building the cache ``path``: the other ranks of a
    node (or of a job on a shared file system) wait, then map what the first one wrote. Where no lock
    can be taken (a read-only folder, no ``fcntl``), every process builds on its own."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
