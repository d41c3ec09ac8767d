"""Detector weights fetched on first use into ``$FACEMARGIN_CACHE/detectors`` (stdlib only).

:func:`fetch_weights` downloads a URL once -- a file, or a ``.zip`` holding it (insightface
publishes its detectors inside model packs) -- and keeps the one file a detector needs. The
download goes to a temporary name renamed into place, so an interrupted fetch or two ranks
fetching at once never leave a partial file under the final name. Where the fetch fails (no
network, a URL that moved) the :class:`WeightsUnavailable` error names the URL, the cache path
where a copied file would be used, and the offline detector.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from ..config import cache_home
from ..errors import UserError

__all__ = ["WeightsUnavailable", "detector_cache", "fetch_weights", "file_sha256"]

_BLOCK = 1 << 20


class WeightsUnavailable(UserError, OSError):
    """A detector's weights are neither cached nor fetchable; the message says where they were looked for."""


def detector_cache() -> Path:
    """``$FACEMARGIN_CACHE/detectors`` (default ``~/.cache/facemargin/detectors``)."""
    return cache_home() / "detectors"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_weights(url: str, target: str | os.PathLike, member: str | None = None, sha256: str | None = None,
                  what: str = "detector", timeout: float = 60.0) -> Path:
    """``target``, downloading ``url`` first when it is not there.

    ``member``: the file to keep when ``url`` is a zip archive (matched by its name in any folder
    of the archive). ``sha256``: the expected digest of the kept file (checked after a download
    and refused on mismatch). ``what`` names the weights in messages.
    """
    target = Path(target)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 -- a configured https URL
                    shutil.copyfileobj(response, out, _BLOCK)
            except (urllib.error.URLError, OSError, ValueError) as err:
                if isinstance(err, urllib.error.HTTPError):
                    reason = f"HTTP {err.code} {err.reason}"
                else:
                    reason = getattr(err, "reason", None) or err
                raise WeightsUnavailable(
                    f"could not fetch the {what} weights from {url} ({reason}); they are cached at {target} once fetched",
                    hint=f"no network? use the offline detector (detector=mtcnn), or copy the file to {target}",
                ) from None
        if zipfile.is_zipfile(tmp):
            _extract_member(tmp, member or target.name, url, what)
        if sha256 and file_sha256(tmp) != sha256.lower():
            raise WeightsUnavailable(f"the {what} weights fetched from {url} do not have the expected SHA-256 "
                                     f"{sha256} (a changed or truncated file); nothing was cached at {target}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _extract_member(archive: str, name: str, url: str, what: str) -> None:
    """Replace the zip ``archive`` by its member called ``name`` (in place)."""
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.namelist() if m.rsplit("/", 1)[-1] == name]
        if not members:
            raise WeightsUnavailable(f"{url}: the archive holds no {name} for the {what} weights "
                                     f"(it holds {', '.join(zf.namelist()[:8]) or 'nothing'})")
        data_fd, data_tmp = tempfile.mkstemp(dir=os.path.dirname(archive), suffix=".part")
        with os.fdopen(data_fd, "wb") as out, zf.open(members[0]) as src:
            shutil.copyfileobj(src, out, _BLOCK)
    os.replace(data_tmp, archive)
