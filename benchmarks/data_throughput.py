"""Training-data throughput: facemargin's loaders vs MXNet 1.9.1 doing the same work on the same JPEG bytes.

    bash benchmarks/setup_mxnet_peer.sh ~/peers/mxnet          # once: prints the peer's python
    python benchmarks/data_throughput.py --mxnet-python ~/peers/mxnet/bin/python \\
        [--faces DIR] [--records 20480] [--repeats 5] [--workers 2] [--rows ...] [--json OUT]

Every row makes one epoch of ``uint8 [128, 3, 112, 112]`` RGB batches (``--faces``: the folder's
size) in random order with a random horizontal flip (p = 0.5), from the same JPEG bytes: a
``.rec`` in insightface's layout for facemargin and the Python reader, an im2rec-layout copy
(every key an image) for ``ImageRecordIter``. Rows run interleaved, ``--repeats`` rounds; medians.

One process, one thread (images per CPU-second of the process, ``getrusage``):

* ``decode-only``: ``simplejpeg.decode_jpeg`` into a buffer, nothing else (libjpeg-turbo's floor);
* ``fm-memory`` / ``fm-map`` / ``fm-stream`` / ``fm-folder``: facemargin's training loader with
  ``num_workers=0`` over the bytes held in memory / ``data=recordio`` map-style /
  ``data.streaming=true`` / ``data=folder``;
* ``fm-map-float``: ``fm-map`` then ``normalize_uint8`` in the process (float32 ``(x/255-0.5)/0.5``);
* ``mx-python-uint8``: insightface's ``MXFaceDataset`` read path (``MXIndexedRecordIO.read_idx``,
  ``recordio.unpack``, ``mx.image.imdecode().asnumpy()``), flip, HWC->CHW, ``np.stack`` per batch;
* ``mx-python-float``: the same plus its transform's float conversion (``ToTensor`` + ``Normalize``
  as numpy: float32, ``/255``, ``-0.5``, ``/0.5``; the ``ToPILImage`` copy left out);
* ``mx-iter-1``: ``mx.io.ImageRecordIter(preprocess_threads=1, dtype="uint8", shuffle=True,
  rand_mirror=True)``, timed from its construction to its destruction.

The training configuration (``--workers W``; images per CPU-second of *every* process involved,
and per wall-second):

* ``fm-map-Ww`` / ``fm-stream-Ww``: ``FaceRecordDataModule(num_workers=W)``'s train loader as
  training under a Trainer uses it (W DataLoader worker processes, ``prefetch_factor=4``, batches
  delivered to the main process: uint8 ``[128, 112, 112, 3]`` unflipped + the flips, the
  HWC->CHW turn and the flips left to the device's transfer hook), timed from building the
  DataModule to the workers' exit; CPU = this process (all threads) + the workers
  (``RUSAGE_CHILDREN`` once they are joined);
* ``fm-map-Ww-chw`` / ``fm-stream-Ww-chw``: the same loader with no device to finish the batch
  (``train_dataloader()`` outside a Trainer): the main process turns and flips each batch on the
  CPU, uint8 ``[128, 3, 112, 112]`` like ``ImageRecordIter``'s;
* ``base-map-Ww`` / ``base-stream-Ww`` (``--baseline-src DIR``): ``train_dataloader()`` of another
  facemargin checkout (e.g. before a change), in a helper process of its own (CPU = it + its workers);
* ``mx-iter-W``: ``ImageRecordIter(preprocess_threads=W)`` as MXNet runs it here: 1.x caps its
  decoding threads at ``max(nproc/2 - 1, 1)`` (1 on a 2-CPU machine; the table says how many ran);
  CPU = the peer process, all its threads;
* ``mx-iter-W-forced``: the same with W decoding threads really running (``omp_get_num_procs``
  shimmed through ``LD_PRELOAD``; needs a C compiler), only when the cap bites.

Data: ``--faces DIR`` (any folder of equally sized JPEG faces, e.g. real aligned 112x112 crops;
sub-folders = identities; used in turn up to ``--records``), else ``--records`` procedural faces
(:mod:`facemargin.data.tools.synthetic`, quality 90, ~5 KB). Everything is in the page cache: this
measures CPU cost, not the disk. Peer rows need ``--mxnet-python`` / ``$FACEMARGIN_MXNET_PYTHON``;
without it they are listed as not run and the exit status is 1 (``--allow-missing-peers``: 0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
from peers import Clock  # noqa: E402

from facemargin.data.formats.recordio import IRHeader, RecordIOWriter, pack_record  # noqa: E402
from facemargin.data.loading.loader import BatchReader, PlanSampler, TrainLoader  # noqa: E402
from facemargin.data.loading.normalize import normalize_uint8  # noqa: E402
from facemargin.data.loading.plan import PlanSpec  # noqa: E402
from facemargin.data.sources.base import FaceSource  # noqa: E402
from facemargin.data.sources.folder import FolderSource  # noqa: E402
from facemargin.data.sources.recordio import FaceRecordSet  # noqa: E402
from facemargin.data.tools.pack import write_faceset  # noqa: E402

BATCH = 128

# The peer: one persistent process per environment, one JSON command per line, one JSON answer.
_MXNET_SERVER = r'''
import json, resource, sys, time
import numpy as np
import mxnet as mx

def clock():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt, time.perf_counter()

def python_path(c, to_float):  # insightface's MXFaceDataset.__getitem__, then the batch
    rec = mx.recordio.MXIndexedRecordIO(c["idx"], c["rec"], "r")
    keys = [int(k) for k in open(c["keys"]).read().split()]
    rng = np.random.default_rng(c["seed"])
    n, batch = 0, []
    for k in rng.permutation(keys).tolist():
        header, img = mx.recordio.unpack(rec.read_idx(k))
        label = header.label if isinstance(header.label, float) else header.label[0]
        a = mx.image.imdecode(img).asnumpy()
        if rng.random() < 0.5:
            a = a[:, ::-1]
        if to_float:  # ToTensor + Normalize(0.5, 0.5)
            t = np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32)
            t /= 255.0; t -= 0.5; t /= 0.5
        else:
            t = a.transpose(2, 0, 1)
        batch.append(t)
        if len(batch) == c["batch"]:
            np.stack(batch); n += len(batch); batch = []
    rec.close()
    return n

def record_iter(c):
    it = mx.io.ImageRecordIter(path_imgrec=c["rec"], path_imgidx=c["idx"], data_shape=tuple(c["shape"]),
                               batch_size=c["batch"], shuffle=True, rand_mirror=True, seed=c["seed"],
                               preprocess_threads=c["threads"], dtype="uint8")
    n = 0
    for b in it:
        b.data[0].wait_to_read(); n += c["batch"] - b.pad
    del it
    return n

print(json.dumps({"ready": mx.__version__}), flush=True)
for line in sys.stdin:
    c = json.loads(line)
    cpu0, flt0, wall0 = clock()
    n = record_iter(c) if c["mode"] == "iter" else python_path(c, c["mode"] == "python-float")
    cpu1, flt1, wall1 = clock()
    print(json.dumps({"images": n, "cpu": cpu1 - cpu0, "wall": wall1 - wall0, "minflt": flt1 - flt0}), flush=True)
'''


class MxPeer:
    """A persistent MXNet process (imports paid once); its stderr (MXNet's log) goes to a file."""

    def __init__(self, python: str, log: Path, preload: Path | None = None, script: str = _MXNET_SERVER,
                 env: dict[str, str] | None = None) -> None:
        env = env or peers.peer_env(**({"LD_PRELOAD": str(preload)} if preload else {}))
        self.log = log
        self.proc = subprocess.Popen([python, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log.open("w"), text=True, env=env)
        self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"the MXNet peer died: {self.log.read_text()[-800:]}")
        return json.loads(line)

    def run(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._answer()

    def threads_used(self) -> int | None:
        """Decoding threads of the last ``ImageRecordIter``, from MXNet's own log line."""
        found = re.findall(r"use (\d+) threads for decoding", self.log.read_text())
        return int(found[-1]) if found else None

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait()


# Another facemargin checkout's DataModule loader (``--baseline-src``), served like the peer.
_BASELINE_SERVER = r'''
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from facemargin.data.module import FaceRecordDataModule

def clock():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime, s.ru_minflt + c.ru_minflt, time.perf_counter()

print(json.dumps({"ready": FaceRecordDataModule.__module__}), flush=True)
for line in sys.stdin:
    c = json.loads(line)
    s0, c0, f0, w0 = clock()
    dm = FaceRecordDataModule(c["root"], batch_size=c["batch"], num_workers=c["workers"], streaming=c["streaming"],
                              seed=c["seed"])
    n = 0
    for images, _, _ in dm.train_dataloader():
        n += images.shape[0]
    s1, c1, f1, w1 = clock()
    print(json.dumps({"images": n, "cpu": s1 - s0 + c1 - c0, "children": c1 - c0, "wall": w1 - w0,
                      "minflt": f1 - f0}), flush=True)
'''


class MemorySource(FaceSource):
    """The same bytes held in memory: the reader's ceiling (no storage, no record parsing)."""

    def __init__(self, images: list[bytes], labels: np.ndarray, size: tuple[int, int]) -> None:
        self.images, self._labels = images, labels
        self.name, self.num_classes, self.image_size = "memory", int(labels.max()) + 1, size

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


def loader_epoch(source: FaceSource, spec: PlanSpec, epoch: int, to_float: bool = False) -> dict:
    """One epoch of the training loader in this process (``num_workers=0``)."""
    start = Clock.now()
    sampler = PlanSampler(source, BATCH, spec, epoch=epoch)
    n = 0
    for images, _, _ in TrainLoader(BatchReader(source, seed=spec.seed), sampler, num_workers=0):
        if to_float:
            normalize_uint8(images)
        n += images.shape[0]
    return {"images": n, **Clock.now().since(start)}


def training_epoch(root: Path, streaming: bool, workers: int, epoch: int, on_device: bool = True) -> dict:
    """One epoch of the DataModule's train loader with ``workers`` worker processes (``on_device``: as under a
    Trainer, the HWC->CHW turn and flips left to the device; else made on the CPU in this process)."""
    from facemargin.data.module import FaceRecordDataModule

    start = Clock.now()
    dm = FaceRecordDataModule(str(root), batch_size=BATCH, num_workers=workers, streaming=streaming, seed=epoch)
    loader = dm.training_loader(layout_on_device=on_device)
    n = 0
    for _, labels, _ in loader:
        n += labels.shape[0]
    loader.close()  # joins the (persistent) workers: their CPU time lands in RUSAGE_CHILDREN
    return {"images": n, **Clock.now().since(start)}


def decode_only(images: list[bytes], size: tuple[int, int]) -> dict:
    import simplejpeg

    out = np.empty((*size, 3), np.uint8)
    start = Clock.now()
    for data in images:
        simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
    return {"images": len(images), **Clock.now().since(start)}


def write_sets(work: Path, images: list[bytes], labels: np.ndarray, size: tuple[int, int]) -> None:
    """The same bytes as an insightface set, an im2rec-layout set and an image folder."""
    write_faceset(work / "rec", labels, iter(images), int(labels.max()) + 1, size)
    with RecordIOWriter(work / "im2rec.rec", work / "im2rec.idx") as w:  # ImageRecordIter wants every key an image
        for k, (lab, data) in enumerate(zip(labels.tolist(), images)):
            w.write(k, pack_record(IRHeader(0, float(lab), k, 0), data))
    for i, (lab, data) in enumerate(zip(labels.tolist(), images)):
        path = work / "folder" / f"{lab:05d}" / f"{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (work / "keys.txt").write_text(" ".join(str(k) for k in range(1, len(images) + 1)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faces", default=None, metavar="DIR", help="a folder of equally sized JPEG faces (default: procedural)")
    ap.add_argument("--records", type=int, default=20_480, help="images per epoch (a multiple of 128 avoids padding)")
    ap.add_argument("--identities", type=int, default=400, help="procedural identities")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers = ImageRecordIter threads")
    ap.add_argument("--rows", default=None, help="comma-separated rows to run (default: all)")
    ap.add_argument("--json", default=None, metavar="OUT", help="write every run and the medians here")
    ap.add_argument("--baseline-src", default=None, metavar="DIR",
                    help="another facemargin checkout's src/ (e.g. before a change): rows base-map-Ww, base-stream-Ww")
    peers.add_peer_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    W = args.workers
    work = peers.scratch("fm_throughput_")
    os.environ["FACEMARGIN_CACHE"] = str(work / "cache")
    peer_list: list[MxPeer] = []
    try:
        if args.faces:
            faces, face_labels, _ = peers.load_faces(args.faces)
            images, labels = peers.cycle_faces(faces, face_labels, args.records)
            what = f"{len(faces)} JPEG faces from {args.faces}, used in turn"
        else:
            images, labels = peers.procedural_faces(args.records, args.identities)
            what = "procedural faces (quality 90)"
        size = peers.jpeg_size(images[0], "image 0")
        write_sets(work, images, labels, size)
        kb = np.mean([len(b) for b in images]) / 1024
        print(f"data: {len(images)} images, {size[1]}x{size[0]}, {kb:.1f} KB mean: {what}; batch {BATCH}, "
              f"{W} workers / threads; {args.repeats} interleaved rounds, medians")
        print(f"machine: {peers.machine_line()}; torch {torch.__version__}")

        missing: dict[str, str] = {}
        notes: list[str] = []
        record, memory = FaceRecordSet(work / "rec"), MemorySource(images, labels, size)
        folder = FolderSource(work / "folder")
        rows: dict[str, Callable[[int], dict]] = {
            "decode-only": lambda r: decode_only(images, size),
            "fm-memory": lambda r: loader_epoch(memory, PlanSpec(seed=r), r),
            "fm-map": lambda r: loader_epoch(record, PlanSpec(seed=r), r),
            "fm-map-float": lambda r: loader_epoch(record, PlanSpec(seed=r), r, to_float=True),
            "fm-stream": lambda r: loader_epoch(record, PlanSpec(seed=r, streaming=True), r),
            "fm-folder": lambda r: loader_epoch(folder, PlanSpec(seed=r), r),
            f"fm-map-{W}w": lambda r: training_epoch(work / "rec", False, W, r),
            f"fm-stream-{W}w": lambda r: training_epoch(work / "rec", True, W, r),
            f"fm-map-{W}w-chw": lambda r: training_epoch(work / "rec", False, W, r, on_device=False),
            f"fm-stream-{W}w-chw": lambda r: training_epoch(work / "rec", True, W, r, on_device=False),
        }
        base_rows = [f"base-map-{W}w", f"base-stream-{W}w"]
        if args.baseline_src:
            env = {**os.environ, "PYTHONPATH": str(Path(args.baseline_src).resolve()), "OMP_NUM_THREADS": "1"}
            baseline = MxPeer(sys.executable, work / "base.log", script=_BASELINE_SERVER, env=env)
            peer_list.append(baseline)
            for name, streaming in zip(base_rows, (False, True)):
                rows[name] = (lambda st: lambda r: baseline.run(root=str(work / "rec"), batch=BATCH, workers=W,
                                                            streaming=st, seed=r))(streaming)
            notes.append(f"base-*: facemargin from {args.baseline_src}")
        mx_rows = ["mx-python-uint8", "mx-python-float", "mx-iter-1", f"mx-iter-{W}", f"mx-iter-{W}-forced"]
        wanted = args.rows.split(",") if args.rows else [*rows, *mx_rows]
        unknown = [r for r in wanted if r not in rows and r not in mx_rows and r not in base_rows]
        missing.update({r: "no --baseline-src given" for r in base_rows if r in wanted and r not in rows})
        if unknown:
            raise SystemExit(f"unknown rows {unknown}; known: {[*rows, *mx_rows]}")
        want_mx = [r for r in mx_rows if r in wanted]
        if want_mx:
            python, said = peers.check_mxnet(args.mxnet_python)
            if python is None:
                missing.update({r: said for r in want_mx})
            else:
                notes.append(f"peer: {said}")
                base = dict(batch=BATCH, shape=[3, *size], seed=0)
                ins = dict(rec=str(work / "rec/train.rec"), idx=str(work / "rec/train.idx"), keys=str(work / "keys.txt"))
                im2 = dict(rec=str(work / "im2rec.rec"), idx=str(work / "im2rec.idx"))
                plain = MxPeer(python, work / "mx.log")
                peer_list.append(plain)

                def mx(peer: MxPeer, **c) -> Callable[[int], dict]:
                    return lambda r: peer.run(**{**base, **c, "seed": r})

                rows["mx-python-uint8"] = mx(plain, mode="python-uint8", **ins)
                rows["mx-python-float"] = mx(plain, mode="python-float", **ins)
                rows["mx-iter-1"] = mx(plain, mode="iter", threads=1, **im2)
                rows[f"mx-iter-{W}"] = mx(plain, mode="iter", threads=W, **im2)
                rows[f"mx-iter-{W}"](0)  # warm-up, and ask MXNet how many threads it runs
                ran = plain.threads_used()
                notes.append(f"mx-iter-{W}: MXNet ran {ran} decoding thread(s) for preprocess_threads={W}")
                if f"mx-iter-{W}-forced" in wanted and ran is not None and ran < W:
                    lib, said = peers.omp_procs_shim(2 * (W + 1), work)
                    if lib is None:
                        missing[f"mx-iter-{W}-forced"] = said
                    else:
                        forced = MxPeer(python, work / "mx_forced.log", preload=lib)
                        peer_list.append(forced)
                        rows[f"mx-iter-{W}-forced"] = mx(forced, mode="iter", threads=W, **im2)
                        rows[f"mx-iter-{W}-forced"](0)
                        notes.append(f"mx-iter-{W}-forced: {said}: MXNet ran {forced.threads_used()} decoding threads")
                elif f"mx-iter-{W}-forced" in wanted:
                    notes.append(f"mx-iter-{W}-forced: not needed, MXNet runs {ran} decoding threads unforced")
        order = [r for r in wanted if r in rows]
        for name in order:  # warm-up: page cache, imports, index caches
            rows[name](0)
        runs: dict[str, list[dict]] = {r: [] for r in order}
        loads: list[float] = []
        for k in range(1, args.repeats + 1):
            loads.append(os.getloadavg()[0])
            for name in order:
                runs[name].append(rows[name](k))
            print(f"  round {k} (load {loads[-1]:.1f}): " + ", ".join(
                f"{m} {v[-1]['images'] / v[-1]['cpu']:,.0f}" for m, v in runs.items()), flush=True)
    finally:
        for p in peer_list:
            p.close()
        shutil.rmtree(work, ignore_errors=True)

    med = {m: {key: statistics.median(run.get(key, 0) / run["images"] for run in v)
               for key in ("cpu", "wall", "minflt", "children")} for m, v in runs.items()}
    print(f"\nload average during the rounds: {min(loads):.1f}-{max(loads):.1f} ({os.cpu_count()} CPUs)")
    for note in notes:
        print(note)
    print("\n| row | images / CPU-s | images / wall-s | µs CPU / image (of it: worker processes) | minor faults / batch |")
    print("|---|---|---|---|---|")
    for m, v in med.items():
        workers = f" ({1e6 * v['children']:.0f})" if v["children"] else ""
        print(f"| {m} | {1 / v['cpu']:,.0f} | {1 / v['wall']:,.0f} | {1e6 * v['cpu']:.0f}{workers} | {v['minflt'] * BATCH:,.0f} |")
    pairs = [
        ("fm-map / mx-python-uint8", "fm-map", "mx-python-uint8", "1 process each; uint8 batch"),
        ("fm-map-float / mx-python-float (the insightface path)", "fm-map-float", "mx-python-float",
         "1 process each; float32 normalised batch"),
        ("fm-map / mx-iter-1", "fm-map", "mx-iter-1", "1 process / 1 decoding thread; uint8 batch"),
        (f"fm-map-{W}w / mx-iter-{W}", f"fm-map-{W}w", f"mx-iter-{W}", f"{W} workers vs preprocess_threads={W} as MXNet runs it"),
        (f"fm-stream-{W}w / mx-iter-{W}", f"fm-stream-{W}w", f"mx-iter-{W}", "the same, streaming"),
        (f"fm-map-{W}w / mx-iter-{W}-forced", f"fm-map-{W}w", f"mx-iter-{W}-forced", f"{W} workers vs {W} decoding threads"),
        (f"fm-stream-{W}w / mx-iter-{W}-forced", f"fm-stream-{W}w", f"mx-iter-{W}-forced", "the same, streaming"),
        (f"fm-map-{W}w-chw / mx-iter-{W}-forced", f"fm-map-{W}w-chw", f"mx-iter-{W}-forced",
         "the same, CHW batch turned and flipped on the CPU (no device)"),
        (f"fm-stream-{W}w-chw / mx-iter-{W}-forced", f"fm-stream-{W}w-chw", f"mx-iter-{W}-forced", "the same, streaming"),
        (f"base-map-{W}w / mx-iter-{W}-forced", f"base-map-{W}w", f"mx-iter-{W}-forced", "--baseline-src's loader"),
        (f"base-stream-{W}w / mx-iter-{W}-forced", f"base-stream-{W}w", f"mx-iter-{W}-forced", "the same, streaming"),
        (f"fm-map-{W}w / base-map-{W}w", f"fm-map-{W}w", f"base-map-{W}w", "this tree over --baseline-src"),
        (f"fm-stream-{W}w / base-stream-{W}w", f"fm-stream-{W}w", f"base-stream-{W}w", "the same, streaming"),
        ("fm-map / fm-memory", "fm-map", "fm-memory", "reader cost over the in-memory ceiling"),
        ("fm-stream / fm-memory", "fm-stream", "fm-memory", ""),
        ("fm-folder / fm-memory", "fm-folder", "fm-memory", ""),
    ]
    ratios = peers.print_ratios(med, pairs, "ratio (goal >= 1.0 against the peer)")
    if args.json:
        Path(args.json).write_text(json.dumps({"notes": notes, "loads": loads, "runs": runs, "median_per_image": med,
                                               "ratios": ratios, "missing": missing}, indent=1))
    return peers.report_missing(missing, args.allow_missing_peers)


if __name__ == "__main__":
    sys.exit(main())
