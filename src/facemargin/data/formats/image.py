"""Encoded image bytes (JPEG, PNG, ...) -> uint8 RGB arrays, the declared size checked first.

JPEG goes through simplejpeg (libjpeg-turbo, accurate DCT and fancy upsampling, the same
defaults OpenCV/MXNet use, so pixels match insightface's pipeline); PNG and anything
simplejpeg refuses go through Pillow. Channel order is always RGB.

:func:`decode_face` reads the size an image *declares* in its header before decoding it and
refuses anything but the set's size: a forged 65 500 x 65 500 header costs microseconds, not
12 GiB (a decompression bomb), and a 64 x 64 record in a 112 x 112 set fails naming the record
instead of breaking the batch collation.

Turning the arrays into the network's input is :mod:`facemargin.data.loading.normalize`.
"""

from __future__ import annotations

import io

import numpy as np

__all__ = [
    "CorruptImageError",
    "ImageSizeError",
    "MAX_PIXELS",
    "declared_size",
    "decode_image",
    "decode_face",
    "decode_into",
]

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


#: Largest image decoded when the expected size is unknown (a 4096 x 4096 photo).
MAX_PIXELS = 4096 * 4096


class CorruptImageError(ValueError):
    """Raised when image bytes cannot be decoded. Callers re-raise it naming file and key."""


class ImageSizeError(CorruptImageError):
    """The image header declares another size than the set's (or an absurd one)."""


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
