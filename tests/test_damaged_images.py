"""Damaged images never decode silently; a set's image size comes from most of its headers, bounded."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image, ImageFile

from facemargin.data.formats.image import (
    MAX_PIXELS,
    CorruptImageError,
    ImageSizeError,
    declared_size,
    decode_face,
    decode_image,
    decode_into,
)
from facemargin.data.formats.recordio import IRHeader, RecordIOWriter, pack_record
from facemargin.data.loading.loader import BatchReader, BatchRequest
from facemargin.data.sources.folder import FolderSource
from facemargin.data.sources.recordio import FaceRecordSet
from facemargin.errors import UserError


def _photo(seed: int, size: int = 112) -> np.ndarray:
    """Smooth gradients plus noise: a JPEG with a long, busy scan (like a face crop)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([(2 * x) % 256, (2 * y) % 256, (x + y) % 256], -1) + rng.integers(0, 40, (size, size, 3))
    return img.astype(np.uint8)


def _scan(jpeg: bytes) -> tuple[int, int]:
    """``[start, end)`` of the entropy-coded scan: after the SOS segment, before EOI."""
    sos = jpeg.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2: sos + 4], "big"), len(jpeg) - 2


def bit_flipped_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEGs of 112 x 112, each with one bit flipped at a seeded place of its scan data."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        jpeg = simplejpeg.encode_jpeg(_photo(k % 10), quality=90)
        lo, hi = _scan(jpeg)
        data = bytearray(jpeg)
        data[int(rng.integers(lo, hi))] ^= 1 << int(rng.integers(0, 8))
        out.append(bytes(data))
    return out


def libjpeg_strict_refuses(data: bytes) -> bool:
    """The reference: libjpeg-turbo itself, asked to stop at any warning about the data."""
    try:
        simplejpeg.decode_jpeg(data, strict=True)
        return False
    except ValueError:
        return True


def forged_size(h: int, w: int) -> bytes:
    """A real 16 x 16 JPEG whose SOF header claims ``w`` x ``h`` pixels."""
    data = bytearray(simplejpeg.encode_jpeg(_photo(1, 16), quality=90))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(data)


def test_bit_flipped_jpegs_are_errors_never_wrong_pixels(tmp_path: Path) -> None:
    damaged = bit_flipped_jpegs(300)
    refused = [libjpeg_strict_refuses(d) for d in damaged]
    assert sum(refused) >= 60  # the flips libjpeg can see (the others decode to what the bytes say)
    out = np.empty((112, 112, 3), np.uint8)
    for data, bad in zip(damaged, refused):
        if bad:
            for decode in (decode_image, lambda d: decode_face(d, (112, 112)), lambda d: decode_into(d, out)):
                with pytest.raises(CorruptImageError, match="damaged"):
                    decode(data)
        else:
            assert np.array_equal(decode_image(data), simplejpeg.decode_jpeg(data))

    # the training path: a folder set of them, every damaged one skipped and counted, none delivered
    for k, data in enumerate(damaged):
        (tmp_path / "faces" / str(k // 30)).mkdir(parents=True, exist_ok=True)
        (tmp_path / "faces" / str(k // 30) / f"{k:03d}.jpg").write_bytes(data)
    source = FolderSource(tmp_path / "faces")
    assert source.image_size == (112, 112)
    bad = {i for i in range(len(source)) if libjpeg_strict_refuses(source.read_raw(i))}
    assert len(bad) == sum(refused)
    with pytest.raises(CorruptImageError, match=r"faces/\d/\d{3}\.jpg: corrupt image: cannot decode JPEG"):
        BatchReader(source)[BatchRequest(0, np.array(sorted(bad)[:1]))]
    reader = BatchReader(source, on_corrupt="skip")
    images, labels, index = reader[BatchRequest(0, np.arange(len(source)))]
    assert not set(index.tolist()) & bad and reader.num_skipped >= len(bad)


def test_pillow_formats_refuse_truncated_files_whatever_the_global_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    Image.fromarray(_photo(3, 48)).save(buf, "PNG")
    png = buf.getvalue()
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries set it
    with pytest.raises(CorruptImageError, match="truncated"):
        decode_image(png[: len(png) * 2 // 3])
    with pytest.raises(CorruptImageError):
        decode_face(png[: len(png) * 2 // 3], (48, 48))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # put back as found
    assert np.array_equal(decode_image(png), _photo(3, 48))


def test_a_jpeg_libjpeg_cannot_read_is_not_rescued(tmp_path: Path) -> None:
    jpeg = simplejpeg.encode_jpeg(_photo(2, 64), quality=90)
    for broken in (jpeg[: len(jpeg) // 2], jpeg[:-2]):
        assert libjpeg_strict_refuses(broken)
        with pytest.raises(CorruptImageError) as info:
            decode_image(broken)
        assert isinstance(info.value, UserError)


def _tree(root: Path, payloads: list[bytes]) -> Path:
    for k, data in enumerate(payloads):
        path = root / f"id{k % 3}" / f"{k:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_a_set_size_is_the_most_common_header_not_the_first(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = [simplejpeg.encode_jpeg(_photo(k, 16), quality=90) for k in range(9)]
    huge = forged_size(65500, 65500)
    assert declared_size(huge) == (65500, 65500)
    root = _tree(tmp_path / "a", [huge] + good)  # id0/000.jpg, the first image, claims 65500 x 65500
    with caplog.at_level(logging.WARNING):
        source = FolderSource(root)
    assert source.image_size == (16, 16)  # not 12 GiB per image
    assert "id0/000.jpg (65500x65500)" in caplog.text
    with pytest.raises(ImageSizeError, match=r"id0/000\.jpg: corrupt image: image is 65500x65500"):
        BatchReader(source)[BatchRequest(0, np.array([0, 1]))]
    reader = BatchReader(source, on_corrupt="skip")
    images, _, index = reader[BatchRequest(0, np.arange(len(source)))]
    assert images.shape == (10, 3, 16, 16) and 0 not in index.tolist() and reader.num_skipped >= 1

    small = simplejpeg.encode_jpeg(_photo(5, 8), quality=90)  # a small first image: the rest are not "corrupt"
    assert FolderSource(_tree(tmp_path / "b", [small] + good)).image_size == (16, 16)

    with pytest.raises(ImageSizeError, match=rf"more than the {MAX_PIXELS} allowed"):
        FolderSource(_tree(tmp_path / "c", [huge] * 3 + good[:1]))
    with pytest.raises(ImageSizeError, match=r"no image size is shared by most of the 4 images sampled \(found 16x16 \(2x\), 8x8 \(2x\)"):
        FolderSource(_tree(tmp_path / "d", good[:2] + [small, small]))
    assert FolderSource(tmp_path / "c", image_size=(16, 16)).image_size == (16, 16)  # said: not guessed


def test_a_recordio_set_without_property_takes_its_size_the_same_way(tmp_path: Path) -> None:
    root = tmp_path / "rec"
    root.mkdir()
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:  # im2rec layout, no property file
        for key in range(12):
            data = forged_size(65500, 65500) if key == 0 else simplejpeg.encode_jpeg(_photo(key, 16), quality=90)
            w.write(key, pack_record(IRHeader(0, float(key % 4), key, 0), data))
    fs = FaceRecordSet(root, num_classes=4)
    assert fs.image_size == (16, 16)
    reader = BatchReader(fs, on_corrupt="skip")
    images, _, index = reader[BatchRequest(0, np.arange(12))]
    assert images.shape == (12, 3, 16, 16) and 0 not in index.tolist()
