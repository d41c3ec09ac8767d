"""One face per photo over a list of image files: what ``python -m facemargin.detect`` and ``embed`` run.

:func:`survey` decodes each file (:func:`facemargin.data.formats.image.decode_image`, RGB), detects,
and keeps the chosen face (:func:`~facemargin.detect.pipeline.choose_face`) with the number
found; :class:`Survey` says which photos had none or several and gives the landmark-list rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import UserError
from .base import FACE_CHOICES, Detector
from .pipeline import FaceChoice, choose_face

__all__ = ["Survey", "survey", "survey_folder"]


@dataclass
class Survey:
    """The chosen face of each photo: ``faces[name]`` (``name``: the path relative to ``root``)."""

    root: Path
    choice: str
    faces: dict[str, FaceChoice] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.faces)

    @property
    def no_face(self) -> list[str]:
        """Photos where no face was found, in survey order."""
        return [name for name, found in self.faces.items() if found.face is None]

    @property
    def several(self) -> list[str]:
        """Photos with more than one face (one was chosen by ``choice``)."""
        return [name for name, found in self.faces.items() if found.count > 1]

    def landmark_rows(self) -> Iterator[tuple[str, np.ndarray, float]]:
        """``(name, landmarks [5, 2], score)`` of each photo with a face (what :func:`write_landmarks` takes)."""
        for name, found in self.faces.items():
            if found.face is not None:
                yield name, found.face.landmarks, found.face.score


def _name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return os.fspath(path)


def survey(paths: Sequence[str | os.PathLike], detector: Detector, choice: str = "largest", min_score: float = 0.0,
           root: str | os.PathLike | None = None, progress: bool = False) -> Survey:
    """Detect the face of every photo in ``paths`` (names relative to ``root`` when given)."""
    from tqdm import tqdm

    from ..data.formats.image import CorruptImageError, decode_image

    if choice not in FACE_CHOICES:  # before the first photo, not after it
        raise UserError(f"face choice must be one of {', '.join(FACE_CHOICES)}, got {choice!r}")
    base = Path(root) if root is not None else Path(".")
    result = Survey(base, choice)
    for path in tqdm([Path(p) for p in paths], desc=f"detect ({detector.name})", unit="photo",
                     disable=not progress, leave=False):
        try:
            image = decode_image(path.read_bytes())
        except CorruptImageError as err:
            raise UserError(f"{path}: not a readable image ({err})") from None
        result.faces[_name(path, base) if root is not None else os.fspath(path)] = choose_face(
            detector, image, choice, min_score)
    return result


def survey_folder(root: str | os.PathLike, detector: Detector, choice: str = "largest", min_score: float = 0.0,
                  progress: bool = False) -> Survey:
    """:func:`survey` of every image under ``root`` (recursive, sorted; :func:`facemargin.embed.find_images`)."""
    from ..embed import find_images

    root = Path(root)
    paths = find_images(root)
    spaced = [p.relative_to(root).as_posix() for p in paths if any(c.isspace() or c == "#" for c in str(p.relative_to(root)))]
    if spaced:
        raise UserError(f"{len(spaced)} photo path(s) under {root} contain whitespace or '#', which a landmark list "
                        f"cannot hold: {', '.join(spaced[:3])}", hint="rename them (e.g. spaces to underscores)")
    return survey(paths, detector, choice, min_score, root, progress)
