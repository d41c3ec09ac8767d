"""Landmark list files: insightface's ``*_5pts`` lines, ``PATH x1 y1 ... x5 y5 [score]``.

One line per photo: its path (relative to the list's image root, or absolute), then the 5 points
of :data:`facemargin.detect.LANDMARK_NAMES` in pixels, optionally the detector's score. ``#``
starts a comment; blank lines are skipped. ``python -m facemargin.detect`` writes these files;
``pack --align``, ``embed landmarks=`` and ``compare landmarks=`` read them through
:func:`read_landmarks`, the one reader. Numpy only.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from ..errors import UserError

__all__ = ["LandmarkFileError", "read_landmarks", "write_landmarks"]


class LandmarkFileError(UserError, ValueError):
    """A landmark list that cannot be used; the message names the file and line."""


def read_landmarks(list_file: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """``{path: landmarks [5, 2] float64}`` in file order; ``path`` is ``os.path.normpath(root / PATH)``
    (``PATH`` as written when ``root`` is ``None``).

    Refused, naming the file and line: a line that is not a path and 10 (or 11, with a score)
    finite numbers, and a photo listed twice with different points. A file with no line is refused.
    """
    out: dict[str, np.ndarray] = {}
    first_line: dict[str, int] = {}
    try:
        with open(list_file, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as err:
        raise LandmarkFileError(f"{list_file}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    for lineno, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        try:
            if len(fields) not in (11, 12):
                raise ValueError
            numbers = np.array([float(v) for v in fields[1:]], dtype=np.float64)
            if not np.isfinite(numbers).all():
                raise ValueError
        except ValueError:
            raise LandmarkFileError(f"{list_file}: line {lineno} is not 'PATH x1 y1 ... x5 y5 [score]' "
                                    f"(a path and 10 finite numbers): {line.strip()[:80]!r}") from None
        key = os.path.normpath(fields[0] if root is None else os.path.join(root, fields[0]))
        points = numbers[:10].reshape(5, 2)
        if key in out:
            if not np.array_equal(out[key], points):
                raise LandmarkFileError(f"{list_file}: line {lineno} gives {fields[0]} other landmarks than "
                                        f"line {first_line[key]}; keep one row per photo")
            continue
        out[key], first_line[key] = points, lineno
    if not out:
        raise LandmarkFileError(f"{list_file}: no landmark lines ('PATH x1 y1 ... x5 y5 [score]')")
    return out


def write_landmarks(list_file: str | os.PathLike,
                    rows: Iterable[tuple[str, np.ndarray, float | None]]) -> int:
    """Write ``(relative path, landmarks [5, 2], score or None)`` rows; returns the number written.

    Points are written with 3 decimals (1/1000 pixel), the score with 4. Paths must not contain
    whitespace (the format splits on it): such a path is refused by name.
    """
    n = 0
    tmp = f"{os.fspath(list_file)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for path, points, score in rows:
            if any(c.isspace() for c in path) or "#" in path:
                raise LandmarkFileError(f"{path!r}: a path with whitespace or '#' cannot be written to a landmark list")
            pts = np.asarray(points, dtype=np.float64).reshape(10)
            tail = "" if score is None else f" {float(score):.4f}"
            f.write(path + "".join(f" {v:.3f}" for v in pts) + tail + "\n")
            n += 1
    os.replace(tmp, list_file)
    return n
