"""Ways to shrink a JPEG photo to a 112-px face crop: CPU time per image and PSNR against an ideal resize.

    python benchmarks/resize_variants.py [--photos DIR] [--count 500] [--repeats 3]

Groundwork for the packer's resize path (``docs/data_speed.md``). Each variant turns one JPEG
photo's bytes into the JPEG bytes of its centred square resized to 112x112 (quality 95); the
reference is the original decoded at full size, centred square, Lanczos to 112 in Pillow. Variants:

* ``pillow bicubic``: what ``pack --resize 112`` does today (Pillow decode, ``convert("RGB")``,
  crop, ``resize(BICUBIC)``, ``np.asarray`` + ``ascontiguousarray``, simplejpeg encode);
* ``pillow draft + bicubic``: ``Image.draft("RGB", (s, s))`` first, so libjpeg decodes at 1/2,
  1/4 or 1/8 scale in the DCT domain (never below the target), then the same resize;
* ``simplejpeg min size + bicubic``: ``simplejpeg.decode_jpeg(min_height=, min_width=)`` (the
  same DCT scaling through libjpeg-turbo), then Pillow's resize;
* ``pillow reducing_gap=2``: full decode, ``resize(BICUBIC, reducing_gap=2.0)`` (box reduce first);
* ``simplejpeg + torch bicubic AA``: simplejpeg full decode, ``torch.nn.functional.interpolate(
  uint8, mode="bicubic", antialias=True)`` (torch's uint8 kernel: the same filter as Pillow's);
* ``simplejpeg min size + torch bicubic AA``: the DCT-scaled decode, then the same.

Data: ``--photos DIR`` (any JPEG photos), else LFW-like 250x250 photos made from procedural faces
(as ``pack_throughput.py`` makes them). One process, ``getrusage`` CPU time, median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import simplejpeg
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pack_throughput  # noqa: E402
import peers  # noqa: E402

SIZE = 112


def _square(im: Image.Image) -> Image.Image:
    s = min(im.size)
    left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
    return im if im.size == (s, s) else im.crop((left, top, left + s, top + s))


def _encode(im: Image.Image) -> bytes:
    return simplejpeg.encode_jpeg(np.ascontiguousarray(np.asarray(im, dtype=np.uint8)), quality=95, colorspace="RGB")


def pillow_bicubic(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        return _encode(_square(im.convert("RGB")).resize((SIZE, SIZE), Image.BICUBIC))


def pillow_draft(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        s = min(w, h)
        im.draft("RGB", (w * SIZE // s, h * SIZE // s))  # the largest DCT scale that keeps the square >= SIZE
        return _encode(_square(im.convert("RGB")).resize((SIZE, SIZE), Image.BICUBIC))


def simplejpeg_scaled(data: bytes) -> bytes:
    h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    s = min(h, w)
    rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=h * SIZE // s, min_width=w * SIZE // s)
    return _encode(_square(Image.fromarray(rgb)).resize((SIZE, SIZE), Image.BICUBIC))


def pillow_reducing_gap(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        return _encode(_square(im.convert("RGB")).resize((SIZE, SIZE), Image.BICUBIC, reducing_gap=2.0))


def _torch_resize(rgb: np.ndarray) -> bytes:
    import torch
    import torch.nn.functional as F

    h, w = rgb.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = torch.from_numpy(rgb[top:top + s, left:left + s]).permute(2, 0, 1)[None]
    y = F.interpolate(x, size=(SIZE, SIZE), mode="bicubic", antialias=True)[0].permute(1, 2, 0)
    return simplejpeg.encode_jpeg(np.ascontiguousarray(y.numpy()), quality=95, colorspace="RGB")


def torch_full(data: bytes) -> bytes:
    return _torch_resize(simplejpeg.decode_jpeg(data, colorspace="RGB"))


def torch_scaled(data: bytes) -> bytes:
    h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    s = min(h, w)
    return _torch_resize(simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=h * SIZE // s, min_width=w * SIZE // s))


VARIANTS: dict[str, Callable[[bytes], bytes]] = {
    "pillow bicubic (pack today)": pillow_bicubic,
    "pillow draft + bicubic": pillow_draft,
    "simplejpeg min size + bicubic": simplejpeg_scaled,
    "pillow reducing_gap=2": pillow_reducing_gap,
    "simplejpeg + torch bicubic AA": torch_full,
    "simplejpeg min size + torch bicubic AA": torch_scaled,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", default=None, metavar="DIR")
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.photos:
        photos, labels, _ = peers.load_faces(args.photos, same_size=False)
        photos = peers.cycle_faces(photos, labels, args.count)[0]
    else:
        faces, _ = peers.procedural_faces(min(args.count, 500), 25)
        rng = np.random.default_rng(0)
        photos = [pack_throughput.lfw_like(faces[i % len(faces)], rng) for i in range(args.count)]
    h, w = peers.jpeg_size(photos[0], "photo 0")
    print(f"{len(photos)} photos ({w}x{h} first, {np.mean([len(p) for p in photos]) / 1024:.1f} KB mean) -> "
          f"{SIZE}x{SIZE}; {peers.machine_line()}")
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    outputs: dict[str, list[bytes]] = {}
    for _ in range(args.repeats):
        for name, fn in VARIANTS.items():
            start = peers.Clock.now()
            outputs[name] = [fn(p) for p in photos]
            times[name].append(peers.Clock.now().since(start)["cpu"] / len(photos))
    sample = photos[:: max(1, len(photos) // 200)]
    step = max(1, len(photos) // 200)
    base = statistics.median(times["pillow bicubic (pack today)"])
    print("\n| variant | µs CPU / image | speed vs today | PSNR vs Lanczos (dB) |")
    print("|---|---|---|---|")
    for name in VARIANTS:
        t = statistics.median(times[name])
        psnr = pack_throughput.psnr_vs_reference(outputs[name][::step], sample, SIZE)
        print(f"| {name} | {1e6 * t:.0f} | {base / t:.2f}x | {psnr:.1f} |")


if __name__ == "__main__":
    main()
