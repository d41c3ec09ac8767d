"""A file on any fsspec file system (``s3://``, ``gs://``, ``az://``, ...), read with ranged ``cat_file`` calls.

``pip install 'facemargin[s3]'`` / ``'facemargin[gcs]'`` installs the back-ends. Retries, concurrency
and read-ahead come from :class:`~facemargin.data.storage.remote.RemoteSource`.

``cat_file`` returns bytes without the store's validators, so after each read -- a ``pread``, a
``pread_many`` batch, a block of a stream -- the file's ``info`` is asked again and its size and
ETag / generation / modification time compared with those seen at open, before the bytes are
handed over (one metadata request per read: streams and batched reads keep it small).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from .remote import RemoteSource, RetryPolicy, TransientError

__all__ = ["FsspecSource"]

T = TypeVar("T")
_EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


class FsspecSource(RemoteSource):
    """A file on any fsspec file system (``s3://``, ``gs://``, ``az://``, ...): ranged ``cat_file`` calls."""

    def __init__(self, url: str, retry: RetryPolicy | None = None, readahead: int = 4, concurrency: int = 8,
                 storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, retry, readahead, concurrency)
        scheme = url.split("://", 1)[0].lower()
        try:
            import fsspec

            self._fs, self._path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except ImportError as exc:
            package, extra = _EXTRAS.get(scheme, (f"the fsspec back-end for {scheme}://", ""))
            hint = f"pip install 'facemargin[{extra}]'" if extra else "see fsspec's list of implementations"
            raise ImportError(f"reading {url} needs {package}: {hint} ({exc})") from None
        except ValueError as exc:
            raise ValueError(f"cannot open {url}: {exc}") from None

    @staticmethod
    def _call(fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except (OSError, TimeoutError) as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}") from None

    def _info(self) -> dict[str, Any]:
        try:
            return self._call(lambda: self._fs.info(self._path))
        except FileNotFoundError:
            raise FileNotFoundError(f"file not found: {self.name}") from None

    def _fetch_stat(self) -> tuple[int, dict[str, str]]:
        info = self._info()
        if info.get("type") == "directory":
            raise IsADirectoryError(f"{self.name} is a directory, not a file")
        return int(info["size"]), _validators(info)

    def _confirm(self, offset: int) -> None:
        """The answers of ``cat_file`` carry no validators: ask the file's info again after each read."""
        if self._stat is None:
            return
        self._fs.invalidate_cache(self._path)  # a listing cache would answer with the opened version
        try:
            info = self._retrying("checking the version", offset, self._info)
        except FileNotFoundError:
            raise self._changed("the file is gone", offset) from None
        self._check_version(_validators(info), offset)

    def _fetch(self, start: int, end: int) -> bytes:
        try:
            data = self._call(lambda: self._fs.cat_file(self._path, start=start, end=end))
        except TransientError:
            raise
        except Exception:  # a back-end's own error (e.g. HTTP 416: the file got shorter): name a change first
            self._confirm(start)
            raise
        if len(data) != end - start:
            raise TransientError(f"short read: {len(data)} of {end - start} bytes at offset {start}")
        return bytes(data)


#: info keys that identify a version (S3 / GCS / Azure / HTTP / local back-ends of fsspec)
_VERSION_KEYS = ("ETag", "etag", "VersionId", "md5Hash", "generation", "LastModified", "last_modified",
                 "Last-Modified", "updated", "mtime")


def _validators(info: dict[str, Any]) -> dict[str, str]:
    found = {k: str(info[k]) for k in _VERSION_KEYS if info.get(k) is not None}
    found["size"] = str(int(info["size"]))
    return found
