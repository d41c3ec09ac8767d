"""Image files as a training source: one sub-folder per identity, or a list file of ``path label`` lines."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..storage.source import open_source
from .base import FaceSource, SourceError
from .listing import IMAGE_EXTENSIONS, list_image_tree, read_list

__all__ = ["FolderSource", "list_image_tree", "IMAGE_EXTENSIONS"]


class FolderSource(FaceSource):
    """Image files: ``root/<identity>/<image>`` (labels = sorted folder names) or a list file.

    Args:
        root: a directory with one sub-folder of images per identity (the order and labels
            ``python -m facemargin.data.pack`` gives them, so a packed copy has the same samples),
            or a text file of ``path label`` lines (paths relative to the file's folder; blank lines
            and ``#`` comments ignored). Both are checked at open, a list file line by line
            (:mod:`~facemargin.data.sources.listing`).
        image_size: ``(height, width)`` every image must have; default: the most common size of
            up to 64 images spread over the set (:meth:`~FaceSource.sampled_image_size`).
        num_classes: default: the number of folders, or the largest label + 1 of a list file (whose
            labels must then be below its number of images).
        stored_sizes: ``False`` when the stored photos are not the training images (they are cropped,
            resized or aligned first: :class:`~facemargin.data.sources.framed.FramedSource`); then
            no size is taken from them and ``image_size`` is ``None``.
    """

    def __init__(self, root: str | os.PathLike, image_size: Sequence[int] | None = None,
                 num_classes: int | None = None, stored_sizes: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.name = str(self.root)
        if self.root.is_dir():
            names, items = list_image_tree(self.root)
            paths = [str(p) for p, _ in items]
            self._labels = np.fromiter((label for _, label in items), dtype=np.int64, count=len(items))
            found = len(names)
        elif self.root.is_file():
            paths, self._labels = read_list(self.root, num_classes)
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
        if image_size is None and stored_sizes:
            image_size = self.sampled_image_size()
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))  # type: ignore[index]

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

