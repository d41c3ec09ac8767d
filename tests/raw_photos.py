"""A small identity folder of real photos (from registry packages) and a detector that logs its calls.

``identity_folder(root)``: three people from the photos scikit-image and matplotlib ship (the
astronaut, Grace Hopper, the photographer), each as a few variants a camera roll would hold
(resized, mirrored, cropped, brighter, saved as JPEG or PNG), plus a photo with no face (coffee)
and a two-face collage filed under the astronaut (the largest face is hers, the central one
Grace Hopper's). ``CountingDetector``: MTCNN that appends one line per call to a log file, so a
test counts detections across processes, workers and ranks (``_target_: raw_photos.CountingDetector``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from facemargin.detect.mtcnn import MTCNN
from facemargin.detect.samples import packaged_photo

__all__ = ["CountingDetector", "calls", "identity_folder", "pixels_digest", "scaled"]


def scaled(image: np.ndarray, factor: float) -> np.ndarray:
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((round(w * factor), round(h * factor)), Image.BICUBIC))


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))


def identity_folder(root: Path, no_face: bool = True, collage: bool = True) -> Path:
    """Write the folder (see the module doc) and return ``root``. Photos are about 256 pixels wide."""
    astronaut, hopper, camera = (scaled(packaged_photo(n), 0.5) for n in ("astronaut", "grace_hopper", "camera"))
    _save(astronaut, root / "astronaut" / "portrait.png")
    _save(astronaut[:, ::-1], root / "astronaut" / "mirrored.jpg")
    _save(scaled(packaged_photo("astronaut")[0:400, 50:450], 0.6), root / "astronaut" / "closer.jpg")
    _save(hopper, root / "grace_hopper" / "portrait.jpg")
    _save(hopper[:, ::-1], root / "grace_hopper" / "mirrored.jpg")
    _save(np.clip(hopper.astype(np.int16) + 30, 0, 255).astype(np.uint8), root / "grace_hopper" / "brighter.png")
    _save(camera, root / "photographer" / "portrait.png")
    _save(camera[:, ::-1], root / "photographer" / "mirrored.jpg")
    if no_face:
        _save(scaled(packaged_photo("coffee"), 0.5), root / "grace_hopper" / "coffee.png")
    if collage:
        from test_detect import collage as make_collage

        _save(scaled(make_collage()[0], 0.6), root / "astronaut" / "with_grace.png")
    return root


def pixels_digest(image: np.ndarray) -> str:
    """What :class:`CountingDetector` logs for a photo: a digest of its decoded pixels."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


class CountingDetector(MTCNN):
    """MTCNN that appends ``<pid> <rank> <pixels digest>`` to ``log`` on every call."""

    def __init__(self, log: str, **options) -> None:
        super().__init__(**options)
        self.log = str(log)

    def __call__(self, image: np.ndarray):
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {rank} {pixels_digest(image)}\n")
        return super().__call__(image)


def calls(log: Path) -> list[tuple[str, str, str]]:
    """``(pid, rank, pixels digest)`` of every logged call (none when the log does not exist)."""
    return [tuple(line.split()) for line in log.read_text().splitlines()] if log.exists() else []  # type: ignore[misc]


def lfw_like_bin(path: Path, photos: Path, pairs: int = 20) -> Path:
    """A verification ``.bin`` of aligned 112x112 crops of the people in ``photos`` (one face each),
    ``pairs`` pairs alternating same / different person, so every one of 10 folds holds both kinds."""
    import simplejpeg

    from facemargin.data.formats.image import decode_image
    from facemargin.data.formats.verification import write_bin
    from facemargin.detect.pipeline import detect_and_align

    detector = MTCNN()
    people: dict[str, list[np.ndarray]] = {}
    for file in sorted(p for p in photos.rglob("*") if p.is_file()):
        crop, found = detect_and_align(detector, decode_image(file.read_bytes()))
        if crop is not None and found.count == 1:
            people.setdefault(file.parent.name, []).append(crop)
    names = sorted(people)
    images: list[bytes] = []
    issame: list[bool] = []
    for k in range(pairs):
        same = k % 2 == 0
        a, b = names[k % len(names)], names[(k + (0 if same else 1)) % len(names)]
        first, second = people[a][k % len(people[a])], people[b][(k + 1) % len(people[b])]
        gain = 0.85 + 0.3 * ((k * 7) % 10) / 10  # a different exposure in every pair
        second = np.clip(second.astype(np.float32) * gain, 0, 255).astype(np.uint8)
        images += [simplejpeg.encode_jpeg(np.ascontiguousarray(im), quality=90) for im in (first, second)]
        issame.append(same)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bin(path, images, issame)
