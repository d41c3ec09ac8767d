"""An image decoded at the size it is wanted: DCT-scaled JPEG decoding, a centred crop, an antialiased resize.

:func:`decode_region` turns image bytes into the ``uint8 [h, w, 3]`` RGB pixels of one region
(``(top, left, height, width)`` in the photo's pixels) resized to ``(h, w)``:

* **JPEG shrunk by 2x or more**: libjpeg-turbo decodes at 1/2, 1/4 or 1/8 scale in the DCT domain
  (``min_height`` / ``min_width``, strict mode), so most of the shrinking costs nothing and the
  resize does the rest. ``quality`` says how far: ``"fast"`` (default) as far as the region stays
  at least the output size, ``"high"`` as far as it stays at least twice the output size,
  ``"full"`` never. The region is taken on the scaled grid, its edges rounded to the nearest
  decoded pixel (a shift of at most half an output pixel).
* **everything else**: decoded in full (:func:`~facemargin.data.formats.image.decode_image`:
  strict JPEG, Pillow for PNG and other formats), cropped by slicing.

Fidelity, as PSNR against a Lanczos resize of the fully decoded image to 112 px (real photos, JPEG
q92, before re-encoding): libjpeg's reduced inverse DCTs work block by block, so the loss depends
on what is left for the resize -- a region decoded to 1-1.25x the output scores ~37 dB, 2-2.5x
~42 dB, 4-5x ~43.5 dB, a full decode 44 dB. ``"fast"`` gives 37-42 dB, ``"high"`` >= 42 dB
wherever it scales (LFW's 250-px photos are then decoded in full). After the packer's q95 encode,
LFW-size photos to 112 score 36.7 dB with ``"fast"`` and 38.5 decoded in full (4:2:0 chroma;
37.9 / 40.8 with 4:4:4), and 36.0 with OpenCV's bilinear resize, which ``im2rec --resize`` runs
without antialiasing (``benchmarks/pack_throughput.py``).

The resize (:func:`resize_rgb`) is bicubic with antialiasing (the filter widened by the shrink
factor: Pillow's ``Image.BICUBIC``), by torch's uint8 kernel, which writes straight into the
interleaved array the JPEG encoder reads. torch is imported on first use.
"""

from __future__ import annotations

import numpy as np

from .image import CorruptImageError, decode_image

__all__ = ["RESIZE_QUALITY", "dct_denominator", "decode_region", "resize_rgb"]

#: how far a JPEG is DCT-scaled before the resize: the decoded region stays at least this many
#: times the output size (0: never scaled)
RESIZE_QUALITY = {"fast": 1, "high": 2, "full": 0}

_JPEG_MAGIC = b"\xff\xd8\xff"
_direct_out = True  # torch's _upsample_bicubic2d_aa.out writes channels-last; False once it refused


def dct_denominator(region_hw: tuple[int, int], out_hw: tuple[int, int], quality: str = "fast") -> int:
    """The largest ``d`` in 1, 2, 4, 8 with ``region / d >= k * out`` on both sides, ``k`` the
    :data:`RESIZE_QUALITY` of ``quality`` (1: decode in full)."""
    if quality not in RESIZE_QUALITY:
        raise ValueError(f"resize quality must be one of {', '.join(RESIZE_QUALITY)}, got {quality!r}")
    k = RESIZE_QUALITY[quality]
    d = 1
    while k and d < 8 and region_hw[0] >= 2 * d * k * out_hw[0] and region_hw[1] >= 2 * d * k * out_hw[1]:
        d *= 2
    return d


def resize_rgb(rgb: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """``uint8 [H, W, 3]`` (a view is fine) -> ``uint8 [h, w, 3]`` C-contiguous: antialiased bicubic."""
    global _direct_out
    import torch

    oh, ow = int(out_hw[0]), int(out_hw[1])
    if rgb.shape[:2] == (oh, ow):
        return np.ascontiguousarray(rgb)
    if not rgb.flags.writeable:  # Pillow's arrays are read-only; torch wants to be able to write
        rgb = rgb.copy()
    src = torch.from_numpy(rgb.transpose(2, 0, 1)[None])  # NCHW views of HWC pixels (numpy's: cheaper)
    out = np.empty((oh, ow, rgb.shape[2]), np.uint8)
    dst = torch.from_numpy(out.transpose(2, 0, 1)[None])
    if _direct_out:
        try:  # the uint8 kernel writes an interleaved (channels-last) output directly: no transposing copy
            torch._C._nn._upsample_bicubic2d_aa(src, (oh, ow), False, None, out=dst)
            return out
        except (AttributeError, TypeError, RuntimeError):
            _direct_out = False
    dst.copy_(torch.nn.functional.interpolate(src, size=(oh, ow), mode="bicubic", antialias=True, align_corners=False))
    return out


def _scaled_jpeg(data: bytes, full_hw: tuple[int, int], d: int) -> np.ndarray:
    import simplejpeg

    h, w = -(-full_hw[0] // d), -(-full_hw[1] // d)
    try:
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=h, min_width=w, strict=True)
    except (ValueError, RuntimeError) as e:
        raise CorruptImageError(f"cannot decode JPEG ({len(data)} bytes), damaged: libjpeg-turbo (strict) says {e}") from None
    if rgb.shape[:2] != (h, w):  # libjpeg chose another scale than 1/d: crop coordinates would not hold
        raise CorruptImageError(f"JPEG decoded at {rgb.shape[1]}x{rgb.shape[0]}, expected {w}x{h} (1/{d} scale)")
    return rgb


def decode_region(data: bytes, full_hw: tuple[int, int], box: tuple[int, int, int, int] | None,
                  out_hw: tuple[int, int], quality: str = "fast") -> np.ndarray:
    """Pixels of ``box = (top, left, height, width)`` (``None``: the whole image) resized to ``out_hw``.

    ``full_hw``: the image's size as its header declares it; ``quality``: how far a JPEG is
    DCT-scaled (:data:`RESIZE_QUALITY`). Raises
    :class:`~facemargin.data.formats.image.CorruptImageError` for bytes that do not decode cleanly
    or decode to another size than declared.
    """
    top, left, ch, cw = box if box is not None else (0, 0, full_hw[0], full_hw[1])
    d = dct_denominator((ch, cw), out_hw, quality) if data[:3] == _JPEG_MAGIC else 1
    if d > 1:
        rgb = _scaled_jpeg(data, full_hw, d)
        sh, sw = rgb.shape[:2]
        top, bottom = round(top / d), round((top + ch) / d)
        left, right = round(left / d), round((left + cw) / d)
        region = rgb[max(top, 0):min(bottom, sh), max(left, 0):min(right, sw)]
    else:
        rgb = decode_image(data)
        if rgb.shape[:2] != tuple(full_hw):
            raise CorruptImageError(f"image decodes to {rgb.shape[1]}x{rgb.shape[0]} but its header says "
                                    f"{full_hw[1]}x{full_hw[0]}")
        region = rgb[top:top + ch, left:left + cw]
    return resize_rgb(region, out_hw)
