"""Image files as a training source: one sub-folder per identity, or a list file of ``path label`` lines."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ..formats.image import declared_size
from ..storage.source import open_source
from .base import FaceSource, SourceError

__all__ = ["FolderSource", "list_image_tree", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def list_image_tree(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """``(identity names, [(image path, label), ...])`` for an identity-per-folder tree (paths as str: cheap for millions)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image root is not a directory: {root}")
    names: list[str] = []
    items: list[tuple[str, int]] = []
    with os.scandir(root) as it:
        folders = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    for name in folders:
        folder = os.path.join(root, name)
        with os.scandir(folder) as it:
            files = sorted(e.name for e in it if e.is_file() and not e.name.startswith(".")
                           and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
        if not files:
            print(f"warning: skipping {folder}: no images", file=sys.stderr)
            continue
        label = len(names)
        names.append(name)
        items.extend((os.path.join(folder, f), label) for f in files)
    if not items:
        raise ValueError(f"no images found under {root} (expected {root}/<identity>/<image>)")
    return names, items


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
