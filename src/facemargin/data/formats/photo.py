"""From a stored photo to a training image: a centred crop and a resize, or a 5-point alignment.

The one implementation behind ``python -m facemargin.data.pack --crop/--resize/--align`` (which
encodes the result as JPEG into a RecordIO set) and ``data=folder data.crop/resize/landmarks/detect``
(which does it in the DataLoader workers, every epoch, from the photo itself): the same options
give the same pixels. A crop is taken in whole pixels; a crop and resize is
:func:`~facemargin.data.formats.resize.decode_region` (a JPEG shrunk 2x or more decoded at 1/2,
1/4 or 1/8 scale in the DCT domain, as far as ``resize_quality`` allows, then an antialiased
bicubic resize: Pillow's filter, by torch's uint8 kernel); an alignment decodes the photo in full
(:func:`decode_photo`) and warps it with :func:`facemargin.align.align_face` onto the ``size`` x
``size`` ArcFace template.

Crops (:func:`parse_crop`): ``square`` (the largest centred square), a fraction ``F`` in (0, 1]
(the centred square of ``F`` x the shorter side: ``0.5`` with a resize to 112 frames the face of an
LFW-style 250x250 photo) or ``WxH`` pixels. A resize alone crops a non-square photo to its centred
square first, so faces are never squashed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .image import CorruptImageError, declared_size, decode_image
from .resize import RESIZE_QUALITY, decode_region

__all__ = ["CropSpec", "Framing", "MAX_PHOTO_PIXELS", "RESIZE_QUALITY", "crop_box", "decode_photo", "parse_crop",
           "photo_size"]

#: The largest photo decoded for framing or alignment (100 megapixels; a 48 MP phone photo fits).
MAX_PHOTO_PIXELS = 100_000_000

#: The aligned crop's side when no resize is given (insightface's sets).
ALIGNED_SIZE = 112


class CropSpec(NamedTuple):
    """``kind`` is ``"square"`` (``value`` 1.0), ``"fraction"`` (``value`` F) or ``"box"`` (``box`` = (w, h))."""

    kind: str
    value: float = 1.0
    box: tuple[int, int] = (0, 0)


def parse_crop(spec: str | CropSpec | None, option: str = "--crop") -> CropSpec | None:
    """``square`` | ``F`` in (0, 1] | ``WxH`` -> :class:`CropSpec`; ``None`` -> ``None``.

    ``option`` names the setting in the error (``--crop`` for ``pack``, ``data.crop`` for training).
    """
    if spec is None or isinstance(spec, CropSpec):
        return spec
    text = str(spec).strip().lower()
    if text == "square":
        return CropSpec("square")
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if m and int(m.group(1)) > 0 and int(m.group(2)) > 0:
        return CropSpec("box", box=(int(m.group(1)), int(m.group(2))))
    try:
        f = float(text)
    except ValueError:
        f = -1.0
    if 0.0 < f <= 1.0:
        return CropSpec("fraction", f)
    raise ValueError(f"{option} must be 'square', a fraction in (0, 1] or WxH pixels, got {spec!r}")


def crop_box(height: int, width: int, crop: CropSpec | None) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of the centred crop (the whole image when ``crop`` is None)."""
    if crop is None:
        return 0, 0, height, width
    if crop.kind == "box":
        w, h = crop.box
        if w > width or h > height:
            raise ValueError(f"crop {w}x{h} is larger than the {width}x{height} image")
    else:
        h = w = max(1, int(round(min(height, width) * crop.value)))
    return (height - h) // 2, (width - w) // 2, h, w


def photo_size(data: bytes, name: object = "image") -> tuple[int, int]:
    """``(height, width)`` a photo's header declares (nothing decoded); errors name it."""
    try:
        return declared_size(data)
    except CorruptImageError as exc:
        raise ValueError(f"cannot read image {name}: {exc}") from None


def _check_pixels(height: int, width: int, name: object) -> None:
    if height * width > MAX_PHOTO_PIXELS:
        raise ValueError(f"image {name} is {width}x{height}, more than the {MAX_PHOTO_PIXELS} pixels a photo may have")


def decode_photo(data: bytes, name: object = "image") -> np.ndarray:
    """A photo of any size up to :data:`MAX_PHOTO_PIXELS` as uint8 ``[H, W, 3]`` RGB; errors name it."""
    _check_pixels(*photo_size(data, name), name)
    try:
        return decode_image(data)
    except CorruptImageError as exc:
        raise CorruptImageError(f"cannot decode image {name}: {exc}") from None


