"""The face of every photo of a folder, detected once: found in the store, or detected and stored.

:func:`locate_faces` runs at set-up, before the first epoch (``data=folder data.detect=...``):

1. the store (:mod:`facemargin.data.sources.face_store`) is read; a photo whose ``stat`` matches
   a stored file entry, and whose content has stored faces, is done (one ``stat`` per photo);
2. the other photos are shared out between the ranks (``pending[rank::world]``); each rank reads
   its photos, hashes their bytes, and runs the detector only on content the store does not hold
   (a copied, renamed or touched photo is not detected again), then adds what it found to the
   store as one segment;
3. ``exchange`` (an all-gather across the ranks; identity on one process) gives every rank what
   the others found, so every rank ends with the same faces and each photo was detected once;
   with ``fill_gaps`` (one process per node) what the node's store still lacks (a store that is
   not shared between nodes) is written too.

The face used from each photo is chosen here, from every face stored (``choice``, ``min_score``),
so changing the rule detects nothing again. Workers receive the chosen landmarks only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ...detect.base import FACE_CHOICES, select_face
from ...errors import UserError
from ..formats.photo import decode_photo
from .base import SourceError
from .face_store import FaceStore, PhotoFaces, StoreContents, content_digest, file_stat, racy

__all__ = ["LocatedFaces", "locate_faces"]

log = logging.getLogger(__name__)

#: ``exchange(this rank's payload) -> every rank's payload, in rank order`` (e.g. ``all_gather_object``).
Exchange = Callable[[Any], list]


@dataclass
class LocatedFaces:
    """The face chosen in each photo (by position in ``paths``) and what was done to find it."""

    landmarks: dict[int, np.ndarray] = field(default_factory=dict)  # photo -> [5, 2] of the chosen face
    scores: dict[int, float] = field(default_factory=dict)
    no_face: list[int] = field(default_factory=list)
    several: list[int] = field(default_factory=list)
    unreadable: dict[int, str] = field(default_factory=dict)   # photo -> why (on_corrupt="skip")
    detected: int = 0          # photos this process ran the detector on
    detected_all: int = 0      # photos all ranks ran the detector on
    from_store: int = 0        # photos whose faces came from the store with one stat

    @property
    def kept(self) -> list[int]:
        """Photos with a face, in order."""
        return sorted(self.landmarks)


def _read_photo(path: str) -> tuple[bytes, Any, Any, int]:
    """``(bytes, stat before, stat after, time read)``."""
    read_at = time.time_ns()
    before = file_stat(path)
    with open(path, "rb") as f:
        data = f.read()
    return data, before, file_stat(path), read_at


def _detect_share(paths: Sequence[str], share: Sequence[int], known: StoreContents, detector: Any,
                  progress: bool) -> tuple[dict[int, bytes], StoreContents, dict[int, str], int]:
    """Hash this rank's photos and detect the new contents: ``(photo -> digest, new entries, unreadable, detector calls)``."""
    from tqdm import tqdm

    digests: dict[int, bytes] = {}
    added = StoreContents()
    unreadable: dict[int, str] = {}
    calls = 0
    for i in tqdm(share, desc=f"detect faces ({detector.name})", unit="photo", disable=not progress, leave=False):
        path = paths[i]
        try:
            data, before, after, read_at = _read_photo(path)
        except OSError as exc:
            unreadable[i] = f"{path}: {exc.strerror or exc}"
            continue
        digest = content_digest(data)
        if digest not in known.faces and digest not in added.faces:
            try:
                image = decode_photo(data, path)
            except ValueError as exc:  # CorruptImageError included
                unreadable[i] = str(exc)
                continue
            added.faces[digest] = PhotoFaces.of(image.shape, detector(image))
            calls += 1
        if before == after and not racy(before, read_at):
            added.files[(path, before)] = digest
        digests[i] = digest
    return digests, added, unreadable, calls


def locate_faces(paths: Sequence[str], detector: Any, store: FaceStore, *, choice: str = "largest",
                 min_score: float = 0.0, rank: int = 0, world: int = 1, exchange: Exchange | None = None,
                 fill_gaps: bool = False, on_corrupt: str = "raise", progress: bool = False) -> LocatedFaces:
    """The chosen face of every photo in ``paths`` (absolute paths), each detected once (see the module doc).

    Every rank must call it with the same ``paths`` (a collective when ``exchange`` is given). An
    unreadable photo raises naming it (``on_corrupt="raise"``) or is left out and listed
    (``"skip"``); a failure on one rank is raised on every rank, after the exchange, so none waits.
    """
    if choice not in FACE_CHOICES:
        raise UserError(f"data.choice must be one of {', '.join(FACE_CHOICES)}, got {choice!r}")
    known = store.load()
    resolved: dict[int, bytes] = {}
    pending: list[int] = []
    for i, path in enumerate(paths):
        try:
            digest = known.files.get((path, file_stat(path)))
        except OSError:
            digest = None  # read (and reported) by the rank it falls to
        if digest is not None and digest in known.faces:
            resolved[i] = digest
        else:
            pending.append(i)
    result = LocatedFaces(from_store=len(resolved))
    share = pending[rank::world]
    if pending and rank == 0:
        log.info("data.detect=%s: %d of %d photos are new to the face store %s; detecting them%s",
                 detector.name, len(pending), len(paths), store.root, f" on {world} ranks" if world > 1 else "")
    failure: BaseException | None = None
    digests, added, unreadable, calls = {}, StoreContents(), {}, 0
    try:
        digests, added, unreadable, calls = _detect_share(paths, share, known, detector, progress)
        store.write(added)
    except Exception as exc:  # raised on every rank below, after the exchange: no rank waits for this one
        failure = exc
    listing = hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()
    payload = (digests, added, unreadable, calls, None if failure is None else f"{type(failure).__name__}: {failure}", listing)
    gathered = exchange(payload) if exchange is not None and world > 1 else [payload]
    if failure is not None:
        raise failure
    failed = [(r, p[4]) for r, p in enumerate(gathered) if p[4] is not None]
    if failed:
        raise SourceError(f"finding faces failed on rank {failed[0][0]}: {failed[0][1]}")
    if len({p[5] for p in gathered}) > 1:
        raise SourceError(f"the ranks listed different photos ({len(paths)} here): the folder changed while the run "
                          "started; start it again")
    everything = StoreContents()
    for their_digests, their_added, their_unreadable, their_calls, _, _ in gathered:
        resolved.update(their_digests)
        everything.update(their_added)
        result.unreadable.update(their_unreadable)
        result.detected_all += their_calls
    result.detected = calls
    known.update(everything)
    if fill_gaps and world > 1 and everything:
        store.write(everything.missing_from(store.load()))  # a store this node does not share
    if rank == 0:
        store.compact()
    if result.unreadable and on_corrupt != "skip":
        first = min(result.unreadable)
        raise SourceError(f"{len(result.unreadable)} photo(s) cannot be read, e.g. {result.unreadable[first]} "
                          "(data.on_corrupt=skip leaves them out)")
    for i in range(len(paths)):
        if i in result.unreadable:
            continue
        found = known.faces[resolved[i]]
        faces = [f for f in found.faces() if f.score >= min_score]
        face = select_face(faces, found.shape, choice)  # type: ignore[arg-type]
        if face is None:
            result.no_face.append(i)
            continue
        if len(faces) > 1:
            result.several.append(i)
        result.landmarks[i], result.scores[i] = face.landmarks, face.score
    return result


def absolute(path: str) -> str:
    """The key a photo has in the store: its absolute, normalised path."""
    return os.path.normpath(os.path.abspath(path))
