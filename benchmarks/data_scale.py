"""Start-up at MS1MV3 scale: open a 5.18 M-record set and get the first batch, per rank; import costs.

    git archive 95b6602 src | tar -x -C /tmp/fm-before      # the code before issue 11
    python benchmarks/data_scale.py --before-src /tmp/fm-before/src [--records 5179510] [--repeats 3]

The set is a *sparse* ``train.rec`` of the real size (image records every 7 KiB, ~36 GB apparent,
a few MB on disk): real records are written only where they are read -- the meta record, the
identity records (packed at the end, 40 bytes each, as insightface writes them) and the records of
the first 128-image batch of each implementation -- the rest are holes.
The ``.idx`` (5.2 M lines, ~90 MB) and ``property`` are complete, as in MS1MV3.

Each measurement is a fresh process (one rank: every rank of a job does the same work) that imports
the DataModule, opens the set (``prepare_data`` + ``setup``), builds the train loader
(``num_workers=0``) and takes its first batch; it reports seconds per step and peak RSS
(``ru_maxrss``) and the private (unshared) memory at the end. ``cold``: no cache (the first rank
of the first run); ``warm``: the index cache exists (every other rank and every later run; the old
code has no cache, so it is always cold). Import cost: ``python -c "import facemargin.data.pack"``.
Medians of ``--repeats`` runs; the machine is shared, so compare within one table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1] / "src"
STRIDE = 7168  # bytes per record slot: MS1MV3 averages ~7 KB per 112x112 JPEG record

_PROBE = r'''
import json, os, resource, sys, time
t0 = time.perf_counter()
from facemargin.data.module import FaceRecordDataModule
t1 = time.perf_counter()
dm = FaceRecordDataModule({root!r}, batch_size=128, num_workers=0, val_sets=[])
dm.prepare_data()
dm.setup("fit")
t2 = time.perf_counter()
loader = dm.train_dataloader()
batch = next(iter(loader))
t3 = time.perf_counter()
private = 0
with open("/proc/self/smaps_rollup") as f:
    for line in f:
        if line.startswith(("Private_Clean", "Private_Dirty")):
            private += int(line.split()[1])
print(json.dumps({{"import": t1 - t0, "open": t2 - t1, "first_batch": t3 - t2, "total": t3 - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "private_mb": private / 1024, "batch": list(batch[0].shape)}}))
'''


def first_batch_samples(n: int, src_kind: str) -> np.ndarray:
    """Sample indices of rank 0's first batch (world 1, seed 0, epoch 0) in each implementation."""
    if src_kind == "before":  # DistributedSampler: torch.randperm with a generator seeded seed + epoch
        import torch

        g = torch.Generator()
        g.manual_seed(0)
        return torch.randperm(n, generator=g)[:128].numpy()
    sys.path.insert(0, str(HERE))
    from facemargin.data.loading.plan import EpochPlan, PlanSpec

    return EpochPlan.start(PlanSpec(seed=0), 0, n, 1, 128).sequence(0)[:128]


def build(root: Path, records: int, classes: int) -> None:
    """The sparse insightface-layout set (skipped when already there)."""
    if (root / "property").is_file():
        return
    sys.path.insert(0, str(HERE))
    import simplejpeg

    from facemargin.data.formats.recordio import IRHeader, _encode_parts, pack_record

    root.mkdir(parents=True, exist_ok=True)
    a, b = records + 1, records + 1 + classes
    sizes = np.full(classes, records // classes)
    sizes[: records % classes] += 1
    bounds = np.r_[0, np.cumsum(sizes)] + 1
    labels = np.repeat(np.arange(classes), sizes)
    jpeg = simplejpeg.encode_jpeg(np.full((112, 112, 3), 128, np.uint8), quality=90, colorspace="RGB")
    with open(root / "train.rec", "wb") as f:
        f.truncate(a * STRIDE)  # holes for the images, then the records that are read
        f.seek(0)
        f.write(_encode_parts(pack_record(IRHeader(0, 0.0, 0, 0), b"", labels=[a, b])))
        f.seek(a * STRIDE)
        f.write(b"".join(_encode_parts(pack_record(IRHeader(0, 0.0, a + c, 0), b"", labels=[bounds[c], bounds[c + 1]]))
                         for c in range(classes)))
        wanted = np.union1d(first_batch_samples(records, "before"), first_batch_samples(records, "after"))
        for i in wanted.tolist():
            f.seek((i + 1) * STRIDE)
            f.write(_encode_parts(pack_record(IRHeader(0, float(labels[i]), i + 1, 0), jpeg)))
    keys = np.arange(b, dtype=np.int64)
    offsets = np.where(keys < a, keys * STRIDE, a * STRIDE + (keys - a) * 40)
    with open(root / "train.idx", "w") as f:
        for lo in range(0, b, 1_000_000):
            f.write("".join(f"{k}\t{o}\n" for k, o in zip(keys[lo: lo + 1_000_000].tolist(),
                                                           offsets[lo: lo + 1_000_000].tolist())))
    (root / "property").write_text(f"{classes},112,112")


def probe(src: Path, root: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, "-c", _PROBE.format(root=str(root))], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def import_cost(src: Path, module: str) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    code = (f"import resource, time; t = time.perf_counter(); import {module}; "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    seconds, rss = out.stdout.split()
    return float(seconds), float(rss)


def clear_caches(root: Path) -> None:
    for p in root.glob("*.npy"):
        p.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-src", type=Path, default=None, help="src/ of the code before (git archive)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/facemargin-scale"))
    parser.add_argument("--records", type=int, default=5_179_510)
    parser.add_argument("--classes", type=int, default=93_431)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = args.dir / f"set{args.records}"
    t = time.perf_counter()
    build(root, args.records, args.classes)
    print(f"set: {root} ({args.records} images, {args.classes} identities; built/checked in {time.perf_counter() - t:.0f} s)")
    trees = ([("before", args.before_src)] if args.before_src else []) + [("after", HERE)]
    rows = []
    for name, src in trees:
        states = ["cold"] if name == "before" else ["cold", "warm"]
        for state in states:
            runs = []
            for _ in range(args.repeats):
                if state == "cold":
                    clear_caches(root)
                runs.append(probe(src, root))
            med = {k: statistics.median(r[k] for r in runs) for k in ("import", "open", "first_batch", "total",
                                                                     "peak_rss_mb", "private_mb")}
            rows.append((name, state, med))
    print("\nopen + first batch, one rank (median of %d fresh processes)" % args.repeats)
    print("| code | cache | import DataModule s | open s | first batch s | total s | peak RSS MB | private MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, state, m in rows:
        print(f"| {name} | {state} | {m['import']:.2f} | {m['open']:.2f} | {m['first_batch']:.2f} | {m['total']:.2f} "
              f"| {m['peak_rss_mb']:.0f} | {m['private_mb']:.0f} |")
    print("\nimport cost (median of %d fresh processes)" % args.repeats)
    print("| code | module | seconds | peak RSS MB |")
    print("|---|---|---|---|")
    for name, src in trees:
        for module in ("facemargin.data.pack", "facemargin.data.inspect", "facemargin.data"):
            runs = [import_cost(src, module) for _ in range(args.repeats)]
            print(f"| {name} | {module} | {statistics.median(r[0] for r in runs):.2f} "
                  f"| {statistics.median(r[1] for r in runs):.0f} |")


if __name__ == "__main__":
    main()
