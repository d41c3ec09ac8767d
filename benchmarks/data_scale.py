"""Start-up at WebFace42M scale: open a 42 M-image, 2 M-identity set per rank, first vs cached, and a
second rank while the first builds the cache; the DataModule's open + first batch; import costs.

    git archive 18f950b src | tar -x -C /tmp/fm-before     # the code before issue 19 item 6/10
    python benchmarks/data_scale.py --before-src /tmp/fm-before/src [--records 42000000 --classes 2000000]
    python benchmarks/data_scale.py --records 5179510 --classes 93431      # MS1MV3 scale

The set is an insightface-layout ``train.rec`` of the real size written *sparse*: image records sit
every 7 KiB (MS1MV3's mean; ~300 GB apparent at 42 M images, a few hundred MB on disk), but only the
records that opening and the first batch read exist -- the meta record (key 0), the identity
records (packed at the end, 40 bytes each, as insightface writes them) and the 128 images of rank
0's first batch (each filling its 7 KiB slot exactly, padded with a JPEG comment) -- the rest are
holes. That is a fair stand-in because opening reads nothing else: the ``.idx`` (44 M lines, ~1 GB,
complete and real), ``property``, the meta and identity records; no image header is read at open
(``python -m facemargin.data.inspect`` would read them all and fail on the holes). Float32 labels
hold integers exactly only below 2**24, so identity boundaries above that are multiples of 4 (the
generator places them so; a packer must too).

Each measurement is a fresh process (a rank; every rank of a job does the same work):

* ``set``: ``FaceRecordSet(SetFiles.at(root))`` (numpy only), then the first batch's 128 records
  read (``read_raws``), parsed and decoded. CPU seconds (``process_time``: user + system) and wall
  seconds of the open and of the batch, RSS after the imports, the process's peak RSS (``VmHWM``)
  after the open and after the batch, and its anonymous memory (``RssAnon``: what the process holds
  on its own) at the end. RSS also counts the page-cache pages of the mapped cache a process has
  touched (shared by every rank; the kernel maps whole large folios, ~1 MB a random access).
  ``first``: no cache; ``cached``: the cache exists; ``rank 0 (builds)`` / ``rank 1 (meanwhile)``:
  a second process started as the first begins to open, without a cache (it waits for the first
  one's cache, or parses too).
* ``datamodule``: ``FaceRecordDataModule`` (imports torch + Lightning), ``prepare_data`` +
  ``setup`` and the first batch of the training loader (``num_workers=0``, world 1: it includes
  the epoch plan's permutation of every sample).

Medians of ``--repeats`` runs. The machine may be shared: compare within one table. Files are
removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1] / "src"
STRIDE = 7168  # bytes per image record slot: MS1MV3 averages ~7 KB per 112x112 JPEG record
MAGIC = 0xCED7230A

_MEMORY = r'''
def rss(field="VmRSS"):  # MB; VmHWM: the peak of this process (ru_maxrss would count the parent's at fork)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
'''

_SET_PROBE = _MEMORY + r'''
import json, os, sys, time
c0, w0 = time.process_time(), time.perf_counter()
import numpy as np
from facemargin.data.formats.image import decode_face
from facemargin.data.formats.setfiles import SetFiles
from facemargin.data.sources.recordio import FaceRecordSet
c1, w1, r1 = time.process_time(), time.perf_counter(), rss()
print("opening", file=sys.stderr, flush=True)
fs = FaceRecordSet(SetFiles.at({root!r}))
c2, w2, h2 = time.process_time(), time.perf_counter(), rss("VmHWM")
idx = np.load({batch!r})
images = [decode_face(fs.parse(int(i), raw)[1], fs.image_size) for i, raw in zip(idx, fs.read_raws(idx))]
c3, w3 = time.process_time(), time.perf_counter()
private = 0
with open("/proc/self/smaps_rollup") as f:
    for line in f:
        if line.startswith(("Private_Clean", "Private_Dirty")):
            private += int(line.split()[1])
print(json.dumps({{"import_cpu": c1 - c0, "open_cpu": c2 - c1, "open_wall": w2 - w1, "batch_cpu": c3 - c2,
                  "batch_wall": w3 - w2, "rss_before_open_mb": r1, "peak_open_mb": h2, "peak_rss_mb": rss("VmHWM"),
                  "anon_mb": rss("RssAnon"), "private_mb": private / 1024, "images": len(images), "samples": len(fs)}}))
'''

_DM_PROBE = _MEMORY + r'''
import json, os, sys, time
c0, w0 = time.process_time(), time.perf_counter()
from facemargin.data.module import FaceRecordDataModule
c1, w1, r1 = time.process_time(), time.perf_counter(), rss()
dm = FaceRecordDataModule({root!r}, batch_size=128, num_workers=0, val_sets=[])
dm.prepare_data()
dm.setup("fit")
c2, w2, h2 = time.process_time(), time.perf_counter(), rss("VmHWM")
batch = next(iter(dm.train_dataloader()))
c3, w3 = time.process_time(), time.perf_counter()
print(json.dumps({{"import_cpu": c1 - c0, "open_cpu": c2 - c1, "open_wall": w2 - w1, "batch_cpu": c3 - c2,
                  "batch_wall": w3 - w2, "rss_before_open_mb": r1, "peak_open_mb": h2, "peak_rss_mb": rss("VmHWM"),
                  "anon_mb": rss("RssAnon"), "batch": list(batch[0].shape)}}))
'''


# --------------------------------------------------------------------------- the set
def identity_bounds(images: int, classes: int) -> np.ndarray:
    """``bounds[c] .. bounds[c+1]-1``: identity ``c``'s image keys; every bound but the first a multiple of
    4 (float32 labels hold them exactly up to 2**26)."""
    c = np.arange(classes + 1, dtype=np.int64)
    bounds = 4 * ((c * (images + 1)) // (4 * classes))
    bounds[0], bounds[-1] = 1, images + 1
    if not bool(np.all(np.diff(bounds) > 0)):
        raise SystemExit(f"{images} images are too few for {classes} identities")
    return bounds


def idx_text(keys: np.ndarray, offsets: np.ndarray, block: int = 1 << 20):
    """``key<TAB>offset\\n`` lines as bytes, in blocks, formatted with NumPy (no per-line Python)."""
    for lo in range(0, keys.size, block):
        k, o = keys[lo: lo + block], offsets[lo: lo + block]
        # runs of equal digit counts: fixed-width rows
        wk = np.searchsorted(10 ** np.arange(1, 19, dtype=np.int64), k, side="right") + 1
        wo = np.searchsorted(10 ** np.arange(1, 19, dtype=np.int64), o, side="right") + 1
        change = np.flatnonzero((np.diff(wk) != 0) | (np.diff(wo) != 0)) + 1
        for s, e in zip(np.r_[0, change], np.r_[change, k.size]):
            a, b = int(wk[s]), int(wo[s])
            rows = np.empty((e - s, a + b + 2), np.uint8)
            for width, values, col in ((a, k[s:e], 0), (b, o[s:e], a + 1)):
                for d in range(width):
                    rows[:, col + d] = (values // 10 ** (width - 1 - d)) % 10 + 48
            rows[:, a], rows[:, -1] = 9, 10
            yield rows.tobytes()


def padded_jpeg(size: int) -> bytes:
    """A 112x112 JPEG of exactly ``size`` bytes (a comment segment after SOI fills it)."""
    import simplejpeg

    jpeg = simplejpeg.encode_jpeg(np.full((112, 112, 3), 128, np.uint8), quality=90, colorspace="RGB")
    k = size - len(jpeg) - 4
    return jpeg[:2] + b"\xff\xfe" + (k + 2).to_bytes(2, "big") + bytes(k) + jpeg[2:]


def first_batch(n: int) -> np.ndarray:
    """Sample indices of rank 0's first batch (world 1, seed 0, epoch 0)."""
    sys.path.insert(0, str(HERE))
    from facemargin.data.loading.plan import EpochPlan, PlanSpec

    return np.asarray(EpochPlan.start(PlanSpec(seed=0), 0, n, 1, 128).sequence(0)[:128], np.int64)


