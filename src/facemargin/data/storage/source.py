"""The byte-source contract: :class:`ByteSource`, and :func:`open_source` for a path or a URL.

See :mod:`facemargin.data.storage` for what the methods promise locally and remotely.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

from .local import LocalSource

__all__ = ["ByteSource", "open_source", "is_remote", "remote_options", "REMOTE_OPTIONS"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


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


def open_source(path: str | os.PathLike, **options: Any) -> ByteSource:
    """A :class:`ByteSource` for a local path or a URL.

    ``options`` go to the remote source (``retry=RetryPolicy(...)``, ``readahead=``, ``timeout=``
    for HTTP; ``storage_options=`` for fsspec back-ends); a local path takes none.
    """
    if not is_remote(path):
        if options:
            raise TypeError(f"open_source: options {sorted(options)} apply only to URLs, not {path}")
        return LocalSource(path)
    from .fsspec_source import FsspecSource
    from .http_source import HTTPSource

    url = str(path)
    if url.lower().startswith(("http://", "https://")):
        return HTTPSource(url, **options)
    return FsspecSource(url, **options)


REMOTE_OPTIONS = ("retry", "readahead", "concurrency", "timeout", "storage_options")


def remote_options(path: str | os.PathLike, options: Any = None) -> dict[str, Any]:
    """Checked keyword options of :func:`open_source` for ``path`` (from a config mapping).

    ``retry`` may be a mapping of :class:`~facemargin.data.storage.remote.RetryPolicy` fields
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
