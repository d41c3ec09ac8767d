"""Where the bytes of a data set come from: local files, HTTP(S) and object storage.

Every reader in :mod:`facemargin.data` reads through a :class:`ByteSource`:

* ``pread(n, offset)`` -- one positioned read (a record is read in one call: its length is known);
  remotely that is one ranged request, so map-style random access over the network works but
  pays one round trip per record;
* ``pread_many(reads)`` -- several ``(n, offset)`` reads at once (a window of a shuffled stream);
  remote sources issue them concurrently, so their round trips overlap instead of adding up;
* ``iter_range(start, end, block_bytes)`` -- sequential reads of ``[start, end)`` in blocks, for
  streaming; remote sources fetch the next blocks in a background thread while the caller
  decodes (read-ahead), so a stream runs at network bandwidth, not at request latency;
* ``size`` and ``name`` (the path or URL, used in every error message).

``open_source`` picks the implementation from the path: a local path -> :class:`LocalSource`;
``http(s)://`` -> :class:`~facemargin.data.remote.HTTPSource` (standard library client, no extra
dependency); any other ``scheme://`` (``s3://``, ``gs://``, ...) ->
:class:`~facemargin.data.remote.FsspecSource` (install ``facemargin[s3]`` / ``facemargin[gcs]``).
Remote reads retry transient failures (dropped connections, 5xx, short reads) with exponential
back-off and end in :class:`~facemargin.data.remote.RemoteReadError` naming the URL and offset.

Small files (``.idx``, ``property``, ``.bin``) are used through :func:`cached_copy`, which returns a
local path: the file itself when it is local, else a copy downloaded once into
``$FACEMARGIN_CACHE/remote`` (default ``~/.cache/facemargin/remote``) and fetched again when the
remote file changes (its ETag, Last-Modified or size differ).

Sources pickle without their open handles and re-open lazily in each process (DataLoader workers).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

__all__ = ["ByteSource", "LocalSource", "open_source", "cached_copy", "is_remote", "cache_root", "remote_options"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_COPY_BLOCK = 4 << 20


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``http(s)://``, ``s3://``, ``gs://``, ...) rather than a local path."""
    return not isinstance(path, os.PathLike) and bool(_URL.match(str(path)))


@runtime_checkable
class ByteSource(Protocol):
    """Random and sequential reads of one file."""

    name: str

    @property
    def size(self) -> int: ...

    def pread(self, n: int, offset: int) -> bytes: ...

    def pread_many(self, reads: Sequence[tuple[int, int]]) -> list[bytes]: ...

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


def open_source(path: str | os.PathLike, **options: Any) -> ByteSource:
    """A :class:`ByteSource` for a local path or a URL.

    ``options`` go to the remote source (``retry=RetryPolicy(...)``, ``readahead=``, ``timeout=``
    for HTTP; ``storage_options=`` for fsspec back-ends); a local path takes none.
    """
    if not is_remote(path):
        if options:
            raise TypeError(f"open_source: options {sorted(options)} apply only to URLs, not {path}")
        return LocalSource(path)
    from .remote import FsspecSource, HTTPSource

    url = str(path)
    if url.lower().startswith(("http://", "https://")):
        return HTTPSource(url, **options)
    return FsspecSource(url, **options)


REMOTE_OPTIONS = ("retry", "readahead", "concurrency", "timeout", "storage_options")


def remote_options(path: str | os.PathLike, options: Any = None) -> dict[str, Any]:
    """Checked keyword options of :func:`open_source` for ``path`` (from a config mapping).

    ``retry`` may be a mapping of :class:`~facemargin.data.remote.RetryPolicy` fields
    (``{attempts: 3, base_delay: 0.1}``). A local path takes none: ``{}``.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(REMOTE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown remote option(s) {unknown}; valid: {list(REMOTE_OPTIONS)}")
    if not is_remote(path):
        return {}
    retry = options.get("retry")
    if retry is not None and not hasattr(retry, "delay"):
        from .remote import RetryPolicy

        options["retry"] = RetryPolicy(**dict(retry))
    if "storage_options" in options:
        options["storage_options"] = dict(options["storage_options"] or {})
    return {k: v for k, v in options.items() if v is not None}


def cache_root() -> Path:
    """Where :func:`cached_copy` keeps remote files: ``$FACEMARGIN_CACHE/remote`` (default ``~/.cache/facemargin/remote``)."""
    env = os.environ.get("FACEMARGIN_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "facemargin") / "remote"


def cached_copy(path: str | os.PathLike, **options: Any) -> Path:
    """A local path holding the bytes of ``path`` (the path itself, unchecked, when it is local).

    A URL is downloaded once to ``cache_root()/<hash of URL>/<hash of version>/<file name>``; the
    version is the remote ETag / Last-Modified / size, asked once per call, so a changed remote
    file gets a new folder and is fetched again. The download goes to a temporary file renamed into
    place, so a crash or a concurrent process never leaves a partial file under the final name;
    older versions of the same URL are removed afterwards.
    """
    if not is_remote(path):
        return Path(path)  # used in place; the caller reports a missing file in its own words
    url = str(path)
    source = open_source(url, **options)
    try:
        version = source.version  # type: ignore[attr-defined]
        url_dir = cache_root() / hashlib.sha256(url.encode()).hexdigest()[:24]
        folder = url_dir / hashlib.sha256(version.encode()).hexdigest()[:16]
        name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "file"
        target = folder / name
        if target.is_file() and target.stat().st_size == source.size:
            return target
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out:
                for block in source.iter_range(0, source.size, _COPY_BLOCK):
                    out.write(block)
            got = os.path.getsize(tmp)
            if got != source.size:
                raise OSError(f"{url}: downloaded {got} bytes, expected {source.size}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    finally:
        source.close()
    for old in url_dir.iterdir():
        if old != folder and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return target
