"""The faces a detector found in each photo, stored once and found again by the photo's content.

A store is one folder per detector (``$FACEMARGIN_CACHE/faces/<name>-<digest of its cache_key>``),
so faces from one detector, or from other options, are never reused for another. It holds
segments (``*.npz``, no pickle): each written whole under a temporary name and renamed, never
changed, so any number of processes (DataLoader workers, DDP ranks, runs) read and add to one
store without locks. Two tables:

* **content -> faces**: the SHA-256 of a photo's bytes -> its size and every face found
  (box, score, 5 landmarks). All faces are kept, so ``choice=largest|central`` and ``min_score``
  change without detecting again; a copied or renamed photo is not detected again.
* **file -> content**: ``(path, size, mtime_ns, ctime_ns, inode, device)`` -> SHA-256, so a start-up
  reads one ``stat`` per photo, not every byte. Any write to a file moves its ctime, which no
  tool sets back (``touch -d`` and ``utime`` set mtime and move ctime to now), and a replaced file
  has another inode; a photo whose ctime was less than :data:`RACY_NS` old when it was read is not
  entered (a write in the same clock tick could keep every field), so it is hashed again next time.

Compaction: a store of more than :data:`MAX_SEGMENTS` segments is rewritten as one by the process
that finds it so (readers that lose a segment to it read the list again).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

__all__ = ["FileStat", "PhotoFaces", "FaceStore", "StoreContents", "content_digest", "file_stat", "store_dir"]

log = logging.getLogger(__name__)

#: A file whose ctime is this close to the time it was read is not entered in the file table.
RACY_NS = 2_000_000_000
MAX_SEGMENTS = 16
_DIGEST = 32


class FileStat(NamedTuple):
    """What identifies a file's content without reading it."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int


