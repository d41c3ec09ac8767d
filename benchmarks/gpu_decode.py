"""JPEG decode for training batches: CPU DataLoader workers vs shipping bytes and decoding on the GPU.

    python benchmarks/gpu_decode.py --images 4096 --batch 128 --workers 2 --repeats 3 [--device cuda] [--json F]

Data: ``--images`` procedural 112x112 faces (:mod:`facemargin.data.tools.synthetic`) as JPEG quality 90
bytes held in memory (so the figure is decode + batching, not storage). Rows, each a full pass of
``DataLoader(batch_size=--batch, num_workers=--workers)``, ending with the batch as uint8
``[B, 3, 112, 112]`` on ``--device`` (synchronised):

* ``cpu workers``: workers decode (``decode_image``) and collate uint8 images; the batch is copied
  to the device;
* ``device decode``: workers only collate the bytes (``collate_encoded``); ``JpegBatchDecoder``
  decodes the batch on ``--device`` (one nvJPEG call on CUDA). Without CUDA this is the CPU
  fallback in the main process, so the row shows what the fallback costs, not nvJPEG.

Median images/s of ``--repeats`` passes after one warm-up pass.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from torch.utils.data import DataLoader, Dataset

from facemargin.data.formats.image import decode_image
from facemargin.data.loading.device_decode import JpegBatchDecoder, collate_encoded
from facemargin.data.loading.normalize import to_uint8_chw
from facemargin.data.tools.synthetic import render_identity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_report import row, write_rows  # noqa: E402


class Encoded(Dataset):
    def __init__(self, images: list[bytes], decode: bool) -> None:
        self.images, self.decode = images, decode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        data = self.images[i]
        return to_uint8_chw(decode_image(data)) if self.decode else data


def make_images(n: int) -> list[bytes]:
    faces = np.concatenate([render_identity(i, 16, 112, 0) for i in range(max(1, n // 16))])
    return [simplejpeg.encode_jpeg(faces[i % len(faces)], quality=90, colorspace="RGB") for i in range(n)]


def timed_pass(loader: DataLoader, step, device: torch.device) -> float:
    start, count = time.perf_counter(), 0
    for batch in loader:
        images = step(batch)
        count += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the rows here (benchmarks/gpu_report.py)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_decode: --device cuda but torch.cuda.is_available() is False")
    images = make_images(args.images)
    common = dict(batch_size=args.batch, num_workers=args.workers, persistent_workers=args.workers > 0,
                  pin_memory=device.type == "cuda")
    decoder = JpegBatchDecoder(device)
    rows = {
        "cpu workers": (DataLoader(Encoded(images, True), **common), lambda b: b.to(device, non_blocking=True)),
        "device decode": (DataLoader(Encoded(images, False), collate_fn=collate_encoded, **common),
                          lambda b: decoder(*b)),
    }
    for loader, step in rows.values():
        timed_pass(loader, step, device)
    rates = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, (loader, step) in rows.items():
            rates[name].append(timed_pass(loader, step, device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (fallback decode)"
    print(f"{args.images} JPEGs 112x112, batch {args.batch}, {args.workers} workers, device {name}")
    base = statistics.median(rates["cpu workers"])
    for name_, r in rates.items():
        print(f"{name_:14s} {statistics.median(r):9.0f} images/s  {statistics.median(r) / base:5.2f}x")
    setting = f"{args.images} JPEGs 112x112 q90, batch {args.batch}, {args.workers} workers"
    note = "" if device.type == "cuda" else "no CUDA: the device row is the CPU fallback, not nvJPEG"
    write_rows(args.json, "gpu_decode", args.device, [
        row("JPEG decode", f"{name_}; {setting}", statistics.median(r), "images/s", statistics.median(r) / base,
            "cpu workers", note=note)
        for name_, r in rates.items()
    ])


if __name__ == "__main__":
    main()
