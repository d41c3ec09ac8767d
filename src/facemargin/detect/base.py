"""The detector contract: an RGB photo in, faces with a box, a score and 5 landmarks out.

Every detector (``conf/detector/*.yaml``, a Hydra ``_target_``) is a callable object::

    detector(image: np.ndarray) -> list[Face]

``image``: uint8 ``[H, W, 3]`` **RGB** (what :func:`facemargin.data.formats.image.decode_image` returns).
The result is every face scoring at least the detector's own threshold, best score first, in the
photo's pixel coordinates (pixel ``(x, y)`` is the centre of column ``x``, row ``y``, as in
:mod:`facemargin.align`). A detector also has ``name`` (str, for messages and cache keys) and
``cache_key`` (str: changes whenever its weights or options change what it returns, so
landmarks cached from one detector are never reused for another).

The 5 landmarks are in the order of the ArcFace template (:data:`facemargin.align.ARCFACE_TEMPLATE`)
-- :data:`LANDMARK_NAMES`: the eye on the image's left, the eye on the image's right, the nose
tip, the mouth corner on the image's left, the mouth corner on the image's right -- so
``align_face(image, face.landmarks)`` gives the 112x112 crop insightface's sets are made of.

Numpy only: no torch, no Lightning (the packer and DataLoader workers import it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import UserError

__all__ = ["FACE_CHOICES", "LANDMARK_NAMES", "Detector", "Face", "select_face"]

#: The 5 points, in the ArcFace template's order (left/right as seen in the image).
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")

#: How one face is chosen from a photo with several: the largest box, or the box nearest the centre.
FACE_CHOICES = ("largest", "central")


@dataclass(frozen=True)
class Face:
    """One detected face: ``box`` ``[4]`` (x1, y1, x2, y2), ``score`` in [0, 1], ``landmarks`` ``[5, 2]`` (x, y)."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    def __post_init__(self) -> None:
        box = np.asarray(self.box, dtype=np.float64).reshape(-1)
        marks = np.asarray(self.landmarks, dtype=np.float64)
        if box.shape != (4,) or marks.shape != (5, 2):
            raise ValueError(f"a face needs a box [4] and landmarks [5, 2], got {box.shape} and {marks.shape}")
        if not (np.isfinite(box).all() and np.isfinite(marks).all() and np.isfinite(self.score)):
            raise ValueError(f"a face's box, score and landmarks must be finite, got {box}, {self.score}, {marks}")
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "landmarks", marks)
        object.__setattr__(self, "score", float(self.score))

    @property
    def area(self) -> float:
        """Box area in square pixels."""
        return float(max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0))

    @property
    def center(self) -> np.ndarray:
        """Box centre ``[2]`` (x, y)."""
        return np.array([(self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2])


@runtime_checkable
class Detector(Protocol):
    """What every face detector provides (see the module docstring)."""

    name: str
    cache_key: str

    def __call__(self, image: np.ndarray) -> list[Face]: ...


def select_face(faces: Sequence[Face], image_shape: Sequence[int],
                choice: Literal["largest", "central"] = "largest") -> Face | None:
    """The face to use from a photo: the largest box (default) or the one whose centre is nearest
    the photo's centre; ``None`` when there is none. Ties go to the higher score."""
    if choice not in FACE_CHOICES:
        raise UserError(f"face choice must be one of {', '.join(FACE_CHOICES)}, got {choice!r}")
    if not faces:
        return None
    if choice == "largest":
        return max(faces, key=lambda f: (f.area, f.score))
    h, w = int(image_shape[0]), int(image_shape[1])
    mid = np.array([(w - 1) / 2, (h - 1) / 2])
    return min(faces, key=lambda f: (float(np.sum((f.center - mid) ** 2)), -f.score))
