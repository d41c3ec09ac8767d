"""Local copies of small remote files (``.idx``, ``property``, ``.bin``), fetched again when they change."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ...config import cache_home
from .source import is_remote, open_source

__all__ = ["cached_copy", "cache_root"]

_COPY_BLOCK = 4 << 20


def cache_root() -> Path:
    """Where :func:`cached_copy` keeps remote files: ``$FACEMARGIN_CACHE/remote`` (default ``~/.cache/facemargin/remote``)."""
    return cache_home() / "remote"


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
