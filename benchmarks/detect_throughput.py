"""Face detection + alignment throughput on real photos, and the share of photos with a face found.

    python benchmarks/detect_throughput.py [--wheels DIR [--fetch]] [--detector mtcnn] [--threads 1] [--repeats 3]

Photo set (:mod:`face_photos`, documented there): real photos that ship in registry packages --
scikit-image's astronaut and camera, matplotlib's Grace Hopper, and with ``--wheels`` the
insightface wheel's group photo (six faces) and aligned Tom Hanks crop -- each with its 10 harder
copies (scaled 0.5x / 0.75x / 1.5x, rotated +-15 degrees, cropped off-centre, darker, brighter,
JPEG quality 20 and 50, mirrored); and photos with no face (scikit-image's coffee and rocket, the
wheel's four face masks) with the same copies. Every photo is held as encoded bytes in memory.

Rows (each the median of ``--repeats`` passes over the set, photos per CPU-second of this process,
``time.process_time``: every thread counted; ``--threads`` torch intra-op threads):

* ``decode + align`` (the baseline: what ``pack --align`` does per photo once landmarks are known):
  decode, then the 112x112 ArcFace warp from the landmarks the detector found;
* ``decode + detect + align``: decode, detect every face, choose the largest, warp it;
* ``pack --detect``: the packer's command on the same photos written as a folder tree (one
  identity per base photo, its copies inside): decode, detect, align, encode, write the set and
  the lists of photos with no face or several (``pack_images(detect=...)``, one process, one torch
  thread whatever ``--threads`` says: the packer scales with ``--workers``).

The ratio compares the same photos, decoded and warped the same way on both sides; the difference
is the detector. ``pack --detect`` also reports the share of face photos it packed a face from. Also printed: the share of face photos where a face was found, and of no-face
photos where one was (false detections). ``detector=scrfd`` needs its weights: without network
the row is null and says why.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from face_photos import photo_set, variants
from facemargin.align import align_face
from facemargin.data.formats.image import decode_image
from facemargin.data.tools.pack import pack_images
from facemargin.detect.pipeline import choose_face, load_detector
from facemargin.errors import UserError


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", help="download cache holding the insightface wheel ($FACEMARGIN_PHOTO_WHEELS)")
    ap.add_argument("--fetch", action="store_true", help="fill --wheels with pip download first")
    ap.add_argument("--detector", default="mtcnn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-variants", action="store_true", help="the base photos only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    base, source = photo_set(args.wheels, args.fetch)
    photos = base if args.no_variants else [v for p in base for v in variants(p)]
    with_face = [p for p in photos if p.faces]
    without = [p for p in photos if not p.faces]
    result: dict = {"photos": len(photos), "with_face": len(with_face), "without_face": len(without), "source": source,
                    "threads": args.threads, "detector": args.detector}
    try:
        detector = load_detector(args.detector)
        detector(np.zeros((64, 64, 3), np.uint8))  # load the networks outside the timing
    except UserError as err:
        result.update(detect_per_cpu_s=None, why=str(err))
        print(json.dumps(result, indent=1))
        return result

    found = {p.name: choose_face(detector, p.rgb()) for p in photos}
    marks = {name: f.face.landmarks for name, f in found.items() if f.face is not None}

    def baseline() -> None:
        for p in photos:
            image = decode_image(p.data)
            if p.name in marks:
                align_face(image, marks[p.name])

    def detect_align() -> None:
        for p in photos:
            image = decode_image(p.data)
            chosen = choose_face(detector, image)
            if chosen.face is not None:
                align_face(image, chosen.face.landmarks)

    work = Path(tempfile.mkdtemp(prefix="fm_detect_"))
    tree = work / "photos"
    for p in photos:  # one identity per base photo, its copies inside
        folder = tree / p.name.split("-")[0]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{p.name}.{'jpg' if p.data[:2] == bytes([0xFF, 0xD8]) else 'png'}").write_bytes(p.data)
    packed: dict = {}

    def pack_detect() -> None:
        packed.update(pack_images(tree, work / "set", detect=detector, progress=False, overwrite=True))

    rates: dict[str, list[float]] = {"decode + align": [], "decode + detect + align": [], "pack --detect": []}
    try:
        for _ in range(args.repeats):  # interleaved: machine load hits every row alike
            for name, fn in (("decode + align", baseline), ("decode + detect + align", detect_align),
                             ("pack --detect", pack_detect)):
                start = time.process_time()
                fn()
                rates[name].append(len(photos) / (time.process_time() - start))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base_rate, det_rate, pack_rate = (statistics.median(rates[k]) for k in rates)
    no_face = {Path(name).stem for name in packed["no_face"]}
    packed_faces = sum(p.name not in no_face for p in with_face)
    hits = sum(found[p.name].face is not None for p in with_face)
    false = sum(found[p.name].face is not None for p in without)
    missed = [p.name for p in with_face if found[p.name].face is None]
    result.update(
        align_per_cpu_s=round(base_rate, 1), detect_per_cpu_s=round(det_rate, 2),
        detect_vs_align=round(det_rate / base_rate, 4), pack_detect_per_cpu_s=round(pack_rate, 2),
        pack_detect_vs_detect=round(pack_rate / det_rate, 4),
        pack_face_share=round(packed_faces / len(with_face), 4) if with_face else None,
        face_found_share=round(hits / len(with_face), 4) if with_face else None,
        false_detection_share=round(false / len(without), 4) if without else None,
        missed=missed, several=[n for n, f in found.items() if f.count > 1],
    )
    print(f"{len(photos)} photos ({len(with_face)} with faces, {len(without)} without; {source}), "
          f"{args.detector}, {args.threads} torch thread(s), median of {args.repeats}")
    print(f"{'row':<26}{'photos / CPU-s':>16}")
    for name in rates:
        print(f"{name:<26}{statistics.median(rates[name]):>16.2f}")
    print(f"detect + align vs align: {result['detect_vs_align']:.4f}x; pack --detect vs detect + align: "
          f"{result['pack_detect_vs_detect']:.2f}x")
    print(f"pack --detect packed a face from {packed_faces} of {len(with_face)} face photos "
          f"({result['pack_face_share']:.1%}); {len(packed['no_face'])} photos listed in no_face.txt")
    print(f"face found in {hits} of {len(with_face)} face photos ({result['face_found_share']:.1%}); "
          f"a face 'found' in {false} of {len(without)} no-face photos; missed: {', '.join(missed) or 'none'}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
