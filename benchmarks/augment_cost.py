"""Cost of each face augmentation on the CPU: images/s of FaceAugment per step, vs normalisation alone.

    python benchmarks/augment_cost.py --batch 128 --batches 20 --repeats 5 --threads 2

Input: uint8 [B, 3, 112, 112] batches of procedural faces (:mod:`facemargin.data.tools.synthetic`), the
shape and dtype the DataModule hands to ``on_after_batch_transfer``. Each row times
``augment(images, sample_index, epoch)`` followed by ``normalize_uint8`` (what training does) over
``--batches`` batches with fresh sample indices; the baseline row is ``normalize_uint8`` alone.
Rows: each step with p = 1 (every image pays it: the worst case), and AdaFace's recipe (crop, low
resolution, photometric each p = 0.2). Median of ``--repeats`` runs, rows interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from facemargin.data.loading.augment import FaceAugment
from facemargin.data.loading.normalize import normalize_uint8
from facemargin.data.tools.synthetic import render_identity

OFF = dict(crop_p=0.0, low_res_p=0.0, photometric_p=0.0, grayscale_p=0.0)
ROWS = {
    "normalise only (baseline)": None,
    "crop (p=1)": FaceAugment(**{**OFF, "crop_p": 1.0}),
    "low resolution (p=1)": FaceAugment(**{**OFF, "low_res_p": 1.0}),
    "photometric (p=1)": FaceAugment(**{**OFF, "photometric_p": 1.0}),
    "grayscale (p=1)": FaceAugment(**{**OFF, "grayscale_p": 1.0}),
    "all four (p=1)": FaceAugment(crop_p=1.0, low_res_p=1.0, photometric_p=1.0, grayscale_p=1.0),
    "AdaFace recipe (p=0.2 x3)": FaceAugment(),
}


def batches(batch: int, count: int) -> list[torch.Tensor]:
    faces = np.concatenate([render_identity(i, 8, 112, 0) for i in range(max(1, batch // 8))])
    base = torch.from_numpy(faces[:batch]).permute(0, 3, 1, 2).contiguous()
    return [base.roll(k, 0) for k in range(count)]


def run(aug: FaceAugment | None, data: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for epoch, images in enumerate(data):
        index = torch.arange(epoch * len(images), (epoch + 1) * len(images))
        x = images if aug is None else aug(images, index, epoch)
        normalize_uint8(x)
    return len(data) * len(data[0]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = batches(args.batch, args.batches)
    for aug in ROWS.values():  # warm-up: caches of resize operators, allocator
        run(aug, data[:2])
    rates: dict[str, list[float]] = {name: [] for name in ROWS}
    for _ in range(args.repeats):
        for name, aug in ROWS.items():
            rates[name].append(run(aug, data))
    base = statistics.median(rates["normalise only (baseline)"])
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x 112x112, "
          f"{args.batches} batches, median of {args.repeats}")
    print(f"{'step':28s} {'images/s':>10s} {'ms/batch':>9s} {'vs baseline':>11s}")
    for name, r in rates.items():
        m = statistics.median(r)
        print(f"{name:28s} {m:10.0f} {1000 * args.batch / m:9.2f} {m / base:10.3f}x")


if __name__ == "__main__":
    main()
