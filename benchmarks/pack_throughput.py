"""Packing throughput: ``python -m facemargin.data.pack`` vs MXNet ``im2rec.py --pass-through`` on the same JPEGs.

    python benchmarks/pack_throughput.py --images 5000 --repeats 5 --mxnet-python /work/mxvenv/bin/python

Data: ``--images`` procedural 112x112 faces (:mod:`facemargin.data.tools.synthetic`, JPEG quality 90,
about 5 KB each) in ``root/<identity>/<n>.jpg``, 50 per identity, in the page cache (warm reads:
this measures the packer's CPU cost, not the disk).

Rows (median of ``--repeats``, interleaved):

* ``im2rec pass-through``: the single-process loop of MXNet 1.9.1's ``tools/im2rec.py`` (its
  default ``--num-thread 1``), run in a separate interpreter that has MXNet (``--mxnet-python``;
  ``python3 -m venv /work/mxvenv && /work/mxvenv/bin/pip install mxnet==1.9.1 'numpy<1.24'
  opencv-python-headless``): ``read_list`` of a ready ``.lst``, then for each item im2rec's own
  ``image_encode`` (open, read, ``mx.recordio.pack``) and ``MXIndexedRecordIO.write_idx``, timed
  inside that process after the imports. Listing the tree (``im2rec --list``) is not timed.
* ``facemargin pack``: ``pack_images`` in this process, timed from listing the tree to the renamed
  files: it also reads every JPEG header (the size check) and writes the insightface meta and
  identity records.
* the same with ``--resize 112`` (every image already 112x112: copied, not re-encoded) and with
  ``--workers 2``; then ``--resize 96`` (every image decoded, resized and re-encoded), with 1 and
  2 workers: where worker processes pay off.

The script checks that every image payload in both ``.rec`` files is byte-identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg

from facemargin.data.formats.recordio import RecordIOReader, unpack_record
from facemargin.data.tools.pack import pack_images
from facemargin.data.tools.synthetic import render_identity

IM2REC_LOOP = r"""
import argparse, importlib.util, json, os, sys, time
import mxnet as mx
spec = importlib.util.spec_from_file_location("im2rec", os.path.join(os.path.dirname(mx.__file__), "tools", "im2rec.py"))
im2rec = importlib.util.module_from_spec(spec); spec.loader.exec_module(im2rec)
lst, root, prefix = sys.argv[1:4]
args = argparse.Namespace(root=root, pass_through=True, pack_label=False)
start = time.perf_counter()
# the single-process branch of im2rec.py's __main__ (num_thread == 1)
record = mx.recordio.MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "w")
q_out = im2rec.queue.Queue() if hasattr(im2rec, "queue") else __import__("queue").Queue()
count = 0
for i, item in enumerate(im2rec.read_list(lst)):
    im2rec.image_encode(args, i, item, q_out)
    if q_out.empty():
        continue
    _, s, _ = q_out.get()
    record.write_idx(item[0], s)
    count += 1
record.close()
print(json.dumps({"images": count, "seconds": time.perf_counter() - start, "mxnet": mx.__version__}))
"""


def make_tree(root: Path, images: int, per_identity: int = 50) -> Path:
    """JPEG tree + an im2rec ``.lst`` (``index<TAB>label<TAB>relative path``) in the packer's order."""
    rng = np.random.default_rng(0)
    lines = []
    for n in range(images):
        ident, j = divmod(n, per_identity)
        if j == 0:
            faces = render_identity(ident, 12, 112, 0)
            (root / f"{ident:05d}").mkdir(parents=True)
        img = np.clip(faces[j % 12].astype(np.int16) + rng.integers(-8, 9), 0, 255).astype(np.uint8)
        rel = f"{ident:05d}/{j:04d}.jpg"
        (root / rel).write_bytes(simplejpeg.encode_jpeg(img, quality=90, colorspace="RGB"))
        lines.append(f"{n}\t{ident}\t{rel}\n")
    lst = root.parent / "train.lst"
    lst.write_text("".join(lines))
    return lst


def run_im2rec(python: str, lst: Path, root: Path, prefix: Path) -> float:
    res = subprocess.run([python, "-c", IM2REC_LOOP, str(lst), str(root), str(prefix)],
                         capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return out["images"] / out["seconds"]


def run_pack(root: Path, out: Path, **kw) -> float:
    start = time.perf_counter()
    info = pack_images(root, out, progress=False, overwrite=True, **kw)
    return info["num_images"] / (time.perf_counter() - start)


def same_payloads(ours: Path, theirs: Path, n: int) -> bool:
    a = RecordIOReader(ours / "train.rec", ours / "train.idx")
    b = RecordIOReader(theirs.with_suffix(".rec"), theirs.with_suffix(".idx"))
    return all(unpack_record(a.read(k + 1))[2] == unpack_record(b.read(k))[2] for k in range(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mxnet-python", default="/work/mxvenv/bin/python")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        root = tmp / "images"
        lst = make_tree(root, args.images)
        rows = {
            "im2rec --pass-through (1 process)": lambda: run_im2rec(args.mxnet_python, lst, root, tmp / "mx"),
            "facemargin pack": lambda: run_pack(root, tmp / "fm"),
            "facemargin pack --resize 112": lambda: run_pack(root, tmp / "fm_r", resize=112),
            "facemargin pack --workers 2": lambda: run_pack(root, tmp / "fm_w", workers=2),
            "facemargin pack --resize 96": lambda: run_pack(root, tmp / "fm_96", resize=96),
            "facemargin pack --resize 96 --workers 2": lambda: run_pack(root, tmp / "fm_96w", resize=96, workers=2),
        }
        for fn in rows.values():  # warm-up: page cache, imports
            fn()
        assert same_payloads(tmp / "fm", tmp / "mx", args.images), "image payloads differ from im2rec's"
        rates: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.repeats):
            for name, fn in rows.items():
                rates[name].append(fn())
    base = statistics.median(rates["im2rec --pass-through (1 process)"])
    print(f"{args.images} JPEGs 112x112, median of {args.repeats}; image payloads identical to im2rec's")
    print(f"{'packer':36s} {'images/s':>9s} {'vs im2rec':>9s}   runs")
    for name, r in rates.items():
        m = statistics.median(r)
        print(f"{name:36s} {m:9.0f} {m / base:8.2f}x   {' '.join(f'{v:.0f}' for v in r)}")


if __name__ == "__main__":
    main()
