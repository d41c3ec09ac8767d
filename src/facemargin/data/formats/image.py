"""Encoded image bytes (JPEG, PNG, ...) -> uint8 RGB arrays, the declared size checked first.

JPEG goes through simplejpeg (libjpeg-turbo, accurate DCT and fancy upsampling, the same
defaults OpenCV/MXNet use, so pixels match insightface's pipeline) in its strict mode: a JPEG
whose scan data libjpeg flags as damaged ("corrupt JPEG data", "premature end") raises
:class:`CorruptImageError`; it is never handed to a more tolerant decoder, so a damaged image is
an error (or a counted skip under ``data.on_corrupt=skip``), never wrong pixels. PNG and the
other formats go through Pillow with its truncated-image tolerance off, whatever
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` says. Channel order is always RGB.

:func:`decode_face` reads the size an image *declares* in its header before decoding it and
refuses anything but the set's size: a forged 65 500 x 65 500 header costs microseconds, not
12 GiB (a decompression bomb), and a 64 x 64 record in a 112 x 112 set fails naming the record
instead of breaking the batch collation. :func:`common_size` picks a set's size from several
headers (the most common one, within :data:`MAX_PIXELS`) when no ``property`` file says it.

Turning the arrays into the network's input is :mod:`facemargin.data.loading.normalize`.
"""

from __future__ import annotations

import io
import threading
from collections import Counter
from typing import Sequence

import numpy as np

from ...errors import UserError

__all__ = [
    "CorruptImageError",
    "ImageSizeError",
    "MAX_PIXELS",
    "declared_size",
    "decode_image",
    "decode_face",
    "decode_into",
    "common_size",
]

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PIL_LOCK = threading.Lock()


#: Largest image decoded when the expected size is unknown (a 4096 x 4096 photo); also the bound
#: on a set's image size taken from its headers (:func:`common_size`).
MAX_PIXELS = 4096 * 4096


class CorruptImageError(UserError, ValueError):
    """Raised when image bytes cannot be decoded, or decode only with errors. Callers re-raise it naming file and key."""


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


def _jpeg_header(data: bytes) -> tuple[int, int]:
    import simplejpeg

    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, RuntimeError) as e:
        raise CorruptImageError(f"cannot read the image header ({len(data)} bytes, JPEG; libjpeg-turbo: {e})") from None
    return int(h), int(w)


def _decode_jpeg(data: bytes, buffer: np.ndarray | None = None) -> np.ndarray:
    """libjpeg-turbo in strict mode: a warning about the data (a damaged scan) is an error."""
    import simplejpeg

    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, buffer=buffer)
    except (ValueError, RuntimeError) as e:
        raise CorruptImageError(f"cannot decode JPEG ({len(data)} bytes), damaged: libjpeg-turbo (strict) says {e}") from None


def _load_strict(im) -> None:  # noqa: ANN001 - a PIL image
    """``im.load()`` with Pillow's truncated-image tolerance off, whatever the global setting."""
    from PIL import ImageFile

    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        im.load()
        return
    with _PIL_LOCK:
        saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            im.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _decode_pil(data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format in ("JPEG", "MPO"):  # JPEG is libjpeg-turbo's, strictly (see the module docstring)
                raise CorruptImageError(f"cannot decode image ({len(data)} bytes): a JPEG without the JPEG signature")
            _load_strict(im)
            if im.mode != "RGB":
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        if isinstance(e, CorruptImageError):
            raise
        raise CorruptImageError(f"cannot decode image ({len(data)} bytes): {e}") from e
    return _as_rgb(arr)


def declared_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` from the image header only (JPEG: libjpeg-turbo; PNG: IHDR; others: Pillow, lazily)."""
    if len(data) == 0:
        raise CorruptImageError("empty image payload (0 bytes)")
    if data[:3] == _JPEG_MAGIC:
        return _jpeg_header(data)
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


def common_size(sizes: Sequence[tuple[str, tuple[int, int] | str]], what: str) -> tuple[tuple[int, int], list[str]]:
    """A set's image size from several of its images: ``((height, width), outliers)``.

    ``sizes`` holds ``(name, (height, width))`` per sampled image, or ``(name, reason)`` for a header
    that could not be read. The size is the most common one; it must be held by more than half of
    the sampled images and be at most :data:`MAX_PIXELS`, else :class:`ImageSizeError` names
    ``what`` and the sizes found. ``outliers`` describes the sampled images of other sizes or
    unreadable headers (they fail when read, naming themselves).
    """
    if not sizes:
        raise ImageSizeError(f"{what}: no images to take the image size from")
    counts = Counter(s for _, s in sizes if isinstance(s, tuple))
    outliers = [f"{name} ({s[1]}x{s[0]})" if isinstance(s, tuple) else f"{name} ({s})" for name, s in sizes
                if not counts or s != counts.most_common(1)[0][0]]
    if not counts or 2 * counts.most_common(1)[0][1] <= len(sizes):
        found = ", ".join(f"{w}x{h} ({n}x)" for (h, w), n in counts.most_common(5)) or "none readable"
        raise ImageSizeError(
            f"{what}: no image size is shared by most of the {len(sizes)} images sampled (found {found}; "
            f"e.g. {'; '.join(outliers[:3])}); give the size explicitly (image_size / a property file)"
        )
    (h, w), n = counts.most_common(1)[0]
    if h * w > MAX_PIXELS:
        raise ImageSizeError(
            f"{what}: {n} of the {len(sizes)} images sampled declare {w}x{h} pixels, more than the "
            f"{MAX_PIXELS} allowed without an explicit size (e.g. {sizes[0][0]}); give image_size / a property file"
        )
    return (h, w), outliers


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

    The training fast path: JPEG is decoded by libjpeg-turbo straight into ``out``, its header
    parsed once: libjpeg-turbo refuses a declared size larger than ``out`` before decoding (nothing
    allocated for it), a smaller one is refused after; either raises :class:`ImageSizeError`.
    Anything else goes through :func:`decode_face`.
    """
    h, w = out.shape[:2]
    if data[:3] == _JPEG_MAGIC:
        try:
            got = _decode_jpeg(data, buffer=out).shape[:2]
        except CorruptImageError:
            got = _jpeg_header(data)  # only on failure: a size that does not fit, or damage
            if got == (h, w):
                raise
        if got != (h, w):
            raise ImageSizeError(f"image is {got[1]}x{got[0]} (width x height), the set's images are {w}x{h}")
        return
    out[...] = decode_face(data, (h, w))


def decode_image(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode JPEG/PNG (or any Pillow format) bytes to a ``uint8 [H, W, 3]`` RGB array.

    Raises :class:`CorruptImageError` if the bytes are empty, truncated, damaged (a JPEG that
    libjpeg-turbo decodes only with warnings) or not an image. Does not check the size: training
    data goes through :func:`decode_face`.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) == 0:
        raise CorruptImageError("empty image payload (0 bytes)")
    if data[:3] == _JPEG_MAGIC:
        return _as_rgb(_decode_jpeg(data))
    # PNG, and anything else: Pillow knows more formats (BMP, WebP, ...) and fails cleanly otherwise
    return _decode_pil(data)
