"""Training sources: a set seen as samples ``0 .. N-1`` in storage order.

A source only says how to read sample ``i``; sharding, shuffling, the resume plan, corrupt-record
handling, decoding and normalisation are shared (:mod:`facemargin.data.plan`,
:mod:`facemargin.data.loader`). Two sources ship:

* :class:`~facemargin.data.faceset.FaceRecordSet` -- an insightface / im2rec RecordIO set
  (``data=recordio``);
* :class:`FolderSource` -- JPEG/PNG files, one sub-folder per identity or a list file of
  ``path label`` lines (``data=folder``).

A third source is one small subclass of :class:`FaceSource`: ``__len__``, ``read_raw`` (the stored
bytes of a sample, in one read), ``parse`` (raw bytes -> validated ``(label, encoded image)``),
``where`` (how errors name a sample) and ``labels``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UserError
from .storage import open_source

__all__ = ["FaceSource", "FolderSource", "SourceError"]


class SourceError(UserError, ValueError):
    """A training source that cannot be used as given; the message names the file and line or key."""


class FaceSource(ABC):
    """Samples ``0 .. len-1`` of a face set: stored bytes, identity label, and a name for messages.

    Attributes: ``name`` (path or URL), ``num_classes``, ``image_size`` ``(height, width)``.
    Instances are pickled into DataLoader workers: keep open handles out of the pickled state.
    """

    name: str
    num_classes: int
    image_size: tuple[int, int] | None

    @abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    @abstractmethod
    def read_raw(self, i: int) -> bytes:
        """The stored bytes of sample ``i``, read with one call."""

    def read_raws(self, indices: np.ndarray) -> list[bytes]:
        """Stored bytes of several samples; sources override this to read runs of neighbours at once."""
        return [self.read_raw(int(i)) for i in indices]

    @abstractmethod
    def parse(self, i: int, raw: bytes) -> tuple[int, bytes]:
        """``(label, encoded image)`` of sample ``i`` from its stored bytes, validated.

        Raises ``ValueError`` subclasses naming :meth:`where`.
        """

    @abstractmethod
    def where(self, i: int) -> str:
        """How messages name sample ``i`` (e.g. ``"train.rec at offset 1024 (key 5)"``)."""

    @abstractmethod
    def labels(self) -> np.ndarray:
        """Identity of every sample (int64 ``[N]``)."""


class FolderSource(FaceSource):
    """Image files: ``root/<identity>/<image>`` (labels = sorted folder names) or a list file.

    Args:
        root: a directory with one sub-folder of images per identity (the order and labels
            ``python -m facemargin.data.pack`` gives them, so a packed copy has the same samples),
            or a text file of ``path label`` lines (paths relative to the file's folder; blank lines
            and ``#`` comments ignored).
        image_size: ``(height, width)`` every image must have; default: the first image's.
        num_classes: default: the number of folders, or the largest label + 1 of a list file.
    """

    def __init__(self, root: str | os.PathLike, image_size: Sequence[int] | None = None,
                 num_classes: int | None = None) -> None:
        self.root = Path(root).expanduser()
        self.name = str(self.root)
        if self.root.is_dir():
            from .pack import list_image_tree

            names, items = list_image_tree(self.root)
            paths = [str(p) for p, _ in items]
            self._labels = np.fromiter((label for _, label in items), dtype=np.int64, count=len(items))
            found = len(names)
        elif self.root.is_file():
            paths, self._labels = _read_list(self.root)
            found = int(self._labels.max()) + 1
        else:
            raise FileNotFoundError(f"image folder or list file not found: {self.root}")
        # one byte buffer + offsets, not a list of str: DataLoader workers share it without touching
        # millions of Python objects (copy-on-access of refcounts would copy the whole list per worker)
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        del paths, encoded
        self.num_classes = found if num_classes is None else int(num_classes)
        if int(self._labels.max()) >= self.num_classes:
            raise SourceError(f"{self.root}: label {int(self._labels.max())} is outside [0, {self.num_classes})")
        if image_size is None:
            from .decode import declared_size

            try:
                image_size = declared_size(self.read_raw(0))
            except ValueError as exc:
                raise SourceError(f"{self.where(0)}: {exc}") from None
        self.image_size = (int(image_size[0]), int(image_size[1]))

    def __len__(self) -> int:
        return int(self._ends.size)

    def path(self, i: int) -> str:
        """The file of sample ``i``."""
        start = int(self._ends[i - 1]) if i > 0 else 0
        return self._blob[start: int(self._ends[i])].tobytes().decode("utf-8", "surrogateescape")

    def read_raw(self, i: int) -> bytes:
        source = open_source(self.path(i))
        try:
            return source.pread(source.size, 0)
        finally:
            source.close()

    def parse(self, i: int, raw: bytes) -> tuple[int, bytes]:
        return int(self._labels[i]), raw

    def where(self, i: int) -> str:
        return self.path(i)

    def labels(self) -> np.ndarray:
        return self._labels

    def __repr__(self) -> str:
        return f"FolderSource({self.name!r}, images={len(self)}, num_classes={self.num_classes})"


def _read_list(path: Path) -> tuple[list[str], np.ndarray]:
    """``path label`` lines -> (absolute paths, labels); errors name the file and line."""
    paths: list[str] = []
    labels: list[int] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit() or len(parts[1]) > 9:
            raise SourceError(f"{path}: line {lineno} is not 'path label' (label a non-negative integer): {text[:80]!r}")
        file = Path(parts[0]).expanduser()
        paths.append(str(file if file.is_absolute() else path.parent / file))
        labels.append(int(parts[1]))
    if not paths:
        raise SourceError(f"{path}: no 'path label' lines")
    return paths, np.asarray(labels, dtype=np.int64)
