"""A local file as a :class:`~facemargin.data.storage.source.ByteSource`: ``os.pread``, re-opened after a fork."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["LocalSource"]


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

    def pread_many(self, reads: Sequence[tuple[int, int]]) -> list[bytes]:
        """``[pread(n, offset) for n, offset in reads]``."""
        return [self.pread(n, offset) for n, offset in reads]

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
