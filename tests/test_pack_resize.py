"""The packer's resize: Pillow's antialiased bicubic filter, DCT-scaled decoding where it shrinks 2x or
more, the crop kept in place, and its fidelity on real photos against a Lanczos resize of the full
image: above a bilinear resize without antialiasing (what ``im2rec --resize`` runs), higher with
``--resize-quality high``, best with ``full``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from facemargin.data.formats.resize import dct_denominator, decode_region, resize_rgb
from facemargin.data.sources.recordio import FaceRecordSet
from facemargin.data.tools.pack import main as pack_main
from facemargin.detect.samples import packaged_photo, packaged_photo_path


def jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality, colorspace="RGB")


def centred_square(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = min(h, w)
    return rgb[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def lanczos(rgb: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((size, size), Image.LANCZOS), np.float64)


def bilinear_no_antialias(rgb: np.ndarray, size: int) -> np.ndarray:
    """OpenCV's INTER_LINEAR as ``im2rec --resize`` runs it: each output pixel from its 4 nearest inputs."""
    h, w = rgb.shape[:2]
    ys = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
    xs = np.clip((np.arange(size) + 0.5) * w / size - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = rgb.astype(np.float64)
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return np.round(top * (1 - fy) + bottom * fy)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((np.asarray(a, np.float64) - b) ** 2)))


@pytest.mark.parametrize(("shape", "out"), [((125, 125), (112, 112)), ((250, 250), (112, 112)),
                                            ((300, 200), (50, 70)), ((40, 40), (80, 80))])
def test_resize_is_pillows_bicubic_filter(shape, out) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    got = resize_rgb(rgb[:, :], out)
    reference = np.asarray(Image.fromarray(rgb).resize((out[1], out[0]), Image.BICUBIC))
    assert got.shape == (*out, 3) and got.flags.c_contiguous
    assert np.abs(got.astype(int) - reference).max() <= 2  # the same filter, other rounding


def test_dct_scale_keeps_the_region_at_least_the_output_size() -> None:
    sides = (112, 223, 224, 250, 447, 448, 895, 896, 4000)
    assert [dct_denominator((s, s), (112, 112)) for s in sides] == [1, 1, 2, 2, 2, 4, 4, 8, 8]
    assert [dct_denominator((s, s), (112, 112), "high") for s in sides] == [1, 1, 1, 1, 1, 2, 2, 4, 8]
    assert [dct_denominator((s, s), (112, 112), "full") for s in sides] == [1] * len(sides)
    assert dct_denominator((500, 224), (112, 112)) == 2  # the narrower side decides
    with pytest.raises(ValueError, match="resize quality must be one of fast, high, full"):
        dct_denominator((500, 500), (112, 112), "best")


@pytest.fixture(scope="module")
def real_jpegs() -> dict[str, bytes]:
    """Real photos as JPEGs: matplotlib's Grace Hopper and scikit-image's rocket as shipped, the astronaut at q95."""
    return {"grace_hopper": packaged_photo_path("grace_hopper").read_bytes(),
            "rocket": packaged_photo_path("rocket").read_bytes(), "astronaut": jpeg(packaged_photo("astronaut"))}


def test_fidelity_on_real_photos_above_a_resize_without_antialiasing(real_jpegs) -> None:
    for name, data in real_jpegs.items():
        full = simplejpeg.decode_jpeg(data, colorspace="RGB")
        h, w = full.shape[:2]
        s = min(h, w)
        box = ((h - s) // 2, (w - s) // 2, s, s)
        reference = lanczos(centred_square(full), 112)
        fast, high, best = (psnr(decode_region(data, (h, w), box, (112, 112), q), reference)
                            for q in ("fast", "high", "full"))
        im2rec_like = psnr(bilinear_no_antialias(centred_square(full), 112), reference)
        assert best >= high > fast > im2rec_like + 0.5, (name, best, high, fast, im2rec_like)
        assert best > 38.0 and high > best - 2.5, (name, best, high)


def test_a_crop_stays_in_place_on_the_dct_scaled_grid() -> None:
    big = np.asarray(Image.fromarray(packaged_photo("astronaut")).resize((1000, 1000), Image.BICUBIC))
    data = jpeg(big)
    box = (250, 250, 500, 500)  # --crop 0.5: the region is 500 px
    for quality, d, within in (("fast", 4, 8.0), ("high", 2, 3.0)):  # decoded at 125 and 250 px
        assert dct_denominator(box[2:], (112, 112), quality) == d
        got = decode_region(data, (1000, 1000), box, (112, 112), quality).astype(float)
        errors = {(dy, dx): np.abs(got - lanczos(big[250 + dy:750 + dy, 250 + dx:750 + dx], 112)).mean()
                  for dy in (-4, 0, 4) for dx in (-4, 0, 4)}  # 4 px: 0.9 output pixels
        best = min(errors, key=errors.get)
        assert best == (0, 0) and errors[best] < within, (quality, errors)
        assert min(e for k, e in errors.items() if k != (0, 0)) > 1.3 * errors[(0, 0)], (quality, errors)


def test_pack_resize_workers_and_resize_quality(tmp_path, real_jpegs) -> None:
    root = tmp_path / "photos"
    for i, (name, data) in enumerate(sorted(real_jpegs.items())):
        (root / f"id{i}").mkdir(parents=True)
        (root / f"id{i}" / f"{name}.jpg").write_bytes(data)
        Image.open(io.BytesIO(data)).save(root / f"id{i}" / f"{name}.png")  # the same photo, another format
    sets = {}
    for label, extra in (("one", []), ("two", ["--workers", "2"]), ("full", ["--resize-quality", "full"])):
        out = tmp_path / label
        assert pack_main([str(root), str(out), "--resize", "112", "--quiet", *extra]) == 0
        sets[label] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sets["one"] == sets["two"]  # worker processes give the same bytes
    assert sets["one"]["train.idx"] != sets["full"]["train.idx"]  # decoded in full: other pixels, other sizes
    fs = FaceRecordSet(tmp_path / "one")
    assert fs.image_size == (112, 112) and fs.labels().tolist() == [0, 0, 1, 1, 2, 2]
    images = [simplejpeg.decode_jpeg(fs.read(k)[1]).astype(float) for k in fs.image_keys.tolist()]
    for jpeg_face, png_face in zip(images[0::2], images[1::2]):  # png sorts after jpg: decoded in full
        assert np.abs(jpeg_face - png_face).mean() < 4.0


def test_resize_is_written_in_place_like_torchs_interpolate() -> None:
    torch = pytest.importorskip("torch")
    rgb = np.random.default_rng(1).integers(0, 256, (131, 97, 3), dtype=np.uint8)
    expected = torch.nn.functional.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None], size=(56, 40),
                                               mode="bicubic", antialias=True)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(resize_rgb(rgb, (56, 40)), expected)


def test_resize_accepts_read_only_and_strided_views(tmp_path: Path) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    view = rgb[4:60, 10:70]
    view.flags.writeable = False
    reference = np.asarray(Image.fromarray(np.ascontiguousarray(view)).resize((30, 28), Image.BICUBIC))
    assert np.abs(resize_rgb(view, (28, 30)).astype(int) - reference).max() <= 2