@dataclass(frozen=True)
class Framing:
    """How a photo becomes a training image: ``crop`` then ``resize`` (``N`` x ``N``), or, with
    ``align``, a warp of its 5 landmarks onto the ``resize`` (default 112) ArcFace template.
    ``resize_quality`` (:data:`~facemargin.data.formats.resize.RESIZE_QUALITY`: ``fast``, ``high``,
    ``full``) says how far a JPEG being shrunk is decoded at reduced scale."""

    crop: CropSpec | None = None
    resize: int | None = None
    align: bool = False
    resize_quality: str = "fast"

    @classmethod
    def of(cls, crop: str | CropSpec | None = None, resize: int | None = None, align: bool = False,
           prefix: str = "--", align_option: str | None = None, resize_quality: str = "fast") -> "Framing":
        """Checked options; ``prefix`` names them in errors (``--`` for ``pack``, ``data.`` for training),
        ``align_option`` the option that asked for alignment (default ``<prefix>align``)."""
        spec = parse_crop(crop, f"{prefix}crop")
        if resize is not None and (isinstance(resize, bool) or int(resize) != resize or int(resize) < 1):
            raise ValueError(f"{prefix}resize must be a positive size, got {resize!r}")
        if resize_quality not in RESIZE_QUALITY:
            option = f"{prefix}resize{'-' if prefix == '--' else '_'}quality"
            raise ValueError(f"{option} must be one of {', '.join(RESIZE_QUALITY)}, got {resize_quality!r}")
        if align and spec is not None:
            raise ValueError(f"{align_option or prefix + 'align'} and {prefix}crop exclude each other: "
                             "alignment decides the crop")
        framing = cls(spec, None if resize is None else int(resize), bool(align), resize_quality)
        if align:
            from ...align import arcface_template

            try:
                arcface_template(framing.aligned_size)
            except ValueError as exc:
                raise ValueError(f"{prefix}resize with alignment: {exc}") from None
        return framing

    @property
    def aligned_size(self) -> int:
        """The side of an aligned crop."""
        return self.resize or ALIGNED_SIZE

    @property
    def changes_pixels(self) -> bool:
        """Whether any photo can come out other than as stored."""
        return self.align or self.crop is not None or self.resize is not None

    def plan(self, height: int, width: int) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
        """``((top, left, h, w) of the crop, (height, width) out)`` for a ``height`` x ``width`` photo."""
        if self.align:
            return (0, 0, height, width), (self.aligned_size, self.aligned_size)
        crop = self.crop
        if crop is None and self.resize is not None and height != width:
            crop = CropSpec("square")  # never squash a face
        box = crop_box(height, width, crop)
        return box, ((self.resize, self.resize) if self.resize is not None else (box[2], box[3]))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` of the image a ``height`` x ``width`` photo becomes."""
        return self.plan(height, width)[1]

    def keeps(self, height: int, width: int) -> bool:
        """True when a ``height`` x ``width`` photo comes out as it is (no crop, no resize, no warp)."""
        box, out = self.plan(height, width)
        return not self.align and box == (0, 0, height, width) and out == (height, width)

    def apply(self, data: bytes, name: object = "image", landmarks: np.ndarray | None = None,
              size: tuple[int, int] | None = None) -> np.ndarray:
        """The training image (uint8 ``[h, w, 3]`` RGB, C-contiguous) made from the encoded photo ``data``.

        ``landmarks`` (``[5, 2]`` pixels) are required with ``align``; ``size``: the photo's
        ``(height, width)`` where the caller has read its header already. Errors name ``name``: an
        unreadable photo, one over :data:`MAX_PHOTO_PIXELS`, a crop larger than the photo,
        landmarks that define no transform.
        """
        h, w = size if size is not None else photo_size(data, name)
        try:
            box, out = self.plan(h, w)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        if self.align:
            if landmarks is None:
                raise ValueError(f"{name}: alignment needs the photo's 5 landmarks")
            from ...align import align_face

            rgb = decode_photo(data, name)
            try:
                return align_face(rgb, landmarks, self.aligned_size)
            except ValueError as exc:
                raise ValueError(f"cannot align {name}: {exc}") from None
        _check_pixels(h, w, name)
        try:
            return decode_region(data, (h, w), box, out, self.resize_quality)
        except CorruptImageError as exc:
            raise CorruptImageError(f"cannot decode image {name}: {exc}") from None