def file_stat(path: str) -> FileStat:
    """:class:`FileStat` of ``path`` (following symbolic links: the bytes read are the target's)."""
    st = os.stat(path)
    return FileStat(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def content_digest(data: bytes) -> bytes:
    """The 32-byte SHA-256 of a photo's bytes."""
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class PhotoFaces:
    """Every face found in one photo: ``shape`` ``(height, width)``, ``boxes`` ``[k, 4]``, ``scores``
    ``[k]``, ``landmarks`` ``[k, 5, 2]`` (``k = 0``: no face)."""

    shape: tuple[int, int]
    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    @classmethod
    def of(cls, shape: Iterable[int], faces: Iterable) -> "PhotoFaces":
        """From a detector's :class:`~facemargin.detect.Face` list."""
        faces = list(faces)
        return cls(tuple(int(v) for v in shape)[:2],  # type: ignore[arg-type]
                   np.array([f.box for f in faces], dtype=np.float64).reshape(-1, 4),
                   np.array([f.score for f in faces], dtype=np.float64).reshape(-1),
                   np.array([f.landmarks for f in faces], dtype=np.float64).reshape(-1, 5, 2))

    def faces(self) -> list:
        """The faces as :class:`~facemargin.detect.Face` objects."""
        from ...detect.base import Face

        return [Face(b, float(s), m) for b, s, m in zip(self.boxes, self.scores, self.landmarks)]


@dataclass
class StoreContents:
    """A store read into memory (or the entries one process adds)."""

    faces: dict[bytes, PhotoFaces] = field(default_factory=dict)
    files: dict[tuple[str, FileStat], bytes] = field(default_factory=dict)

    def update(self, other: "StoreContents") -> None:
        self.faces.update(other.faces)
        self.files.update(other.files)

    def missing_from(self, other: "StoreContents") -> "StoreContents":
        """The entries of ``self`` that ``other`` lacks."""
        return StoreContents({d: f for d, f in self.faces.items() if d not in other.faces},
                             {k: d for k, d in self.files.items() if k not in other.files})

    def __bool__(self) -> bool:
        return bool(self.faces or self.files)


def store_dir(detector_name: str, cache_key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The store of one detector configuration under ``cache_dir`` (default ``$FACEMARGIN_CACHE/faces``)."""
    if cache_dir is None:
        from ...config import cache_home

        cache_dir = cache_home() / "faces"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in detector_name)[:40] or "detector"
    return Path(cache_dir).expanduser() / f"{safe}-{hashlib.sha256(cache_key.encode()).hexdigest()[:16]}"


class FaceStore:
    """The segments under ``root`` (created on the first write); ``cache_key`` is recorded in each."""

    def __init__(self, root: str | os.PathLike, cache_key: str) -> None:
        self.root = Path(root)
        self.cache_key = str(cache_key)

    def segments(self) -> list[Path]:
        return sorted(self.root.glob("segment-*.npz")) if self.root.is_dir() else []

    def load(self) -> StoreContents:
        """Every entry of every segment; a segment another process compacted away meanwhile is
        found in the compacted one (the list is read again)."""
        for _ in range(5):
            contents, names = StoreContents(), self.segments()
            try:
                for path in names:
                    self._read(path, contents)
            except FileNotFoundError:
                continue
            return contents
        raise OSError(f"{self.root}: the face store kept changing while it was read")

    def _read(self, path: Path, into: StoreContents) -> None:
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["cache_key"]) != self.cache_key:
                    log.warning("%s: written for detector %s, not %s; ignored", path, z["cache_key"], self.cache_key)
                    return
                digests, shapes, ends = z["digests"], z["shapes"], z["face_ends"]
                boxes, scores, marks = z["boxes"], z["scores"], z["landmarks"]
                blob, path_ends, stats, file_digests = z["paths"], z["path_ends"], z["stats"], z["file_digests"]
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError) as exc:  # a damaged segment: the photos are detected again
            log.warning("%s: unreadable face store segment (%s); ignored", path, exc)
            return
        start = 0
        for digest, shape, end in zip(digests, shapes.tolist(), ends.tolist()):
            into.faces[digest.tobytes()] = PhotoFaces((shape[0], shape[1]), boxes[start:end], scores[start:end], marks[start:end])
            start = end
        raw, start = blob.tobytes(), 0
        for end, stat, digest in zip(path_ends.tolist(), stats.tolist(), file_digests):
            into.files[(raw[start:end].decode("utf-8", "surrogateescape"), FileStat(*stat))] = digest.tobytes()
            start = end

    def write(self, contents: StoreContents) -> Path | None:
        """Add ``contents`` as one new segment (nothing when empty); returns its path."""
        if not contents:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        faces = list(contents.faces.items())
        files = list(contents.files.items())
        encoded = [path.encode("utf-8", "surrogateescape") for (path, _), _ in files]
        arrays = dict(
            cache_key=np.array(self.cache_key),
            digests=np.frombuffer(b"".join(d for d, _ in faces), np.uint8).reshape(-1, _DIGEST),
            shapes=np.array([f.shape for _, f in faces], dtype=np.int64).reshape(-1, 2),
            face_ends=np.cumsum([len(f.scores) for _, f in faces], dtype=np.int64),
            boxes=np.concatenate([f.boxes for _, f in faces] or [np.zeros((0, 4))]).reshape(-1, 4),
            scores=np.concatenate([f.scores for _, f in faces] or [np.zeros(0)]),
            landmarks=np.concatenate([f.landmarks for _, f in faces] or [np.zeros((0, 5, 2))]).reshape(-1, 5, 2),
            paths=np.frombuffer(b"".join(encoded), np.uint8),
            path_ends=np.cumsum([len(e) for e in encoded], dtype=np.int64),
            stats=np.array([list(stat) for (_, stat), _ in files], dtype=np.int64).reshape(-1, 5),
            file_digests=np.frombuffer(b"".join(d for _, d in files), np.uint8).reshape(-1, _DIGEST),
        )
        name = f"segment-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.npz"
        fd, tmp = tempfile.mkstemp(prefix=".segment-", suffix=".part", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, self.root / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return self.root / name

    def compact(self) -> None:
        """Rewrite a store of more than :data:`MAX_SEGMENTS` segments as one."""
        names = self.segments()
        if len(names) <= MAX_SEGMENTS:
            return
        contents = StoreContents()
        try:
            for path in names:
                self._read(path, contents)
        except FileNotFoundError:
            return  # another process is compacting it
        self.write(contents)
        for path in names:
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def racy(stat: FileStat, read_at_ns: int) -> bool:
    """True when a write in the same clock tick as the last one could have kept every field of ``stat``."""
    return read_at_ns - stat.ctime_ns < RACY_NS
