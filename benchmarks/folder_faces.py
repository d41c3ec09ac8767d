"""What ``data=folder data.detect=mtcnn`` costs: set-up once per photo, then aligning in the workers.

    python benchmarks/folder_faces.py [--wheels DIR] [--repeats 3] [--out DIR]

Photos (:mod:`face_photos`): the packaged photos and their 10 harder copies each, one identity
folder per source photo (those without a face included). All times are CPU seconds of this process
(``time.process_time``), 1 torch thread, no DataLoader workers.

* **set-up** (:class:`~facemargin.data.sources.photos.PhotoFolder`): the first open detects every
  photo; a second open of the same folder finds every face in the store with one ``stat`` per
  photo; an open of a copy of the folder (new paths, same bytes) reads and hashes every photo and
  detects nothing. Ratios: second / first, copy / first.
* **training images**: the same kept photos, batch by batch through the training reader
  (:class:`~facemargin.data.loading.loader.BatchReader`): raw photos decoded and aligned in the
  reader (``data=folder data.detect``) vs the same faces packed once (``pack --align`` with the
  landmarks the set-up chose, JPEG quality 95) and decoded. Both sides yield the same
  ``uint8 [B, 3, 112, 112]`` batches of the same samples. Ratio: folder / packed images per CPU-second.
Prints one JSON line.
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
from facemargin.data.loading.loader import BatchReader, BatchRequest
from facemargin.data.sources.photos import PhotoFolder
from facemargin.data.sources.recordio import FaceRecordSet
from facemargin.data.tools.pack import pack_images


def write_folder(root: Path, wheels: str | None) -> tuple[int, str]:
    photos, note = photo_set(wheels)
    count = 0
    for photo in photos:
        for copy in variants(photo):
            path = root / photo.name / f"{copy.name}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(copy.data)
            count += 1
    return count, note


def cpu(fn):
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def images_per_cpu_second(source, repeats: int, batch: int = 32) -> float:
    reader = BatchReader(source, flip_p=0.0)
    order = np.arange(len(source))
    runs = []
    for _ in range(repeats):
        _, seconds = cpu(lambda: [reader[BatchRequest(0, order[k: k + batch])] for k in range(0, order.size, batch)])
        runs.append(order.size / seconds)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", help="download cache holding the insightface wheel ($FACEMARGIN_PHOTO_WHEELS)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, help="work folder (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    work = args.out or Path(tempfile.mkdtemp(prefix="folder_faces-"))
    try:
        photos, note = write_folder(work / "photos", args.wheels)
        time.sleep(2.1)  # the file table keeps only photos whose ctime is settled (face_store.RACY_NS)
        options = dict(detect="mtcnn", face_cache=work / "cache")
        first, first_s = cpu(lambda: PhotoFolder(work / "photos", **options))
        source, detect_s = cpu(lambda: first.open(report_dir=work / "lists"))
        _, again_s = cpu(lambda: PhotoFolder(work / "photos", **options).open(report_dir=work / "lists2"))
        shutil.copytree(work / "photos", work / "copy")
        _, copy_s = cpu(lambda: PhotoFolder(work / "copy", **options).open(report_dir=work / "lists3"))
        kept = len(source)
        pack_images(work / "photos", work / "packed", align=_kept_list(work), quality=95, progress=False)
        folder_ips = images_per_cpu_second(source, args.repeats)
        packed_ips = images_per_cpu_second(FaceRecordSet(work / "packed"), args.repeats)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    setup = first_s + detect_s
    result = {
        "photos": photos, "with_face": kept, "source": note,
        "setup_first_cpu_s": round(setup, 3), "setup_store_cpu_s": round(again_s, 3), "setup_copy_cpu_s": round(copy_s, 3),
        "store_over_first": round(again_s / setup, 4), "copy_over_first": round(copy_s / setup, 4),
        "folder_images_per_cpu_s": round(folder_ips, 1), "packed_images_per_cpu_s": round(packed_ips, 1),
        "folder_over_packed": round(folder_ips / packed_ips, 3),
    }
    print(json.dumps(result))
    return result


def _kept_list(work: Path) -> Path:
    """``pack --align`` needs every photo listed: move the photos without a face out first."""
    for line in (work / "lists" / "noface.txt").read_text().splitlines():
        (work / "photos" / line).rename(work / f"noface-{line.replace('/', '_')}")
    return work / "lists" / "faces.txt"


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
