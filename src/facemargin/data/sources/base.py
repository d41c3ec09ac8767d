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
``where`` (how errors name a sample) and ``labels``.

A sample that cannot be read (a file deleted after the set was opened, a damaged record) is the
loader's to handle like a damaged image (``data.on_corrupt``): :meth:`FaceSource.read_raws_or_errors`
hands it over as its error. A storage failure (a remote file that changed or stays unreachable:
:class:`~facemargin.data.storage.remote.RemoteReadError`) is never a damaged sample; it stops.

A source whose stored images are not yet the
set's images (raw photos to crop, resize or align: :class:`~facemargin.data.sources.framed.FramedSource`)
overrides ``decode_into``, which the DataLoader workers call.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import numpy as np

from ...errors import UserError
from ..formats.image import CorruptImageError, common_size, declared_size, decode_into
from ..storage.remote import RemoteReadError

__all__ = ["FaceSource", "SourceError", "UnreadableSampleError", "SIZE_SAMPLES"]

log = logging.getLogger(__name__)

#: Images whose headers decide a set's image size when nothing else gives it (:meth:`FaceSource.sampled_image_size`).
SIZE_SAMPLES = 64


class SourceError(UserError, ValueError):
    """A training source that cannot be used as given; the message names the file and line or key."""


class UnreadableSampleError(UserError, OSError):
    """A sample whose stored bytes cannot be read (e.g. its file was deleted); the message names it."""


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

    def read_raws_or_errors(self, indices: np.ndarray) -> list[bytes | Exception]:
        """:meth:`read_raws`, and where that fails, each sample alone: one that cannot be read comes back
        as an :class:`UnreadableSampleError` naming it (the loader raises or skips it). A
        :class:`~facemargin.data.storage.remote.RemoteReadError` (storage down, file changed) propagates."""
        try:
            return list(self.read_raws(indices))
        except RemoteReadError:
            raise
        except (OSError, ValueError):
            pass
        out: list[bytes | Exception] = []
        for i in np.asarray(indices, dtype=np.int64).tolist():
            try:
                out.append(self.read_raw(i))
            except RemoteReadError:
                raise
            except (OSError, ValueError) as exc:
                out.append(UnreadableSampleError(f"{self.where(i)}: cannot be read: {exc}"))
        return out

    def sampled_image_size(self, n: int = SIZE_SAMPLES) -> tuple[int, int] | None:
        """The set's image size from the headers of up to ``n`` images spread over it (``None`` when empty).

        The most common declared size, held by most of them and within
        :data:`~facemargin.data.formats.image.MAX_PIXELS` (:func:`~facemargin.data.formats.image.common_size`);
        sampled images of another size are logged here and fail (or are skipped) when read.
        """
        count = len(self)
        if count == 0:
            return None
        picks = np.unique(np.linspace(0, count - 1, min(n, count)).round().astype(np.int64))
        sizes: list[tuple[str, tuple[int, int] | str]] = []
        for i, raw in zip(picks.tolist(), self.read_raws_or_errors(picks)):
            name = self.where(i)
            try:
                if isinstance(raw, Exception):
                    raise raw
                sizes.append((name, declared_size(self.parse(i, raw)[1])))
            except RemoteReadError:
                raise
            except (OSError, ValueError) as exc:
                sizes.append((name, str(exc).replace(f"{name}: ", "", 1)))
        size, outliers = common_size(sizes, f"{self.name}: the image size")
        if outliers:
            log.warning("%s: images are %dx%d (the most common size of %d sampled); %d sampled differ: %s",
                        self.name, size[1], size[0], len(sizes), len(outliers), "; ".join(outliers[:5]))
        return size
