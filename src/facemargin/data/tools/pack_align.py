"""``pack --align``: landmark lists checked against the photos (the faces are aligned by
:class:`~facemargin.data.formats.photo.Framing`, as ``data=folder data.landmarks=`` aligns them).

The list is read by the shared reader (:func:`facemargin.detect.landmarks.read_landmarks`, which
refuses malformed lines and a photo listed twice with other points); here its rows are keyed by
absolute path, so one photo written two ways (relative and absolute, ``a/../a``) with other points
is refused too, and each photo's points must lie inside it (pixel centres: the photo spans
``-0.5 .. W-0.5``), checked from its header before it is decoded.
"""

from __future__ import annotations

import os

import numpy as np

from ...detect.base import LANDMARK_NAMES
from ...detect.landmarks import LandmarkFileError, read_landmarks

__all__ = ["LandmarksOutsideError", "check_landmarks_inside", "landmarks_by_path"]


def landmarks_by_path(align: str | os.PathLike, root: str | os.PathLike) -> dict[str, np.ndarray]:
    """``read_landmarks`` keyed by absolute path: one photo written two ways (relative and absolute,
    ``a/../a``) with different points is refused like any conflicting duplicate."""
    marks: dict[str, np.ndarray] = {}
    written: dict[str, str] = {}
    for key, points in read_landmarks(align, root).items():
        path = os.path.abspath(key)
        if path in marks and not np.array_equal(marks[path], points):
            raise LandmarkFileError(f"{align}: {written[path]} and {key} are the same photo with different landmarks; "
                                    "keep one row per photo")
        marks[path], written[path] = points, key
    return marks


def check_landmarks_inside(landmarks: np.ndarray, hw: tuple[int, int], path: str | os.PathLike) -> None:
    """Refuse landmarks outside the ``hw`` photo (pixel centres: the photo spans ``-0.5 .. W-0.5``)."""
    h, w = hw
    pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    outside = (pts[:, 0] < -0.5) | (pts[:, 0] > w - 0.5) | (pts[:, 1] < -0.5) | (pts[:, 1] > h - 0.5)
    if outside.any():
        i = int(np.argmax(outside))
        raise LandmarksOutsideError(
            f"{path}: its {LANDMARK_NAMES[i].replace('_', ' ')} landmark ({pts[i, 0]:g}, {pts[i, 1]:g}) lies outside "
            f"the {w}x{h} photo ({int(outside.sum())} of 5 points do); are the landmarks for another copy of it?")


class LandmarksOutsideError(ValueError):
    """``--align`` landmarks that do not fall inside their photo."""
