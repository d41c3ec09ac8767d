"""Read throughput: facemargin's readers vs in-memory decoding of the same bytes vs MXNet 1.9.1.

    python benchmarks/data_throughput.py --records 20000 --repeats 5 [--mxnet /work/mxvenv/bin/python]

Metric: images per CPU-second of one process (``time.process_time``: every thread counted;
robust to other load on a shared machine), one epoch per method, random order, random horizontal
flip, batches of 128 as ``uint8 [B, 3, 112, 112]``. Methods, interleaved in each round:

* ``decode-only``: ``simplejpeg.decode_jpeg`` of the bytes into a buffer, nothing else (the floor of
  any reader's cost: libjpeg-turbo);
* ``memory``: the bytes held in a list, through facemargin's loader (plan, decode into the batch,
  flip, layout) -- the in-memory ceiling of a reader;
* ``record-map``: ``data=recordio``, map-style (one ``pread`` per record);
* ``record-stream``: ``data=recordio data.streaming=true`` (one read per block of neighbours);
* ``folder``: ``data=folder`` over the same JPEG files;
* ``mxnet-python``: MXNet 1.9.1 as insightface's ``MXFaceDataset`` reads (``MXIndexedRecordIO.read_idx``,
  ``recordio.unpack``, ``mx.image.imdecode``, flip, stack) in a separate virtual environment;
* ``mxnet-iter``: MXNet's C++ ``ImageRecordIter`` (one preprocessing thread) on an im2rec-layout
  copy of the same records.

Data: ``--records`` procedural 112x112 faces (``facemargin.data.tools.synthetic``), each a distinct JPEG
(quality 90, ~5-6 KB like real aligned crops), in the page cache (CPU cost, not disk speed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

from facemargin.data.formats.recordio import IRHeader, RecordIOWriter, pack_record  # noqa: E402
from facemargin.data.loading.loader import BatchReader, PlanSampler, TrainLoader  # noqa: E402
from facemargin.data.loading.plan import PlanSpec  # noqa: E402
from facemargin.data.sources.base import FaceSource  # noqa: E402
from facemargin.data.sources.folder import FolderSource  # noqa: E402
from facemargin.data.sources.recordio import FaceRecordSet  # noqa: E402
from facemargin.data.tools.pack import write_faceset  # noqa: E402
from facemargin.data.tools.synthetic import render_identity  # noqa: E402

BATCH = 128

_MXNET = r'''
import json, os, sys, time
import numpy as np
import mxnet as mx
rec, idx, lst, mode, seed = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
keys = [int(k) for k in open(lst).read().split()]
rng = np.random.default_rng(seed)
t0 = time.process_time()
n = 0
if mode == "python":  # insightface's MXFaceDataset: read_idx, unpack, imdecode, then a flip
    r = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
    batch = []
    for k in rng.permutation(keys).tolist():
        header, img = mx.recordio.unpack(r.read_idx(k))
        label = header.label if isinstance(header.label, float) else header.label[0]
        a = mx.image.imdecode(img).asnumpy()
        if rng.random() < 0.5:
            a = a[:, ::-1]
        batch.append(a.transpose(2, 0, 1))
        if len(batch) == 128:
            np.stack(batch); n += 128; batch = []
else:  # the C++ ImageRecordIter, one preprocessing thread, uint8 output
    it = mx.io.ImageRecordIter(path_imgrec=rec, path_imgidx=idx, data_shape=(3, 112, 112), batch_size=128,
                               shuffle=True, rand_mirror=True, preprocess_threads=1, dtype="uint8", seed=seed)
    for b in it:
        b.data[0].wait_to_read(); n += 128
print(json.dumps({"images": n, "cpu": time.process_time() - t0}))
'''


def make_images(records: int, identities: int, seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    """``records`` distinct JPEGs sorted by identity, and their labels."""
    import simplejpeg

    rng = np.random.default_rng(seed)
    per_id = np.full(identities, records // identities)
    per_id[: records % identities] += 1
    images, labels = [], []
    for ident in range(identities):
        base = render_identity(ident, 12, 112, seed)
        for j in range(int(per_id[ident])):
            img = np.roll(base[j % len(base)].astype(np.int16), tuple(int(x) for x in rng.integers(-4, 5, 2)), axis=(0, 1))
            img = np.clip(img * rng.uniform(0.85, 1.15) + rng.integers(-10, 11), 0, 255).astype(np.uint8)
            images.append(simplejpeg.encode_jpeg(img, quality=90, colorspace="RGB"))
            labels.append(ident)
    return images, np.asarray(labels, dtype=np.int64)


class MemorySource(FaceSource):
    """The same bytes held in memory: the reader's ceiling (no storage, no record parsing)."""

    def __init__(self, images: list[bytes], labels: np.ndarray) -> None:
        self.images, self._labels = images, labels
        self.name, self.num_classes, self.image_size = "memory", int(labels.max()) + 1, (112, 112)

    def __len__(self) -> int:
        return len(self.images)

    def read_raw(self, i: int) -> bytes:
        return self.images[i]

    def parse(self, i: int, raw: bytes) -> tuple[int, bytes]:
        return int(self._labels[i]), raw

    def where(self, i: int) -> str:
        return f"memory[{i}]"

    def labels(self) -> np.ndarray:
        return self._labels


