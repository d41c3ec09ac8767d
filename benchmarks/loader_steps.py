"""What the steps of a DataLoader worker's batch cost, one at a time (groundwork for ``docs/data_speed.md``).

    python benchmarks/loader_steps.py [--faces DIR] [--images 1280] [--repeats 3]

One process, one thread, CPU µs per image (``getrusage``, median of ``--repeats``), on 112x112
JPEG faces (``--faces DIR``: any folder of equally sized JPEGs; else procedural faces):

* decode + the flipped HWC->CHW strided copy into a ``[B, 3, H, W]`` batch (what ``BatchReader``
  does today, every other image flipped);
* decode straight into an ``[B, H, W, 3]`` batch slot (no copy: layout and flip left to the device);
* the same with ``decode_jpeg_header`` first (today's size check parses every header twice);
* a fresh ``share_memory_`` of a batch (what pickling a batch in a worker does today), and a copy
  into a reused shared buffer instead, with the minor page faults per batch of each.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import simplejpeg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

B = 128


def per_image(fn: Callable[[], None], count: int, repeats: int) -> tuple[float, float]:
    """``(µs CPU per image, minor faults per batch)``, medians."""
    times, faults = [], []
    for _ in range(repeats):
        start = peers.Clock.now()
        fn()
        d = peers.Clock.now().since(start)
        times.append(1e6 * d["cpu"] / count)
        faults.append(d["minflt"] / (count / B))
    return statistics.median(times), statistics.median(faults)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faces", default=None, metavar="DIR")
    ap.add_argument("--images", type=int, default=1280)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.faces:
        data, labels, _ = peers.load_faces(args.faces)
        data = peers.cycle_faces(data, labels, args.images)[0]
    else:
        data = peers.procedural_faces(args.images, max(1, args.images // 20))[0]
    h, w = peers.jpeg_size(data[0], "image 0")
    n = len(data) - len(data) % B
    data = data[:n]
    one = np.empty((h, w, 3), np.uint8)
    chw = np.empty((B, 3, h, w), np.uint8)
    hwc = np.empty((B, h, w, 3), np.uint8)

    def today() -> None:
        for k, d in enumerate(data):
            simplejpeg.decode_jpeg(d, colorspace="RGB", buffer=one)
            np.copyto(chw[k % B], (one[:, ::-1] if k % 2 else one).transpose(2, 0, 1))

    def direct() -> None:
        for k, d in enumerate(data):
            simplejpeg.decode_jpeg(d, colorspace="RGB", buffer=hwc[k % B])

    def header_first() -> None:
        for k, d in enumerate(data):
            simplejpeg.decode_jpeg_header(d)
            simplejpeg.decode_jpeg(d, colorspace="RGB", buffer=hwc[k % B])

    batch = torch.from_numpy(chw)
    slot = torch.empty_like(batch).share_memory_()

    def fresh_shared() -> None:
        for _ in range(n // B):
            batch.clone().share_memory_()

    def reused_shared() -> None:
        for _ in range(n // B):
            slot.copy_(batch)

    print(f"{n} JPEGs {w}x{h}, {np.mean([len(d) for d in data]) / 1024:.1f} KB mean; {peers.machine_line()}")
    print("\n| step | µs CPU / image | minor faults / batch |")
    print("|---|---|---|")
    for name, fn in [("decode + flipped HWC->CHW copy (today)", today),
                     ("decode straight into an HWC batch slot", direct),
                     ("decode_jpeg_header, then decode into the slot", header_first),
                     ("a fresh share_memory_ per batch (incl. a batch copy)", fresh_shared),
                     ("copy into a reused shared buffer", reused_shared)]:
        t, f = per_image(fn, n, args.repeats)
        print(f"| {name} | {t:.1f} | {f:,.0f} |")


if __name__ == "__main__":
    main()
