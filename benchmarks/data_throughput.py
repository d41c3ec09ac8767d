"""Training-data throughput: RecordIO readers vs in-memory decoding vs an ImageFolder + PIL loader.

    python benchmarks/data_throughput.py --records 20000 --workers 0 2 --repeats 3

Data: procedural 112x112 faces from :mod:`facemargin.data.synthetic` (``--identities`` x 12
rendered images), each record a distinct variant (random shift + brightness) re-encoded as
JPEG quality 90 -- about 5-6 KB, the size of real aligned face crops. The same JPEG bytes are
used by every method; the RecordIO set is written in the insightface layout and also unpacked
to ``<class>/<n>.jpg`` files. Files are in the page cache (warm reads): this measures CPU cost
(decode + pipeline), not the disk.

Methods (every one: RGB, random horizontal flip p=0.5, shuffled, batch 128 through
``torch.utils.data.DataLoader`` with ``drop_last``; output ``float`` = normalised float32
[3, H, W] from the workers, ``uint8`` = uint8 [3, H, W], normalised later on the device as
FaceRecordDataModule does by default):

a. ``memory``      the bytes held in a Python list: decode_image + to_tensor (the ceiling)
b. ``record-map``  RecordDataset (random reads from train.rec)
c. ``record-stream`` RecordStream (sequential block reads + shuffle buffer)
d. ``folder-pil``  ImageFolder-style: PIL open/convert/flip, numpy -> float tensor, normalise

Timing covers a whole epoch including worker start-up (and the stream's buffer fill).
The ``a-raw`` row is decode + to_tensor in a plain loop, no DataLoader.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from facemargin.data.datasets import RecordDataset, RecordStream, StreamDataLoader
from facemargin.data.decode import decode_image, to_tensor, to_uint8_chw
from facemargin.data.faceset import FaceRecordSet
from facemargin.data.pack import write_faceset
from facemargin.data.synthetic import render_identity

BATCH = 128


# --------------------------------------------------------------------------- data
def make_images(records: int, identities: int, seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    """``records`` distinct JPEGs (sorted by identity) and their labels."""
    import simplejpeg

    rng = np.random.default_rng(seed)
    per_id = np.full(identities, records // identities)
    per_id[: records % identities] += 1
    images: list[bytes] = []
    labels: list[int] = []
    for ident in range(identities):
        base = render_identity(ident, 12, 112, seed)
        for j in range(int(per_id[ident])):
            img = base[j % len(base)].astype(np.int16)
            dy, dx = rng.integers(-4, 5, size=2)
            img = np.roll(img, (int(dy), int(dx)), axis=(0, 1))
            img = np.clip(img * rng.uniform(0.85, 1.15) + rng.integers(-10, 11), 0, 255).astype(np.uint8)
            images.append(simplejpeg.encode_jpeg(img, quality=90, colorspace="RGB"))
            labels.append(ident)
    return images, np.asarray(labels, dtype=np.int64)


def write_folder(root: Path, images: list[bytes], labels: np.ndarray) -> list[tuple[str, int]]:
    samples = []
    for i, (data, label) in enumerate(zip(images, labels.tolist())):
        d = root / f"{label:05d}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i:07d}.jpg"
        p.write_bytes(data)
        samples.append((str(p), label))
    return samples


# --------------------------------------------------------------------------- datasets
class MemoryDataset(Dataset):
    """(a) the same JPEG bytes in memory: decode + flip (+ normalise)."""

    def __init__(self, images: list[bytes], labels: np.ndarray, output: str, flip_p: float = 0.5) -> None:
        self.images, self.labels, self.output, self.flip_p = images, labels, output, flip_p

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        flip = bool(torch.rand(()) < self.flip_p)
        img = decode_image(self.images[i])
        x = to_uint8_chw(img, flip) if self.output == "uint8" else to_tensor(img, flip)
        return x, torch.tensor(int(self.labels[i]))


class FolderPILDataset(Dataset):
    """(d) a minimal torchvision-ImageFolder + ToTensor + Normalize equivalent on PIL."""

    def __init__(self, samples: list[tuple[str, int]], output: str, flip_p: float = 0.5) -> None:
        self.samples, self.output, self.flip_p = samples, output, flip_p

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        if torch.rand(()) < self.flip_p:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # PILToTensor
        if self.output == "float":
            x = x.float().div(255).sub(0.5).div(0.5)  # ToTensor + Normalize
        else:
            x = x.contiguous()
        return x, torch.tensor(label)


# --------------------------------------------------------------------------- timing
def _cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (DataLoader workers exit after each epoch)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


def run_loader(loader) -> tuple[float, float, int]:
    """``(wall seconds, CPU seconds, images)`` for one epoch (workers are started and joined inside)."""
    c0, t0 = _cpu_seconds(), time.perf_counter()
    n = 0
    it = iter(loader)
    for x, y in it:
        n += y.numel()
    del it  # join the workers so their CPU time is counted
    gc.collect()
    return time.perf_counter() - t0, _cpu_seconds() - c0, n


def time_raw(images: list[bytes]) -> tuple[float, float, int]:
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for i, data in enumerate(images):
        to_tensor(decode_image(data), flip=bool(i & 1))
    return time.perf_counter() - t0, _cpu_seconds() - c0, len(images)


METHODS = ("a-memory", "b-record-map", "c-record-stream", "d-folder-pil")
RATIOS = (
    ("b/a", "b-record-map", "a-memory", ">= 0.90"),
    ("c/a", "c-record-stream", "a-memory", ">= 0.90"),
    ("b/d", "b-record-map", "d-folder-pil", ">= 2.0"),
    ("c/d", "c-record-stream", "d-folder-pil", ">= 2.0"),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--identities", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument(
        "--outputs", nargs="+", default=["float", "uint8"], choices=["float", "uint8"],
        help="float: normalised float32 from the workers (dataset contract); uint8: normalise later on the device",
    )
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all methods (interleaved); medians reported")
    ap.add_argument("--shuffle-buffer", type=int, default=10_000)
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the data (default: a temp dir)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    tmp = tempfile.TemporaryDirectory(prefix="fm_bench_") if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    images, labels = make_images(args.records, args.identities)
    rec_root = work / "rec"
    write_faceset(rec_root, labels, iter(images), args.identities, (112, 112))
    samples = write_folder(work / "folder", images, labels)
    sizes = np.array([len(b) for b in images])
    print(
        f"data: {len(images)} records, {args.identities} identities, JPEG {sizes.mean() / 1024:.1f} KB mean "
        f"({np.percentile(sizes, 5) / 1024:.1f}-{np.percentile(sizes, 95) / 1024:.1f} KB p5-p95), "
        f"train.rec {os.path.getsize(rec_root / 'train.rec') / 2**20:.0f} MiB; generated in {time.perf_counter() - t:.0f}s",
        flush=True,
    )
    print(f"machine: {os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
          f"batch {BATCH}, repeats {args.repeats}")

    faceset = FaceRecordSet(rec_root)
    cols = [f"{w}/{out}" for w in args.workers for out in args.outputs]

    def loader_for(method: str, col: str, r: int):
        w_str, out = col.split("/")
        w = int(w_str)
        kw: dict = dict(num_workers=w)
        if w:
            kw.update(prefetch_factor=4)
        if method == "c-record-stream":
            s = RecordStream(faceset, batch_size=BATCH, shuffle_buffer=args.shuffle_buffer, rank=0, world_size=1,
                             output=out)
            s.set_epoch(r)
            return StreamDataLoader(s, **kw)
        ds = {
            "a-memory": lambda: MemoryDataset(images, labels, out),
            "b-record-map": lambda: RecordDataset(faceset, train=True, output=out),
            "d-folder-pil": lambda: FolderPILDataset(samples, out),
        }[method]()
        return DataLoader(ds, batch_size=BATCH, shuffle=True, drop_last=True, **kw)

    wall: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    for r in range(args.repeats):  # interleaved rounds: load changes hit every method alike
        dt, ct, n = time_raw(images)
        wall.setdefault(("a-raw", "loop"), []).append(n / dt)
        cpu.setdefault(("a-raw", "loop"), []).append(n / ct)
        for col in cols:
            for m in METHODS:
                dt, ct, n = run_loader(loader_for(m, col, r))
                wall.setdefault((m, col), []).append(n / dt)
                cpu.setdefault((m, col), []).append(n / ct)
                print(f"  round {r}: {m:16s} {col:8s} {n / dt:8,.0f} img/s  {n / ct:8,.0f} img/CPU-s", flush=True)

    med = {k: statistics.median(v) for k, v in wall.items()}
    medc = {k: statistics.median(v) for k, v in cpu.items()}
    head = " | ".join(f"w={c.split('/')[0]}, {c.split('/')[1]}" for c in cols)
    for title, table in (("wall-clock img/s", med), ("img per CPU-second (main + workers; robust to other load)", medc)):
        print(f"\n{title}, median of {args.repeats}\n")
        print(f"| method | {head} |")
        print("|---|" + "---|" * len(cols))
        for m in METHODS:
            print(f"| {m} | " + " | ".join(f"{table[(m, c)]:,.0f}" for c in cols) + " |")
        print(f"| a-raw (plain loop, float, 1 process) | {table[('a-raw', 'loop')]:,.0f} |" + " |" * (len(cols) - 1))
        print(f"\n| ratio | {head} | goal |")
        print("|---|" + "---|" * len(cols) + "---|")
        for label, num, den, goal in RATIOS:
            print(f"| {label} | " + " | ".join(f"{table[(num, c)] / table[(den, c)]:.2f}" for c in cols) + f" | {goal} |")
        if "uint8" in args.outputs and "float" in args.outputs:
            print("\nuint8 record loaders (FaceRecordDataModule default) vs the float32 ImageFolder+PIL pipeline:")
            for w in args.workers:
                d = table[("d-folder-pil", f"{w}/float")]
                b, c = table[("b-record-map", f"{w}/uint8")], table[("c-record-stream", f"{w}/uint8")]
                print(f"  workers={w}: b/d = {b / d:.2f}, c/d = {c / d:.2f}")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
