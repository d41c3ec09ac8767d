"""Decode JPEG batches on the GPU: workers ship the encoded bytes, nvJPEG decodes them on the device.

With CPU decoding every DataLoader worker spends most of its time in libjpeg; on a machine with
few cores per GPU that caps the images/s. With ``data.decode=gpu`` the workers only read records:

1. :class:`EncodedBatchReader` (in the workers) checks each record and its image header, and
   :func:`collate_encoded` pads the batch's encoded images into one ``uint8 [B, L]`` tensor plus
   ``int64 [B]`` lengths (one buffer to pin and copy, not B), with the flip decisions;
2. in the training process (``on_before_batch_transfer``) :func:`decode_batch` hands the rows to
   :class:`JpegBatchDecoder`: ``torchvision.io.decode_jpeg(list, device="cuda")`` -- one batched
   nvJPEG call -- returns ``uint8 [B, 3, H, W]`` on the GPU, flipped there, ready for
   augmentation and normalisation. Samples, labels and flips equal the CPU pipeline's.

Without CUDA the decoder says so once and decodes on the CPU in the calling process with the
same decoder the workers use (:func:`facemargin.data.formats.image.decode_image`), so the pixels equal
the CPU pipeline's exactly; that is slower than decoding in workers, so the message says to use
``data.decode=cpu``. Payloads nvJPEG cannot take (PNG, CMYK JPEG) are decoded on the CPU and
moved to the device, per image. (torchvision 0.29 marks its image decoders as deprecated in
favour of TorchCodec; the one call to swap is :meth:`JpegBatchDecoder._decode_cuda`.)
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from ..formats.image import CorruptImageError, ImageSizeError, declared_size, decode_image
from .layout import flip_rows
from .loader import BatchReader, BatchRequest
from .slots import PackedLayout
from .normalize import to_uint8_chw
from .plan import hash_uniform

__all__ = ["collate_encoded", "split_encoded", "JpegBatchDecoder", "EncodedBatch", "EncodedBatchReader",
           "decode_batch", "NO_CUDA_MESSAGE"]

NO_CUDA_MESSAGE = (
    "data.decode=gpu: CUDA is not available, so JPEGs are decoded on the CPU in the training process "
    "(slower than decoding in DataLoader workers); use data.decode=cpu on this machine"
)
_JPEG_MAGIC = b"\xff\xd8\xff"


def collate_encoded(samples: Sequence[bytes | bytearray | memoryview | np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded images of different lengths -> ``(uint8 [B, max_len] zero-padded, int64 [B] lengths)``."""
    if len(samples) == 0:
        raise ValueError("collate_encoded: empty batch")
    arrays = [s.numpy() if isinstance(s, torch.Tensor) else np.frombuffer(s, dtype=np.uint8) for s in samples]
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    data = np.zeros((len(arrays), int(lengths.max())), dtype=np.uint8)
    for row, a in zip(data, arrays):
        row[: a.size] = a.reshape(-1)
    return torch.from_numpy(data), torch.from_numpy(lengths)


