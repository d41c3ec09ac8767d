"""Raw photos as a training source: each one cropped and resized, or aligned, in the DataLoader workers.

:class:`FramedSource` wraps a source of stored photos (a :class:`~facemargin.data.sources.folder.FolderSource`)
and makes every sample the image :class:`~facemargin.data.formats.photo.Framing` gives -- the
pixels ``python -m facemargin.data.pack`` would write with the same ``--crop/--resize/--align``,
without the JPEG re-encoding. It may keep only some photos (``keep``: those with a face, or with
landmarks in a list), each with its 5 landmarks when aligning. The landmarks are computed before
(:mod:`facemargin.data.sources.faces`) and travel to the workers with the source: a worker decodes
and warps, it never detects.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..formats.photo import Framing, photo_size
from ..formats.image import ImageSizeError
from .base import FaceSource, SourceError

__all__ = ["FramedSource"]


class FramedSource(FaceSource):
    """Samples of ``base`` (only ``keep``, in order) made into ``framing``'s images.

    Args:
        base: the stored photos (their bytes, labels and names).
        framing: crop + resize, or alignment.
        keep: indices of ``base`` to use (default: all).
        landmarks: ``[len(keep), 5, 2]`` pixels, one face per kept photo (required to align).
        image_size: ``(height, width)`` of every training image; default: what the framing makes of
            the first kept photo (a resize or an alignment fixes it; a crop alone follows the photos).
    """

    prepares_images = True

    def __init__(self, base: FaceSource, framing: Framing, keep: Sequence[int] | np.ndarray | None = None,
                 landmarks: np.ndarray | None = None, image_size: Sequence[int] | None = None) -> None:
        self.base = base
        self.framing = framing
        self._keep = np.arange(len(base), dtype=np.int64) if keep is None else np.asarray(keep, dtype=np.int64).reshape(-1)
        if self._keep.size == 0:
            raise SourceError(f"{base.name}: no photo left to train on")
        if self._keep.min() < 0 or self._keep.max() >= len(base):
            raise ValueError(f"keep: indices outside [0, {len(base)})")
        if framing.align:
            marks = np.asarray(landmarks, dtype=np.float64) if landmarks is not None else None
            if marks is None or marks.shape != (self._keep.size, 5, 2):
                raise ValueError(f"aligning {base.name} needs 5 landmarks per kept photo "
                                 f"([{self._keep.size}, 5, 2]), got {None if marks is None else marks.shape}")
            self._landmarks: np.ndarray | None = marks
        else:
            self._landmarks = None
        self.name = base.name
        self.num_classes = base.num_classes
        if image_size is None:
            first = int(self._keep[0])
            image_size = framing.output_size(*photo_size(base.read_raw(first), base.where(first)))
        self.image_size = (int(image_size[0]), int(image_size[1]))

    def __len__(self) -> int:
        return int(self._keep.size)

    def index(self, i: int) -> int:
        """The ``base`` sample behind sample ``i``."""
        return int(self._keep[i])

    def read_raw(self, i: int) -> bytes:
        return self.base.read_raw(self.index(i))

    def read_raws(self, indices: np.ndarray) -> list[bytes]:
        return self.base.read_raws(self._keep[np.asarray(indices, dtype=np.int64)])

    def parse(self, i: int, raw: bytes) -> tuple[int, bytes]:
        return self.base.parse(self.index(i), raw)

    def where(self, i: int) -> str:
        return self.base.where(self.index(i))

    def labels(self) -> np.ndarray:
        return self.base.labels()[self._keep]

    def landmarks(self, i: int) -> np.ndarray | None:
        """The 5 points sample ``i`` is aligned from (``None`` without alignment)."""
        return None if self._landmarks is None else self._landmarks[i]

    def decode_into(self, i: int, image: bytes, out: np.ndarray) -> None:
        """Decode the photo, crop and resize it or align it, into ``out``."""
        rgb = self.framing.apply(image, self.where(i), self.landmarks(i))
        if rgb.shape[:2] != out.shape[:2]:
            h, w = rgb.shape[:2]
            raise ImageSizeError(f"{self.where(i)} becomes {w}x{h} (width x height) but the set's images are "
                                 f"{out.shape[1]}x{out.shape[0]}: give data.resize=N to make every photo N x N")
        out[...] = rgb

    def __repr__(self) -> str:
        what = "aligned" if self.framing.align else f"crop={self.framing.crop}, resize={self.framing.resize}"
        return f"FramedSource({self.name!r}, images={len(self)} of {len(self.base)}, {what})"
