"""N aligned 112x112 JPEGs of real faces, for benchmarks that need real face pixels (e.g. a data loader's).

    python benchmarks/real_faces.py --out DIR --count 3000 [--wheels DIR [--fetch]] [--seed 0]

Source photos (:mod:`face_photos`): scikit-image's astronaut and camera and matplotlib's Grace Hopper
(3 faces), and with ``--wheels`` (or ``$FACEMARGIN_PHOTO_WHEELS``) the insightface 2.1 wheel's group
photo and aligned Tom Hanks crop (7 more): up to 10 people. Each face is found once by the offline
detector (MTCNN, every face scoring >= 0.95); then each output image is that person's photo warped
to the ArcFace template from landmarks jittered as a detector's are (each point moved by up to 3%
of the eye distance), with a brightness / contrast change (x0.7-1.3), half of them mirrored, and
saved as a JPEG of quality 75-95. The pixels are real; the identities are few (say so when you
report on them).

Writes ``DIR/<person>/<k>.jpg`` (``person``: the source photo and face number, e.g.
``t1-face2``), round-robin over the people, and ``DIR/SOURCES.txt``: one line per person with the
package file it came from and the face's box. Prints one JSON line with the counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from face_photos import encode_jpeg, photo_set
from facemargin.align import align_face
from facemargin.detect.mtcnn import MTCNN


def real_faces(out: Path, count: int, wheels: str | None = None, fetch: bool = False, seed: int = 0) -> dict:
    """Write ``count`` aligned faces under ``out`` (see the module doc); returns the summary."""
    photos, source = photo_set(wheels, fetch)
    detector = MTCNN()
    people: list[tuple[str, np.ndarray, np.ndarray, str]] = []  # name, photo, landmarks, where from
    for photo in photos:
        if not photo.faces:
            continue
        image = photo.rgb()
        faces = sorted((f for f in detector(image) if f.score >= 0.95), key=lambda f: f.box[0])  # left to right
        for k, face in enumerate(faces):
            name = photo.name if len(faces) == 1 else f"{photo.name}-face{k + 1}"
            box = ",".join(str(int(round(v))) for v in face.box)
            people.append((name, image, face.landmarks, f"{photo.source} box {box}"))
    if not people:
        raise SystemExit("no face found in the source photos")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        name, image, marks, _ = people[i % len(people)]
        eye = float(np.linalg.norm(marks[1] - marks[0]))
        jittered = marks + rng.uniform(-0.03, 0.03, size=marks.shape) * eye
        crop = align_face(image, jittered).astype(np.float32)
        gain, offset = rng.uniform(0.7, 1.3), rng.uniform(-20, 20)
        crop = np.clip((crop - 128) * gain + 128 + offset, 0, 255).astype(np.uint8)
        if rng.random() < 0.5:
            crop = np.ascontiguousarray(crop[:, ::-1])
        folder = out / name
        folder.mkdir(exist_ok=True)
        (folder / f"{i // len(people):05d}.jpg").write_bytes(encode_jpeg(crop, int(rng.integers(75, 96))))
    (out / "SOURCES.txt").write_text("".join(f"{name}\t{where}\n" for name, _, _, where in people))
    return {"out": str(out), "images": count, "people": len(people), "source": source}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--wheels", help="download cache holding the insightface wheel ($FACEMARGIN_PHOTO_WHEELS)")
    ap.add_argument("--fetch", action="store_true", help="fill --wheels with pip download first")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    summary = real_faces(args.out, args.count, args.wheels, args.fetch, args.seed)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