def split_encoded(data: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """The rows of a :func:`collate_encoded` batch as 1-D views of their true lengths (on the CPU)."""
    if data.dtype != torch.uint8 or data.ndim != 2 or lengths.shape != (data.shape[0],):
        raise ValueError(f"split_encoded: expected uint8 [B, L] and lengths [B], got {data.dtype} "
                         f"{tuple(data.shape)} and {tuple(lengths.shape)}")
    data, lengths = data.cpu(), lengths.cpu()
    if bool((lengths < 0).any()) or bool((lengths > data.shape[1]).any()):
        raise ValueError(f"split_encoded: lengths outside [0, {data.shape[1]}]: {lengths.tolist()}")
    return [data[i, :n] for i, n in enumerate(lengths.tolist())]


class JpegBatchDecoder:
    """``(data [B, L], lengths [B]) -> uint8 [B, 3, H, W]`` RGB on ``device`` (see the module docstring).

    ``device="cuda"`` decodes with nvJPEG when CUDA is available, else falls back to the CPU with
    :data:`NO_CUDA_MESSAGE` (a warning, once per decoder). Every image of a batch must have the
    same size; a corrupt or odd-sized image raises naming it: ``name(position)`` if given (e.g. its
    file and record), else its position in the batch.
    """

    def __init__(self, device: str | torch.device = "cuda") -> None:
        requested = torch.device(device)
        self.warned = False
        if requested.type == "cuda" and not torch.cuda.is_available():
            warnings.warn(NO_CUDA_MESSAGE, RuntimeWarning, stacklevel=2)
            self.warned = True
            requested = torch.device("cpu")
        self.device = requested

    def __repr__(self) -> str:
        return f"JpegBatchDecoder(device={str(self.device)!r})"

    def __call__(self, data: torch.Tensor, lengths: torch.Tensor,
                 name: Callable[[int], str] | None = None) -> torch.Tensor:
        encoded = split_encoded(data, lengths)
        name = name or (lambda position: f"image {position}")
        if self.device.type == "cuda":
            images = self._decode_cuda(encoded, name)
        else:
            images = [self._decode_cpu(e, name(i)) for i, e in enumerate(encoded)]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:
            first = tuple(images[0].shape)
            odd = next(i for i, im in enumerate(images) if tuple(im.shape) != first)
            raise ValueError(f"JPEG batch: {name(odd)} is {tuple(images[odd].shape)} but {name(0)} is {first}; "
                             "every image of a batch must have the same size")
        return torch.stack(images)

    @staticmethod
    def _decode_cpu(encoded: torch.Tensor, name: str) -> torch.Tensor:
        try:
            return to_uint8_chw(decode_image(encoded.numpy().tobytes()))
        except CorruptImageError as exc:
            raise CorruptImageError(f"JPEG batch: {name}: {exc}") from None

    def _decode_cuda(self, encoded: list[torch.Tensor], name: Callable[[int], str]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        jpeg = [i for i, e in enumerate(encoded) if bytes(e[:3].tolist()) == _JPEG_MAGIC]
        out: list[torch.Tensor | None] = [None] * len(encoded)
        if jpeg:
            try:
                decoded = decode_jpeg([encoded[i] for i in jpeg], mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one image nvJPEG refuses fails the call: decode those on the CPU
                decoded = [None] * len(jpeg)
                for k, i in enumerate(jpeg):
                    try:
                        decoded[k] = decode_jpeg(encoded[i], mode=ImageReadMode.RGB, device=self.device)
                    except RuntimeError:
                        pass
            for i, im in zip(jpeg, decoded):
                out[i] = im
        return [im if im is not None else self._decode_cpu(e, name(i)).to(self.device, non_blocking=True)
                for i, (e, im) in enumerate(zip(encoded, out))]


class EncodedBatch(NamedTuple):
    """A training batch's images still encoded: ``data`` uint8 [B, L], ``lengths`` int64 [B], ``flip`` bool [B]."""

    data: torch.Tensor
    lengths: torch.Tensor
    flip: torch.Tensor


class EncodedBatchReader(BatchReader):
    """:class:`~facemargin.data.loading.loader.BatchReader` that ships images encoded (``data.decode=gpu``).

    Records are read, parsed and their image headers checked (size, readability) in the workers,
    with the same corrupt-sample handling; only the pixel decoding moves to the device. An image
    whose header is sound but whose body is damaged is only found there: it raises naming its
    record even under ``on_corrupt="skip"`` (the substitute would have to come from the workers).
    """

    def packed_layout(self, batch: int) -> PackedLayout | None:
        """Encoded batches are not packed: their images' lengths differ."""
        return None

    def _decode(self, i: int, raw: bytes, out: np.ndarray | None) -> int:
        """Label of sample ``i``; its encoded image kept for the batch after a header check."""
        label, image = self.source.parse(i, raw)
        try:
            size = declared_size(image)
        except CorruptImageError as exc:
            raise type(exc)(f"{self.source.where(i)}: corrupt image: {exc}") from None
        if size != tuple(self.source.image_size):  # type: ignore[arg-type]
            h, w = self.source.image_size  # type: ignore[misc]
            raise ImageSizeError(f"{self.source.where(i)}: image is {size[1]}x{size[0]} (width x height), "
                                 f"the set's images are {w}x{h}")
        self._payload = image
        return label

    def __getitem__(self, request: BatchRequest) -> tuple[EncodedBatch, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        payloads: list[bytes] = []
        indices, labels = self._read_samples(request, None, lambda j, index: payloads.append(self._payload))
        data, lengths = collate_encoded(payloads)
        flip = torch.from_numpy(hash_uniform(self.seed, int(request.epoch), indices) < self.flip_p)
        return EncodedBatch(data, lengths, flip), torch.from_numpy(labels), torch.from_numpy(indices)


def decode_batch(batch: tuple, decoder: JpegBatchDecoder, where: Callable[[int], str] | None = None) -> tuple:
    """``(EncodedBatch, labels, index)`` -> ``(uint8 images [B, 3, H, W] on the decoder's device, labels, index)``.

    ``where(sample index)`` names a sample in errors (a source's ``where``: file and record).
    """
    encoded, labels, index = batch
    name = None if where is None else (lambda position: f"sample {int(index[position])} ({where(int(index[position]))})")
    images = decoder(encoded.data, encoded.lengths, name)
    return flip_rows(images, encoded.flip), labels, index