def build(root: Path, images: int, classes: int) -> None:
    """The sparse insightface-layout set (kept when already there)."""
    if (root / "property").is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    a, b = images + 1, images + 1 + classes
    bounds = identity_bounds(images, classes)
    if not (a % 4 == 0 or a < 1 << 24) or not (b % 4 == 0 or b < 1 << 24):
        raise SystemExit(f"pick --records so that records + 1 and records + 1 + classes are multiples of 4 (got {a}, {b})")
    head = np.zeros(10, np.uint32)  # meta record: magic, lrec, flag 2, label, id (2), id2 (2), labels (a, b)
    head[:3] = MAGIC, 32, 2
    head[8:] = np.asarray([a, b], np.float32).view(np.uint32)
    ident = np.zeros((classes, 10), np.uint32)  # magic, lrec, flag, label, id (2), id2 (2), first_key, end_key
    ident[:, 0], ident[:, 1], ident[:, 2] = MAGIC, 32, 2
    ident[:, 4] = np.arange(a, b, dtype=np.uint32)
    ident[:, 8] = bounds[:-1].astype(np.float32).view(np.uint32)
    ident[:, 9] = bounds[1:].astype(np.float32).view(np.uint32)
    assert np.array_equal(ident[:, 8:].view(np.float32).astype(np.int64), np.c_[bounds[:-1], bounds[1:]])
    batch = first_batch(images)
    jpeg = padded_jpeg(STRIDE - 32)
    ident_at = 40 + (a - 1) * STRIDE  # meta record (40 bytes), the image slots, the identity records
    with open(root / "train.rec", "wb") as f:
        f.truncate(ident_at + 40 * classes)  # holes for the images
        f.write(head.tobytes())
        f.seek(ident_at)
        f.write(ident.tobytes())
        for i in batch.tolist():
            key = i + 1
            label = int(np.searchsorted(bounds, key, side="right")) - 1
            rec = np.asarray([MAGIC, STRIDE - 8, 0], np.uint32).tobytes() + np.float32(label).tobytes()
            f.seek(40 + (key - 1) * STRIDE)
            f.write(rec + np.asarray([key, 0], np.uint64).tobytes() + jpeg)
    keys = np.arange(b, dtype=np.int64)
    offsets = np.where(keys < a, np.maximum(40 + (keys - 1) * STRIDE, 0), ident_at + (keys - a) * 40)
    with open(root / "train.idx", "wb") as f:
        for block in idx_text(keys, offsets):
            f.write(block)
    np.save(root / "first_batch.npy", batch)
    (root / "property").write_text(f"{classes},112,112")


