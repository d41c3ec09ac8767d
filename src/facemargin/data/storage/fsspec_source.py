"""A file on any fsspec file system (``s3://``, ``gs://``, ``az://``, ...), read with ranged ``cat_file`` calls.

``pip install 'facemargin[s3]'`` / ``'facemargin[gcs]'`` installs the back-ends. Retries, concurrency
and read-ahead come from :class:`~facemargin.data.storage.remote.RemoteSource`.
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

    def _fetch_stat(self) -> tuple[int, str]:
        try:
            info = self._call(lambda: self._fs.info(self._path))
        except FileNotFoundError:
            raise FileNotFoundError(f"file not found: {self.name}") from None
        if info.get("type") == "directory":
            raise IsADirectoryError(f"{self.name} is a directory, not a file")
        size = int(info["size"])
        keys = ("ETag", "etag", "md5Hash", "generation", "LastModified", "last_modified", "updated", "mtime")
        tag = next((str(info[k]) for k in keys if info.get(k) is not None), "")
        return size, f"{tag}|{size}"

    def _fetch(self, start: int, end: int) -> bytes:
        data = self._call(lambda: self._fs.cat_file(self._path, start=start, end=end))
        if len(data) != end - start:
            raise TransientError(f"short read: {len(data)} of {end - start} bytes at offset {start}")
        return bytes(data)
