"""Where the bytes of a data set come from: local files today, object storage and HTTP through fsspec.

Every reader in :mod:`facemargin.data` reads through a :class:`ByteSource`:

* ``pread(n, offset)`` -- one positioned read (a record is read in one call: its length is known);
* ``iter_range(start, end, block_bytes)`` -- sequential reads of ``[start, end)`` in blocks, for
  streaming (remote sources read ahead);
* ``size`` and ``name`` (the path or URL, used in every error message).

Small files (``.idx``, ``property``, ``.bin``) are used through :func:`cached_copy`, which returns a
local path (the file itself when it is local).

Sources pickle without their open handles and re-open lazily in each process (DataLoader workers).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

__all__ = ["ByteSource", "LocalSource", "open_source", "cached_copy", "is_remote"]

_REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "gcs://")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL this module reads remotely."""
    return str(path).startswith(_REMOTE_PREFIXES)


@runtime_checkable
class ByteSource(Protocol):
    """Random and sequential reads of one file."""

    name: str

    @property
    def size(self) -> int: ...

    def pread(self, n: int, offset: int) -> bytes: ...

    def iter_range(self, start: int, end: int, block_bytes: int) -> Iterator[bytes]: ...

    def close(self) -> None: ...


class LocalSource:
    """A local file read with ``os.pread``; the descriptor is opened lazily and again after a fork."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"file not found: {self.path}")
        self._fd: int | None = None
        self._pid: int | None = None
        self._size: int | None = None

    def _handle(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            if self._fd is not None:  # inherited across fork: close this process's copy only
                try:
                    os.close(self._fd)
                except OSError:
                    pass
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._pid = pid
            self._size = os.fstat(self._fd).st_size
        return self._fd

    @property
    def size(self) -> int:
        self._handle()
        assert self._size is not None
        return self._size

    def pread(self, n: int, offset: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (fewer only at the end of the file)."""
        return os.pread(self._handle(), n, offset)

    def iter_range(self, start: int, end: int, block_bytes: int) -> Iterator[bytes]:
        """``[start, end)`` in consecutive blocks of at most ``block_bytes``."""
        fd, pos = self._handle(), start
        while pos < end:
            data = os.pread(fd, min(block_bytes, end - pos), pos)
            if not data:
                return
            yield data
            pos += len(data)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"LocalSource({self.name!r})"


def open_source(path: str | os.PathLike) -> ByteSource:
    """A :class:`ByteSource` for a local path (remote URLs: see the module docstring)."""
    if is_remote(path):
        raise NotImplementedError(f"remote data sets are not supported yet: {path}")
    return LocalSource(path)


def cached_copy(path: str | os.PathLike) -> Path:
    """A local path holding the bytes of ``path`` (the path itself when it is local)."""
    if is_remote(path):
        raise NotImplementedError(f"remote data sets are not supported yet: {path}")
    return Path(path)