def epoch(source: FaceSource, spec: PlanSpec, epoch_no: int) -> tuple[int, float]:
    sampler = PlanSampler(source, BATCH, spec, epoch=epoch_no)
    loader = TrainLoader(BatchReader(source, seed=spec.seed), sampler, num_workers=0)
    t0, n = time.process_time(), 0
    for images, _, _ in loader:
        n += images.shape[0]
    return n, time.process_time() - t0


def decode_only(images: list[bytes]) -> tuple[int, float]:
    import simplejpeg

    out = np.empty((112, 112, 3), np.uint8)
    t0 = time.process_time()
    for data in images:
        simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
    return len(images), time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--identities", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mxnet", default="/work/mxvenv/bin/python", help="a python with mxnet==1.9.1 ('' to skip)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="fm_throughput_"))
    images, labels = make_images(args.records, args.identities)
    write_faceset(work / "rec", labels, iter(images), args.identities, (112, 112))
    with RecordIOWriter(work / "im2rec.rec", work / "im2rec.idx") as w:  # ImageRecordIter wants every key an image
        for k, (lab, data) in enumerate(zip(labels.tolist(), images)):
            w.write(k, pack_record(IRHeader(0, float(lab), k, 0), data))
    for i, (lab, data) in enumerate(zip(labels.tolist(), images)):
        path = work / "folder" / f"{lab:05d}" / f"{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (work / "keys.txt").write_text(" ".join(str(k) for k in range(1, len(images) + 1)))
    (work / "keys_im2rec.txt").write_text(" ".join(str(k) for k in range(len(images))))
    sizes = np.array([len(b) for b in images])
    print(f"data: {len(images)} JPEGs 112x112, {sizes.mean() / 1024:.1f} KB mean; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f} (shared machine); torch {torch.__version__}; batch {BATCH}; "
          f"{args.repeats} interleaved rounds, medians")

    record, folder, memory = FaceRecordSet(work / "rec"), FolderSource(work / "folder"), MemorySource(images, labels)
    methods = {
        "decode-only": lambda r: decode_only(images),
        "memory": lambda r: epoch(memory, PlanSpec(seed=r), r),
        "record-map": lambda r: epoch(record, PlanSpec(seed=r), r),
        "record-stream": lambda r: epoch(record, PlanSpec(seed=r, streaming=True), r),
        "folder": lambda r: epoch(folder, PlanSpec(seed=r), r),
    }
    mxnet_ok = bool(args.mxnet) and Path(args.mxnet).exists()
    if mxnet_ok:
        env = {**os.environ, "MXNET_CPU_WORKER_NTHREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}

        def mx(mode: str, rec: str, idx: str, keys: str):
            def run(r: int) -> tuple[int, float]:
                out = subprocess.run([args.mxnet, "-c", _MXNET, str(work / rec), str(work / idx), str(work / keys),
                                      mode, str(r)], env=env, capture_output=True, text=True, check=True)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                return res["images"], res["cpu"]
            return run

        methods["mxnet-python"] = mx("python", "rec/train.rec", "rec/train.idx", "keys.txt")
        methods["mxnet-iter"] = mx("iter", "im2rec.rec", "im2rec.idx", "keys_im2rec.txt")
    else:
        print("MXNet 1.9.1 not available: only the in-memory ceiling is compared")
    rates: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.repeats):
        for name, fn in methods.items():
            n, cpu = fn(r)
            rates[name].append(n / cpu)
        print(f"  round {r}: " + ", ".join(f"{m} {v[-1]:,.0f}" for m, v in rates.items()), flush=True)
    med = {m: statistics.median(v) for m, v in rates.items()}
    floor = 1e6 / med["decode-only"]
    print("\n| method | images / CPU-second | µs / image | µs / image beyond the JPEG decode |")
    print("|---|---|---|---|")
    for m, v in med.items():
        print(f"| {m} | {v:,.0f} | {1e6 / v:.0f} | {1e6 / v - floor:.0f} |")
    print("\n| ratio | value |")
    print("|---|---|")
    ratios = [("record-map / memory", "record-map", "memory"), ("record-stream / memory", "record-stream", "memory"),
              ("folder / memory", "folder", "memory")]
    if mxnet_ok:
        ratios += [("record-map / mxnet-python (goal >= 1.0)", "record-map", "mxnet-python"),
                   ("record-stream / mxnet-python", "record-stream", "mxnet-python"),
                   ("record-map / mxnet-iter", "record-map", "mxnet-iter")]
    for title, a, b in ratios:
        print(f"| {title} | {med[a] / med[b]:.2f} |")


if __name__ == "__main__":
    main()
