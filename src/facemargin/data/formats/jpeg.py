"""JPEG files checked without decoding them: the marker structure walked to the end-of-image marker.

A JPEG is a sequence of marker segments (``FF xx`` and, for most, a 2-byte length); each start of
scan (``SOS``) is followed by entropy-coded data, where ``FF`` is always followed by ``00``
(a stuffed byte) or a restart marker ``D0``-``D7``, until the next segment; the file ends with
``EOI`` (``FF D9``). :func:`walk_jpeg` walks that structure in a few microseconds (the scan data is
searched at C speed): a file cut short anywhere -- in a segment, in the scan data, or just before
its ``EOI`` -- has no ``EOI`` where the walk expects it and is refused, as are bytes that are no
marker where one must be and a file without a frame header or scan. It does not decode the scan
data, so damage *inside* it (flipped bits) is found only by decoding (:func:`decode_check`, which
runs libjpeg-turbo's whole entropy decoder in strict mode at 1/8 scale).
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

from .image import CorruptImageError

__all__ = ["JpegWalk", "decode_check", "walk_jpeg"]

# the FF that starts a marker inside entropy-coded data: not a stuffed 00, a restart D0-D7 or a fill FF
_NEXT_MARKER = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_STANDALONE = frozenset((0x01, *range(0xD0, 0xD8)))  # TEM and restart markers: no length
_SEGMENT = struct.Struct(">BBH")  # FF, marker, length
_SIZE = struct.Struct(">HH")  # a frame header's height and width


class JpegWalk(NamedTuple):
    """What :func:`walk_jpeg` found: ``end`` (offset just past ``EOI``), the frame's marker, sample
    precision and size (``height`` 0: given later by a DNL marker)."""

    end: int
    frame: int
    precision: int
    height: int
    width: int



def walk_jpeg(data: bytes | memoryview) -> JpegWalk:
    """Walk the JPEG ``data``'s markers to its ``EOI``; ``end`` is ``len(data)`` unless bytes follow it.

    Raises :class:`CorruptImageError` naming what is wrong and where: no ``SOI``, a cut-short
    segment or scan (a truncated file), something that is not a marker where one must be, no frame
    header or scan before ``EOI``.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise CorruptImageError(f"not a JPEG ({n} bytes): no start-of-image marker")
    pos, frame, precision, height, width, scans = 2, 0, 0, 0, 0, 0
    # the common layout, quickly: segments back to back, each scan followed by the next marker;
    # anything else (and the end) goes to the careful walk below, from where this one stopped
    while pos + 4 <= n:
        ff, code, length = _SEGMENT.unpack_from(data, pos)
        end = pos + 2 + length
        if ff != 0xFF or code < 0xC0 or 0xD0 <= code <= 0xD9 or code == 0xFF or length < 2 or end > n:
            break
        if code in _SOF:
            if frame or length < 8:
                break
            frame, precision = code, data[pos + 4]
            height, width = _SIZE.unpack_from(data, pos + 5)
        elif code == 0xDA:
            if not frame:
                break
            scans += 1
            found = _NEXT_MARKER.search(data, end)
            if found is None:
                break
            end = found.start()
        pos = end
    return _walk(data, pos, frame, precision, height, width, scans)


def _walk(data: bytes | memoryview, pos: int, frame: int, precision: int, height: int, width: int,
          scans: int) -> JpegWalk:
    """The careful walk from ``pos`` (a marker's ``FF``, fill bytes allowed), with what was found so far."""
    n = len(data)
    while True:
        if pos >= n:
            raise CorruptImageError(f"truncated JPEG ({n} bytes): it ends before its end-of-image marker")
        if data[pos] != 0xFF:
            raise CorruptImageError(f"damaged JPEG ({n} bytes): byte 0x{data[pos]:02x} at offset {pos} where a marker must be")
        while pos < n and data[pos] == 0xFF:  # fill bytes may precede a marker
            pos += 1
        if pos >= n:
            raise CorruptImageError(f"truncated JPEG ({n} bytes): it ends before its end-of-image marker")
        code = data[pos]
        pos += 1
        if code == 0xD9:
            if not scans:
                raise CorruptImageError(f"damaged JPEG ({n} bytes): end-of-image marker before any image data")
            return JpegWalk(pos, frame, precision, height, width)
        if code in _STANDALONE:
            continue
        if code in (0x00, 0xD8):
            raise CorruptImageError(f"damaged JPEG ({n} bytes): marker 0xff{code:02x} at offset {pos - 2}")
        if pos + 2 > n:
            raise CorruptImageError(f"truncated JPEG ({n} bytes): it ends inside the marker at offset {pos - 2}")
        end = pos + ((data[pos] << 8) | data[pos + 1])
        if end < pos + 2 or end > n:
            raise CorruptImageError(f"truncated JPEG ({n} bytes): the segment at offset {pos - 2} needs "
                                    f"{end - pos} bytes, {n - pos} are left")
        if code in _SOF and not frame:
            if end - pos < 8:
                raise CorruptImageError(f"damaged JPEG ({n} bytes): a frame header of {end - pos} bytes at offset {pos - 2}")
            frame, precision = code, data[pos + 2]
            height, width = _SIZE.unpack_from(data, pos + 3)
        if code != 0xDA:
            pos = end
            continue
        if not frame:
            raise CorruptImageError(f"damaged JPEG ({n} bytes): a scan at offset {pos - 2} before any frame header")
        scans += 1
        marker = _NEXT_MARKER.search(data, end)
        if marker is None:
            raise CorruptImageError(f"truncated JPEG ({n} bytes): its scan data (from offset {end}) ends "
                                    "without an end-of-image marker")
        pos = marker.start()


def decode_check(data: bytes) -> None:
    """Decode ``data`` strictly at 1/8 scale (every entropy-coded bit, little else): damage raises :class:`CorruptImageError`."""
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=1, min_width=1, strict=True)
    except (ValueError, RuntimeError) as e:
        raise CorruptImageError(f"cannot decode JPEG ({len(data)} bytes), damaged: libjpeg-turbo (strict) says {e}") from None
