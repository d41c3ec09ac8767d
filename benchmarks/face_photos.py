"""A real photo set for the detection benchmarks, assembled from photos that ship in registry packages.

Never a machine path: every photo is found through a package.

* installed packages, located with :mod:`importlib.metadata` (:mod:`facemargin.detect.samples`):
  scikit-image's ``astronaut`` and ``camera`` and matplotlib's ``grace_hopper`` (one face each;
  public-domain portraits), scikit-image's ``coffee`` and ``rocket`` (no face);
* the insightface wheel's ``insightface/data/images/``: ``t1.jpg`` (a group photo, 1280x886, six
  faces), ``Tom_Hanks_54745.png`` (an aligned 112x112 face) and ``mask_*.jpg`` (four face masks
  on a white background: no face). The wheel is read as an archive, never installed or imported,
  from a download cache: ``--wheels DIR`` or ``$FACEMARGIN_PHOTO_WHEELS``; ``--fetch`` fills it
  with ``pip download --no-deps insightface==2.1 -d DIR`` (PyPI through pip, nothing else).
  Without it the set has the three packaged faces and is said to be smaller.

:func:`variants` makes the harder copies a real photo folder holds: scaled 0.5x / 0.75x / 1.5x,
rotated +-15 degrees, cropped off-centre, darker / brighter, JPEG quality 20 and 50, mirrored.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from facemargin.align import warp_affine
from facemargin.data.formats.image import decode_image
from facemargin.detect.samples import packaged_photo_path

INSIGHTFACE = ("insightface", "2.1")
#: files of the insightface wheel and how many faces each shows
WHEEL_PHOTOS = {"t1.jpg": 6, "Tom_Hanks_54745.png": 1, "mask_black.jpg": 0, "mask_blue.jpg": 0,
                "mask_green.jpg": 0, "mask_white.jpg": 0}
PACKAGED = {"astronaut": 1, "grace_hopper": 1, "camera": 1, "coffee": 0, "rocket": 0}


@dataclass(frozen=True)
class Photo:
    """One photo: ``name``, its encoded bytes, its source and how many faces it shows."""

    name: str
    data: bytes
    source: str
    faces: int

    def rgb(self) -> np.ndarray:
        return decode_image(self.data)


def packaged_photos() -> list[Photo]:
    """The photos of installed packages (scikit-image, matplotlib)."""
    from importlib import metadata

    out = []
    for name, faces in PACKAGED.items():
        path = packaged_photo_path(name)
        dist = "matplotlib" if name == "grace_hopper" else "scikit-image"
        out.append(Photo(name, path.read_bytes(), f"{dist} {metadata.version(dist)}: {path.name}", faces))
    return out


def fetch_wheel(cache: Path) -> None:
    """``pip download --no-deps insightface==2.1 -d cache`` (the registry, through pip)."""
    cache.mkdir(parents=True, exist_ok=True)
    name, version = INSIGHTFACE
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), f"{name}=={version}"],
                   check=True)


def wheel_photos(cache: Path | None) -> list[Photo]:
    """The insightface archive's photos from ``cache`` (a wheel or an sdist); ``[]`` when absent."""
    if cache is None or not cache.is_dir():
        return []
    name, version = INSIGHTFACE
    for archive in sorted(cache.glob(f"{name}-{version}*")):
        members = _archive_members(archive)
        found = {base: data for path, data in members.items()
                 if (base := path.rsplit("/", 1)[-1]) in WHEEL_PHOTOS and "/data/images/" in path}
        if found:
            return [Photo(Path(base).stem, data, f"{archive.name}: {base}", WHEEL_PHOTOS[base])
                    for base, data in sorted(found.items())]
    return []


def _archive_members(archive: Path) -> dict[str, bytes]:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            return {n: zf.read(n) for n in zf.namelist() if "/data/images/" in n}
    with tarfile.open(archive) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile() and "/data/images/" in m.name}


def photo_set(wheels: str | None = None, fetch: bool = False) -> tuple[list[Photo], str]:
    """``(photos, where they came from)``; ``wheels`` defaults to ``$FACEMARGIN_PHOTO_WHEELS``."""
    folder = wheels or os.environ.get("FACEMARGIN_PHOTO_WHEELS")
    cache = Path(folder).expanduser() if folder else None
    if fetch:
        if cache is None:
            raise SystemExit("--fetch needs --wheels DIR (or $FACEMARGIN_PHOTO_WHEELS): where pip puts the wheel")
        fetch_wheel(cache)
    extra = wheel_photos(cache)
    note = (f"insightface {INSIGHTFACE[1]} wheel from {cache}" if extra else
            "no insightface wheel (give --wheels DIR [--fetch]): scikit-image and matplotlib photos only")
    return packaged_photos() + extra, note


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    h, w = image.shape[:2]
    a = np.deg2rad(degrees)
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    return warp_affine(image, np.hstack([R, (centre - R @ centre)[:, None]]), (w, h))


def variants(photo: Photo) -> list[Photo]:
    """``photo`` and 10 harder copies (see the module doc), each a JPEG."""
    img = photo.rgb()
    h, w = img.shape[:2]

    def resized(s: float) -> np.ndarray:
        return np.asarray(Image.fromarray(img).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR))

    copies = {
        "scale0.5": encode_jpeg(resized(0.5)), "scale0.75": encode_jpeg(resized(0.75)), "scale1.5": encode_jpeg(resized(1.5)),
        "rot+15": encode_jpeg(_rotate(img, 15)), "rot-15": encode_jpeg(_rotate(img, -15)),
        "crop": encode_jpeg(img[h // 10: h - h // 20, w // 6: w - w // 20]),
        "dark": encode_jpeg((img * 0.45).astype(np.uint8)),
        "bright": encode_jpeg(np.clip(img * 1.6 + 20, 0, 255).astype(np.uint8)),
        "jpeg20": encode_jpeg(img, 20), "jpeg50": encode_jpeg(img, 50),
        "mirror": encode_jpeg(np.ascontiguousarray(img[:, ::-1])),
    }
    return [photo] + [Photo(f"{photo.name}-{k}", v, photo.source, photo.faces) for k, v in copies.items()]
