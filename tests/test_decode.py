"""decode.py: RGB order, flip, exact normalisation, corrupt bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from facemargin.data.formats.image import CorruptImageError, decode_image
from facemargin.data.loading.normalize import CHANNEL_ORDER, MEAN, STD, normalize_uint8, to_tensor


def _red_left_blue_right(h: int = 32, w: int = 32) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2, 0] = 255  # red on the left
    img[:, w // 2 :, 2] = 255  # blue on the right
    return img


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_constants() -> None:
    assert CHANNEL_ORDER == "RGB" and MEAN == 0.5 and STD == 0.5


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_decode_is_rgb(fmt: str) -> None:
    src = _red_left_blue_right()
    data = simplejpeg.encode_jpeg(src, quality=95, colorspace="RGB") if fmt == "jpeg" else _png(src)
    img = decode_image(data)
    assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
    left, right = img[:, 2:12].reshape(-1, 3).mean(0), img[:, 20:30].reshape(-1, 3).mean(0)
    assert left[0] > 200 and left[2] < 50  # red is channel 0
    assert right[2] > 200 and right[0] < 50  # blue is channel 2
    if fmt == "png":
        np.testing.assert_array_equal(img, src)


def test_decode_grayscale_jpeg_gives_three_channels() -> None:
    gray = np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 16, (16, 1, 1))
    img = decode_image(simplejpeg.encode_jpeg(gray, quality=100, colorspace="GRAY"))
    assert img.shape == (16, 16, 3)
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])


def test_to_tensor_flip_and_normalisation_exact() -> None:
    src = _red_left_blue_right(4, 4)
    t = to_tensor(src, flip=False)
    assert t.dtype == torch.float32 and t.shape == (3, 4, 4)
    assert torch.all(t[0, :, :2] == 1.0) and torch.all(t[0, :, 2:] == -1.0)
    tf = to_tensor(src, flip=True)
    assert torch.equal(tf, torch.flip(t, dims=[2]))
    assert torch.all(tf[2, :, :2] == 1.0) and torch.all(tf[0, :, :2] == -1.0)
    # every uint8 value: identical to (x/255 - 0.5)/0.5 in float32, exact endpoints
    x = torch.arange(256, dtype=torch.uint8)
    ref = (x.to(torch.float32) / 255 - 0.5) / 0.5
    out = normalize_uint8(x)
    assert torch.equal(out, ref)
    assert out[0] == -1.0 and out[255] == 1.0
    np.testing.assert_allclose(out.double().numpy(), np.arange(256) / 127.5 - 1.0, atol=1e-7)
    assert src.flags.writeable and src[0, 0, 0] == 255  # input untouched


def test_to_tensor_rejects_wrong_dtype() -> None:
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(np.zeros((4, 4, 3), np.float32), flip=False)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 50, b"\x89PNG\r\n\x1a\n" + b"\x01" * 30],
    ids=["empty", "garbage", "truncated-jpeg", "truncated-png"],
)
def test_corrupt_bytes_raise(data: bytes) -> None:
    with pytest.raises(CorruptImageError):
        decode_image(data)
    assert issubclass(CorruptImageError, ValueError)


def test_truncated_real_jpeg_raises() -> None:
    rng = np.random.default_rng(0)
    data = simplejpeg.encode_jpeg(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), quality=90)
    with pytest.raises(CorruptImageError):
        decode_image(data[: len(data) // 3])


# --------------------------------------------------------------------------- declared size before decoding
def _jpeg_claiming(h: int, w: int) -> bytes:
    """A real 16x16 JPEG whose SOF0 header is rewritten to claim ``w x h`` (a decompression bomb)."""
    data = bytearray(simplejpeg.encode_jpeg(np.zeros((16, 16, 3), np.uint8), quality=90, colorspace="RGB"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(data)


def _png_claiming(h: int, w: int) -> bytes:
    import struct
    import zlib

    data = bytearray(_png(np.zeros((4, 4, 3), np.uint8)))
    data[16:24] = struct.pack(">II", w, h)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("make", [_jpeg_claiming, _png_claiming], ids=["jpeg", "png"])
def test_bombs_are_refused_from_the_header(make) -> None:
    import time

    from facemargin.data.formats.image import ImageSizeError, decode_face, decode_into, declared_size

    bomb = make(65500, 65500)
    assert declared_size(bomb) == (65500, 65500)
    start = time.process_time()
    with pytest.raises(ImageSizeError, match=r"image is 65500x65500 \(width x height\), the set's images are 112x112"):
        decode_face(bomb, (112, 112))
    with pytest.raises(ImageSizeError, match="65500x65500"):
        decode_into(bomb, np.empty((112, 112, 3), np.uint8))
    with pytest.raises(ImageSizeError, match=r"declares 65500x65500 pixels, more than the 16777216 allowed"):
        decode_face(bomb, None)  # size unknown: a cap
    assert time.process_time() - start < 1.0  # nothing was decoded (not a timing claim: 12 GiB would take minutes)


def test_wrong_size_and_exact_size() -> None:
    from facemargin.data.formats.image import ImageSizeError, decode_face, decode_into

    src = _red_left_blue_right(64, 64)
    data = simplejpeg.encode_jpeg(src, quality=95, colorspace="RGB")
    with pytest.raises(ImageSizeError, match=r"image is 64x64 \(width x height\), the set's images are 112x112"):
        decode_face(data, (112, 112))
    out = np.zeros((64, 64, 3), np.uint8)
    decode_into(data, out)
    assert np.array_equal(out, decode_image(data)) and np.array_equal(decode_face(data, (64, 64)), out)
    png = _png(src)
    decode_into(png, out)  # not JPEG: the Pillow path, same checks
    assert np.array_equal(out, src)
    with pytest.raises(CorruptImageError):
        decode_into(data[: len(data) // 2], out)
