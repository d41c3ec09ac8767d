"""Image bytes -> uint8 RGB arrays -> normalised float tensors.

JPEG goes through simplejpeg (libjpeg-turbo, accurate DCT and fancy upsampling, the same
defaults OpenCV/MXNet use, so pixels match insightface's pipeline); PNG and anything
simplejpeg refuses go through Pillow. Channel order is always RGB.

:func:`decode_face` reads the size an image *declares* in its header before decoding it and
refuses anything but the set's size: a forged 65 500 x 65 500 header costs microseconds, not
12 GiB (a decompression bomb), and a 64 x 64 record in a 112 x 112 set fails naming the record
instead of breaking the batch collation.

The tensor conversion keeps the image uint8 until the very last step (flip and the HWC->CHW
permute are done on uint8; one fused conversion to float32 at the end).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHANNEL_ORDER",
    "MEAN",
    "STD",
    "CorruptImageError",
    "ImageSizeError",
    "MAX_PIXELS",
    "declared_size",
    "decode_image",
    "decode_face",
    "decode_into",
    "to_tensor",
    "to_uint8_chw",
    "normalize_uint8",
    "normalization_metadata",
]

#: Channel order of every decoded image and every tensor this package feeds a model.
CHANNEL_ORDER = "RGB"
#: Normalisation ``(x / 255 - MEAN) / STD`` (same scalar for all channels).
MEAN = 0.5
STD = 0.5

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


#: Largest image decoded when the expected size is unknown (a 4096 x 4096 photo).
MAX_PIXELS = 4096 * 4096


class CorruptImageError(UserError, ValueError):
    """Raised when image bytes cannot be decoded. Callers re-raise it naming file and key."""


class ImageSizeError(CorruptImageError):
    """The image header declares another size than the set's (or an absurd one)."""


def normalization_metadata() -> dict[str, object]:
    """What a checkpoint / exported model must record to reproduce the input pipeline."""
    return {"channel_order": CHANNEL_ORDER, "mean": [MEAN] * 3, "std": [STD] * 3, "scale": 255.0}


def _as_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise CorruptImageError(f"decoded image has unexpected shape {arr.shape}")
    c = arr.shape[2]
    if c == 3:
        return arr
    if c == 1:
        return np.repeat(arr, 3, axis=2)
    if c == 4:
        return np.ascontiguousarray(arr[:, :, :3])
    raise CorruptImageError(f"decoded image has {c} channels")


def _decode_pil(data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"cannot decode image ({len(data)} bytes): {e}") from e
    return _as_rgb(arr)


def declared_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` from the image header only (JPEG: libjpeg-turbo; others: Pillow, lazily)."""
    if len(data) == 0:
        raise CorruptImageError("empty image payload (0 bytes)")
    if data.startswith(_JPEG_MAGIC):
        import simplejpeg

        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            return int(h), int(w)
        except (ValueError, RuntimeError):
            pass  # let Pillow try (it reads more JPEG variants)
    if data.startswith(_PNG_MAGIC) and len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return h, w
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return int(im.height), int(im.width)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise CorruptImageError(f"cannot read the image header ({len(data)} bytes): {e}") from e
    except Image.DecompressionBombError as e:  # Pillow refuses huge sizes in open()
        raise ImageSizeError(f"image header declares an absurd size: {e}") from e


def decode_face(data: bytes, size: tuple[int, int] | None) -> np.ndarray:
    """Decode an image of exactly ``size = (height, width)`` to ``uint8 [H, W, 3]`` RGB.

    The header is checked first: :class:`ImageSizeError` if it declares another size (or more
    than :data:`MAX_PIXELS` when ``size`` is ``None``), :class:`CorruptImageError` if the bytes
    are not a decodable image. Nothing large is allocated before the check.
    """
    h, w = declared_size(data)
    if size is not None and (h, w) != tuple(size):
        raise ImageSizeError(f"image is {w}x{h} (width x height), the set's images are {size[1]}x{size[0]}")
    if size is None and h * w > MAX_PIXELS:
        raise ImageSizeError(f"image header declares {w}x{h} pixels, more than the {MAX_PIXELS} allowed")
    img = decode_image(data)
    if img.shape[:2] != (h, w):
        raise CorruptImageError(f"image decodes to {img.shape[1]}x{img.shape[0]} but its header says {w}x{h}")
    return img


def decode_into(data: bytes, out: np.ndarray) -> None:
    """Decode an image of exactly ``out``'s size into ``out`` (``uint8 [H, W, 3]``, C-contiguous).

    The training fast path: JPEG is decoded by libjpeg-turbo straight into ``out`` after its
    header's size is checked; anything else goes through :func:`decode_face`.
    """
    h, w = out.shape[:2]
    if data[:3] == _JPEG_MAGIC:
        import simplejpeg

        try:
            hh, ww, _, _ = simplejpeg.decode_jpeg_header(data)
        except (ValueError, RuntimeError):
            hh = ww = None  # Pillow reads more JPEG variants
        if hh is not None:
            if (hh, ww) != (h, w):
                raise ImageSizeError(f"image is {ww}x{hh} (width x height), the set's images are {w}x{h}")
            try:
                simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
                return
            except (ValueError, RuntimeError):
                pass  # CMYK, truncated: Pillow decides
    out[...] = decode_face(data, (h, w))


def decode_image(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode JPEG/PNG (or any Pillow format) bytes to a ``uint8 [H, W, 3]`` RGB array.

    Raises :class:`CorruptImageError` if the bytes are empty, truncated or not an image. Does not
    check the size: training data goes through :func:`decode_face`.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) == 0:
        raise CorruptImageError("empty image payload (0 bytes)")
    if data.startswith(_JPEG_MAGIC):
        import simplejpeg

        try:
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
        except (ValueError, RuntimeError) as e:  # truncated / CMYK / exotic: let Pillow try
            try:
                return _decode_pil(data)
            except CorruptImageError:
                raise CorruptImageError(f"cannot decode JPEG ({len(data)} bytes): {e}") from e
        return _as_rgb(arr)
    if data.startswith(_PNG_MAGIC):
        return _decode_pil(data)
    # unknown signature: Pillow knows more formats (BMP, WebP, ...) and fails cleanly otherwise
    return _decode_pil(data)


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` tensor (any shape) -> float32 ``(x / 255 - MEAN) / STD``."""
    import torch

    # (x/255 - 0.5)/0.5 == x/127.5 - 1; 127.5 is exact in float32, so 0 -> -1 and 255 -> 1 exactly
    return images.to(torch.float32).div_(255.0 * STD).sub_(MEAN / STD)


def to_uint8_chw(img: np.ndarray, flip: bool = False) -> torch.Tensor:
    """``uint8 [H, W, 3]`` RGB -> ``uint8 [3, H, W]`` tensor (mirrored when ``flip``); not normalised.

    Shipping uint8 batches and calling :func:`normalize_uint8` on the device moves 4x fewer bytes
    through DataLoader workers and the host-to-device copy.
    """
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] image, got {img.dtype} {img.shape}")
    import torch

    if flip:
        img = img[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def to_tensor(img: np.ndarray, flip: bool = False) -> torch.Tensor:
    """``uint8 [H, W, 3]`` RGB -> normalised ``float32 [3, H, W]``; ``flip`` mirrors horizontally.

    Flip and the layout change are done on uint8; the float conversion is the last step.
    """
    return normalize_uint8(to_uint8_chw(img, flip))
