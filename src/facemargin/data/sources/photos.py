"""``data=folder`` and its options: a folder of photos, and how each becomes a training image.

* as stored (the default): every image must have one size, the set's; the photos' size is said
  at open, with the options that make faces of them when it is not an aligned face's;
* ``crop=square|F|WxH`` and ``resize=N``: a centred crop and a resize, as ``pack --crop/--resize``;
* ``landmarks=FILE``: each photo aligned to the ArcFace template from its 5 points in a landmark
  list, as ``pack --align`` (photos the list lacks are left out and listed);
* ``detect=NAME``: the 5 points found by a detector, once per photo (:mod:`.faces`); photos with
  no face are left out and listed, of several faces ``choice`` keeps one.

The crop, resize and alignment run in the DataLoader workers (:class:`~.framed.FramedSource`);
detection runs once, at set-up, on every rank together (:meth:`PhotoFolder.open`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import UserError
from ..formats.image import ImageSizeError
from ..formats.photo import Framing
from .base import FaceSource
from .faces import Exchange, LocatedFaces, absolute, locate_faces
from .face_store import FaceStore, store_dir
from .folder import FolderSource
from .framed import FramedSource

__all__ = ["PhotoFolder", "PhotoOptionError", "size_advice"]

log = logging.getLogger(__name__)



class PhotoOptionError(UserError, ValueError):
    """``data=folder`` options that cannot work on this folder; the message says which and why."""


def size_advice(size: Sequence[int] | None = None) -> str:
    """The options that turn photos into ``size`` (default 112x112) aligned faces."""
    n = int(size[0]) if size is not None else 112
    return (f"data.crop=0.5 data.resize={n} (the centred half, as LFW frames faces), data.resize={n} "
            f"(the centred square), data.detect=mtcnn (detect and align each face), or data.landmarks=FILE "
            f"(align from a list of 5 points per photo)")


class PhotoFolder:
    """A ``data=folder`` set: the photos of ``root`` and the options of the module doc.

    Args:
        root, num_classes: as :class:`~.folder.FolderSource`.
        image_size: ``(height, width)`` every training image must have (checked against what the
            options make of the photos).
        crop, resize: a centred crop (``square``, a fraction ``F``, ``WxH``) and ``N`` x ``N``;
            ``resize_quality`` (``fast`` | ``high`` | ``full``): how far a JPEG being shrunk is decoded
            at reduced scale, as ``pack --resize-quality``.
        landmarks: a landmark list (paths relative to ``root``): align every listed photo.
        detect, detect_options: a detector (a name in ``conf/detector/``, a ``_target_`` mapping or
            a built detector) and its options; ``choice`` (``largest`` | ``central``) and
            ``min_score`` pick the face; ``face_cache`` holds the store (default
            ``$FACEMARGIN_CACHE/faces``); ``on_corrupt="skip"`` leaves unreadable photos out.

    ``image_size`` and ``num_classes`` are known at once; :meth:`open` gives the training source
    (with ``detect``, after finding every photo's face).
    """

    def __init__(self, root: str | os.PathLike, image_size: Sequence[int] | None = None, num_classes: int | None = None,
                 crop: str | None = None, resize: int | None = None, landmarks: str | os.PathLike | None = None,
                 detect: str | Mapping[str, Any] | Any | None = None, detect_options: Mapping[str, Any] | None = None,
                 choice: str = "largest", min_score: float = 0.0, face_cache: str | os.PathLike | None = None,
                 on_corrupt: str = "raise", resize_quality: str = "fast") -> None:
        from ...detect.base import FACE_CHOICES

        if choice not in FACE_CHOICES:
            raise PhotoOptionError(f"data.choice must be one of {', '.join(FACE_CHOICES)}, got {choice!r}")
        if detect is not None and landmarks is not None:
            raise PhotoOptionError("data.detect and data.landmarks exclude each other: the landmarks come from one of them")
        try:
            self.framing = Framing.of(crop, resize, align=detect is not None or landmarks is not None, prefix="data.",
                                      align_option="data.detect" if detect is not None else "data.landmarks",
                                      resize_quality=resize_quality)
        except ValueError as exc:
            raise PhotoOptionError(str(exc)) from None
        self.expected = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        try:
            self.folder = FolderSource(root, num_classes=num_classes, stored_sizes=not self.framing.changes_pixels)
        except ImageSizeError as exc:  # photos as stored, of no common size: say how to make faces of them
            raise PhotoOptionError(f"data.root={root}: {exc}", hint=f"make faces of them: {size_advice()}") from None
        self.name, self.num_classes = self.folder.name, self.folder.num_classes
        self.choice, self.min_score, self.on_corrupt = choice, float(min_score), on_corrupt
        self.detector = None
        self._source: FaceSource | None = None
        if detect is not None:
            from ...detect.pipeline import load_detector

            self.detector = load_detector(detect, **dict(detect_options or {}))
            self.store = FaceStore(store_dir(self.detector.name, self.detector.cache_key, face_cache), self.detector.cache_key)
            self.image_size: tuple[int, int] = (self.framing.aligned_size,) * 2  # type: ignore[assignment]
        elif landmarks is not None:
            self._source = self._aligned_from_list(Path(landmarks))
        elif self.framing.changes_pixels:
            self._source = FramedSource(self.folder, self.framing, image_size=self.expected)
        else:
            self._source = self.folder
            self._check_stored_sizes()
        if self._source is not None:
            self.image_size = self._source.image_size  # type: ignore[assignment]
        if self.expected is not None and self.image_size != self.expected:
            raise PhotoOptionError(f"data.image_size={list(self.expected)} but the data options make "
                                   f"{self.image_size[1]}x{self.image_size[0]} images")

    def _check_stored_sizes(self) -> None:
        """Photos used as stored: their size (the folder's, from most of its headers) against the
        expected one; say it when it is not facemargin's 112x112."""
        folder = self.folder
        h, w = folder.image_size  # type: ignore[misc]
        if self.expected is not None and (h, w) != self.expected:
            raise PhotoOptionError(f"data.image_size={list(self.expected)} but the photos under {self.name} are {w}x{h}",
                                   hint=f"make faces of the photos: {size_advice(self.expected)}")
        if (h, w) != (112, 112):
            log.info("data=folder: the photos under %s are %dx%d (%s); facemargin's backbones take aligned "
                     "112x112 faces -- to make them: %s", self.name, w, h, folder.where(0), size_advice())

    def _aligned_from_list(self, listing: Path) -> FramedSource:
        from ...detect.landmarks import read_landmarks

        marks = read_landmarks(listing, self.folder.root)
        keep = [i for i in range(len(self.folder)) if os.path.normpath(self.folder.path(i)) in marks]
        missing = len(self.folder) - len(keep)
        if not keep:
            raise PhotoOptionError(f"data.landmarks={listing} names none of the {len(self.folder)} photos under {self.name} "
                                   "(paths are read relative to data.root)")
        if missing:
            first = next(self.folder.path(i) for i in range(len(self.folder)) if os.path.normpath(self.folder.path(i)) not in marks)
            log.warning("data.landmarks=%s has no landmarks for %d of %d photos (e.g. %s): they are left out",
                        listing, missing, len(self.folder), first)
        points = np.stack([marks[os.path.normpath(self.folder.path(i))] for i in keep])
        return FramedSource(self.folder, self.framing, keep, points, image_size=(self.framing.aligned_size,) * 2)

    @property
    def source(self) -> FaceSource | None:
        """The training source, once known (``None`` until :meth:`open` with ``detect``)."""
        return self._source

    def open(self, rank: int = 0, world: int = 1, exchange: Exchange | None = None, fill_gaps: bool = False,
             report_dir: str | os.PathLike | None = None, progress: bool = False) -> FaceSource:
        """The training source; with ``detect``, every photo's face found first (a collective under
        DDP: every rank calls it, see :func:`~.faces.locate_faces`), and on rank 0 the lists of
        photos left out written to ``report_dir`` (default: a folder per photo folder in the face store)."""
        if self._source is not None:
            return self._source
        folder = self.folder
        paths = [absolute(folder.path(i)) for i in range(len(folder))]
        found = locate_faces(paths, self.detector, self.store, choice=self.choice, min_score=self.min_score,
                             rank=rank, world=world, exchange=exchange, fill_gaps=fill_gaps,
                             on_corrupt=self.on_corrupt, progress=progress)
        if not found.kept:
            raise PhotoOptionError(f"data.detect={self.detector.name}: no face found in any of the {len(folder)} "  # type: ignore[union-attr]
                                   f"photos under {self.name}")
        keep = found.kept
        self._source = FramedSource(folder, self.framing, keep, np.stack([found.landmarks[i] for i in keep]),
                                    image_size=self.image_size)
        if rank == 0:
            if report_dir is None:  # one folder per photo folder, beside the faces
                digest = hashlib.sha256(str(self.folder.root.resolve()).encode()).hexdigest()[:12]
                report_dir = self.store.root / "folders" / f"{self.folder.root.name}-{digest}"
            self._report(found, Path(report_dir))
        return self._source

    def _relative(self, i: int) -> str:
        path = self.folder.path(i)
        try:
            return Path(path).relative_to(self.folder.root).as_posix()
        except ValueError:
            return path

    def _report(self, found: LocatedFaces, out: Path) -> None:
        """Write ``faces.txt`` (the faces used), ``noface.txt``, ``several.txt`` (and ``unreadable.txt``); log one summary."""
        from ...detect.landmarks import LandmarkFileError, write_landmarks

        out.mkdir(parents=True, exist_ok=True)
        lists = {"noface.txt": found.no_face, "several.txt": found.several}
        if found.unreadable:
            lists["unreadable.txt"] = sorted(found.unreadable)
        for name, rows in lists.items():
            (out / name).write_text("".join(f"{self._relative(i)}\n" for i in rows))
        try:
            write_landmarks(out / "faces.txt", ((self._relative(i), found.landmarks[i], found.scores[i]) for i in found.kept))
        except LandmarkFileError as exc:
            log.warning("faces.txt not written: %s", exc)
        total = len(self.folder)
        identities = len(np.unique(self.folder.labels()[found.kept]))
        line = (f"data.detect={self.detector.name}: a face in {len(found.kept)} of {total} photos "  # type: ignore[union-attr]
                f"({found.from_store} from the face store, {found.detected_all} detected now), "
                f"{identities} of {self.num_classes} identities; no face: {len(found.no_face)} photos, left out -> "
                f"{out / 'noface.txt'}; several faces: {len(found.several)} photos ({self.choice} used) -> "
                f"{out / 'several.txt'}; faces used -> {out / 'faces.txt'}")
        if found.unreadable:
            line += f"; unreadable: {len(found.unreadable)} photos, left out -> {out / 'unreadable.txt'}"
        log.info(line)