# --------------------------------------------------------------------------- measurements
def _env(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src), "WANDB_MODE": "offline"}


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"probe failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def start(src: Path, code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], env=_env(src), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def set_probe(root: Path) -> str:
    return _SET_PROBE.format(root=str(root), batch=str(root / "first_batch.npy"))


def two_ranks(src: Path, root: Path) -> tuple[dict, dict]:
    """Rank 0 and a rank 1 started as rank 0 begins to open (no cache yet)."""
    first = start(src, set_probe(root))
    line = first.stderr.readline()
    if "opening" not in line:
        raise SystemExit(f"probe failed:\n{line}{first.stderr.read()[-3000:]}")
    second = start(src, set_probe(root))
    return _result(first), _result(second)


def first_and_cached(src: Path, root: Path, code: str, repeats: int) -> list[tuple[str, list[dict]]]:
    """Runs of ``code`` without a cache (each run clears it), then with the cache the last one left."""
    first = []
    for _ in range(repeats):
        clear_caches(root)
        first.append(_result(start(src, code)))
    return [("first", first), ("cached", [_result(start(src, code)) for _ in range(repeats)])]


def import_cost(src: Path, module: str) -> tuple[float, float]:
    code = _MEMORY + (f"import time; t = time.process_time(); import {module}; "
                      "print(time.process_time() - t, rss('VmHWM'))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(src), capture_output=True, text=True, check=True)
    seconds, rss = out.stdout.split()
    return float(seconds), float(rss)


def clear_caches(root: Path) -> None:
    for p in root.glob("*.npy*"):
        if p.name != "first_batch.npy":
            p.unlink()


def median(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-src", type=Path, default=None, help="src/ of the code before (git archive)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/facemargin-scale"))
    parser.add_argument("--records", type=int, default=42_000_003, help="images")
    parser.add_argument("--classes", type=int, default=2_000_000, help="identities")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: set,ranks,datamodule,imports")
    parser.add_argument("--keep", action="store_true", help="keep the generated set (default: removed at the end)")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    root = args.dir / f"set{args.records}x{args.classes}"
    t = time.perf_counter()
    build(root, args.records, args.classes)
    idx_mb = (root / "train.idx").stat().st_size / 2**20
    print(f"set: {root} ({args.records} images, {args.classes} identities, .idx {idx_mb:.0f} MB; "
          f"built/checked in {time.perf_counter() - t:.0f} s)")
    trees = ([("before", args.before_src)] if args.before_src else []) + [("after", HERE)]
    try:
        rows = []
        for name, src in trees:
            for what, code in (("set", set_probe(root)), ("datamodule", _DM_PROBE.format(root=str(root)))):
                if what not in skip:
                    rows += [(name, what, state, runs) for state, runs in first_and_cached(src, root, code, args.repeats)]
                if what == "set" and "ranks" not in skip:
                    pairs = []
                    for _ in range(args.repeats):
                        clear_caches(root)
                        pairs.append(two_ranks(src, root))
                    rows.append((name, "set", "rank 0 (builds)", [p[0] for p in pairs]))
                    rows.append((name, "set", "rank 1 (meanwhile)", [p[1] for p in pairs]))
        print(f"\nopen + first batch per rank, {args.records} images / {args.classes} identities "
              f"(median of {args.repeats} fresh processes; CPU = user + system seconds)")
        print("| code | what | cache | open CPU s | open wall s | first batch CPU s | RSS before open MB "
              "| peak RSS, open MB | peak RSS, + batch MB | anonymous MB at end |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, what, state, runs in rows:
            print(f"| {name} | {what} | {state} | {median(runs, 'open_cpu'):.2f} | {median(runs, 'open_wall'):.2f} "
                  f"| {median(runs, 'batch_cpu'):.2f} | {median(runs, 'rss_before_open_mb'):.0f} "
                  f"| {median(runs, 'peak_open_mb'):.0f} | {median(runs, 'peak_rss_mb'):.0f} | {median(runs, 'anon_mb'):.0f} |")
        if "imports" not in skip:
            print(f"\nimport cost (median of {args.repeats} fresh processes)")
            print("| code | module | CPU s | peak RSS MB |")
            print("|---|---|---|---|")
            for name, src in trees:
                for module in ("facemargin.data.pack", "facemargin.data.inspect", "facemargin.data"):
                    runs = [import_cost(src, module) for _ in range(args.repeats)]
                    print(f"| {name} | {module} | {statistics.median(r[0] for r in runs):.2f} "
                          f"| {statistics.median(r[1] for r in runs):.0f} |")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
