"""Training sources: a set seen as samples ``0 .. N-1`` in storage order.

A source only says how to read sample ``i``; sharding, shuffling, the resume plan, corrupt-record
handling, decoding and normalisation are shared (:mod:`facemargin.data.loading.plan`,
:mod:`facemargin.data.loading.loader`). Two sources ship:

* :class:`~facemargin.data.sources.recordio.FaceRecordSet` -- an insightface / im2rec RecordIO set
  (``data=recordio``);
* :class:`~facemargin.data.sources.folder.FolderSource` -- JPEG/PNG files, one sub-folder per identity or a list file of
  ``path label`` lines (``data=folder``).

A third source is one small subclass of :class:`FaceSource`: ``__len__``, ``read_raw`` (the stored
bytes of a sample, in one read), ``parse`` (raw bytes -> validated ``(label, encoded image)``),
``where`` (how errors name a sample) and ``labels``. A source whose stored images are not yet the
set's images (raw photos to crop, resize or align: :class:`~facemargin.data.sources.framed.FramedSource`)
overrides ``decode_into``, which the DataLoader workers call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..formats.image import CorruptImageError, decode_into

__all__ = ["FaceSource", "SourceError"]


class SourceError(ValueError):
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

    def decode_into(self, i: int, image: bytes, out: np.ndarray) -> None:
        """Decode sample ``i``'s encoded image (from :meth:`parse`) into ``out`` (uint8 ``[H, W, 3]``,
        the set's :attr:`image_size`); errors name :meth:`where`. Runs in the DataLoader workers."""
        try:
            decode_into(image, out)
        except CorruptImageError as exc:
            raise type(exc)(f"{self.where(i)}: corrupt image: {exc}") from None

    #: True when :meth:`decode_into` does more than decode (the stored bytes are not the training image)
    prepares_images: bool = False

    @abstractmethod
    def where(self, i: int) -> str:
        """How messages name sample ``i`` (e.g. ``"train.rec at offset 1024 (key 5)"``)."""

    @abstractmethod
    def labels(self) -> np.ndarray:
        """Identity of every sample (int64 ``[N]``)."""
