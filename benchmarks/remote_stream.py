"""Training from a set on an HTTP server vs the same set on disk: bytes/s and images/s.

    python benchmarks/remote_stream.py --images 8192 --workers 2 --repeats 3 --latency 0 0.01

Data: ``--images`` procedural 112x112 faces (:mod:`facemargin.data.tools.synthetic`, JPEG quality 90,
~5 KB each) packed as an insightface RecordIO set, served by a threaded HTTP/1.1 server on
127.0.0.1 from its own process (``tests/range_http.py``: Python's threaded ``http.server`` with
Range requests, keep-alive, no Nagle delay), from the page cache. The server shares the machine's
CPUs with the client: on a 2-core machine it takes CPU the client would use.
Loopback has no real latency or bandwidth limit, so at ``--latency 0`` the ratios show what the
remote *client* costs (requests, copies); a server started with ``--latency L`` answers every
request L seconds late, like a network round trip, which is what concurrent reads (``pread_many``)
and read-ahead must hide.

Rows (median of ``--repeats``, local and remote interleaved, same process):

* ``bytes, iter_range``: ``ByteSource.iter_range`` over the whole ``train.rec`` in 4 MiB blocks;
* ``bytes, pread per record``: one ``pread`` per record, in file order (no concurrency: latency-bound);
* ``epoch, streaming``: a full epoch of ``FaceRecordDataModule(streaming=True)`` batches (uint8
  images, labels, indices), ``--workers`` workers, batch 128;
* ``epoch, map-style``: the same with ``streaming=False`` (random reads, one request per image).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

from facemargin.data.module import FaceRecordDataModule  # noqa: E402
from facemargin.data.sources.recordio import FaceRecordSet  # noqa: E402
from facemargin.data.storage.source import open_source  # noqa: E402
from facemargin.data.tools.pack import write_faceset  # noqa: E402

# the test suite's server, found next to this script in the repository (no machine path)
SERVER = Path(__file__).resolve().parents[1] / "tests" / "range_http.py"


def server_url(proc: subprocess.Popen) -> str:
    """The URL a started server prints; a server that died says so, with its exit status."""
    line = proc.stdout.readline().strip()  # type: ignore[union-attr]
    if not line.startswith("http://"):
        proc.wait(timeout=10)
        raise SystemExit(f"the HTTP server {SERVER} did not start (exit {proc.returncode}; printed {line!r})")
    return line


def make_set(out: Path, images: int, per_identity: int = 32) -> Path:
    jpegs, labels = peers.procedural_faces(images, -(-images // per_identity))
    return write_faceset(out, labels, iter(jpegs), int(labels.max()) + 1, (112, 112))


def read_all(root: str, block: int = 4 << 20) -> float:
    src = open_source(f"{root.rstrip('/')}/train.rec" if "://" in root else os.path.join(root, "train.rec"))
    start, n = time.perf_counter(), 0
    for chunk in src.iter_range(0, src.size, block):
        n += len(chunk)
    return n / (time.perf_counter() - start)


def pread_records(root: str, offsets: np.ndarray) -> float:
    src = open_source(f"{root.rstrip('/')}/train.rec" if "://" in root else os.path.join(root, "train.rec"))
    start = time.perf_counter()
    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        src.pread(b - a, a)
    return (len(offsets) - 1) / (time.perf_counter() - start)


def epoch(root: str, streaming: bool, workers: int, number: int) -> float:
    dm = FaceRecordDataModule(root, batch_size=128, num_workers=workers, streaming=streaming, seed=0)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(number)
    start, n = time.perf_counter(), 0
    for images, _, _ in loader:
        n += images.shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency", type=float, nargs="+", default=[0.0, 0.01], help="server delays per request (s)")
    args = parser.parse_args()
    if not SERVER.is_file():
        raise SystemExit(f"{SERVER} not found: run this script from a facemargin checkout (it uses the tests' server)")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FACEMARGIN_CACHE"] = os.path.join(tmp, "cache")
        local = str(make_set(Path(tmp) / "www" / "set", args.images))
        offsets = np.sort(FaceRecordSet(local).index.offsets)
        servers = {lat: subprocess.Popen([sys.executable, str(SERVER), os.path.join(tmp, "www"), "3600", str(lat)],
                                         stdout=subprocess.PIPE, text=True) for lat in args.latency}
        try:
            where = {"local": local, **{f"http +{1000 * lat:g} ms": server_url(p) + "set"
                                        for lat, p in servers.items()}}
            rows = {
                "bytes, iter_range 4 MiB (MB/s)": lambda r, k: read_all(r) / 1e6,
                "bytes, pread per record (records/s)": lambda r, k: pread_records(r, offsets),
                "epoch, streaming (images/s)": lambda r, k: epoch(r, True, args.workers, k),
                "epoch, map-style (images/s)": lambda r, k: epoch(r, False, args.workers, k),
            }
            rates = {(name, w): [] for name in rows for w in where}
            for name, fn in rows.items():  # warm-up: page cache, index caches, imports
                for root in where.values():
                    fn(root, 0)
            for k in range(args.repeats):
                for name, fn in rows.items():
                    for w, root in where.items():
                        rates[(name, w)].append(fn(root, k))
        finally:
            for p in servers.values():
                p.terminate()
                p.wait()
    print(f"{args.images} JPEGs 112x112 ({os.cpu_count()} CPUs, load average {load:.1f} -> {os.getloadavg()[0]:.1f}, "
          f"{args.workers} workers, batch 128), median of {args.repeats}; http = a 127.0.0.1 server; (ratio to local)")
    print(f"{'':38s}" + "".join(f"{w:>22s}" for w in where))
    for name in rows:
        lo = statistics.median(rates[(name, "local")])
        cells = [f"{statistics.median(rates[(name, w)]):10.0f} ({statistics.median(rates[(name, w)]) / lo:5.2f}x)"
                 for w in where]
        print(f"{name:38s}" + "".join(f"{c:>22s}" for c in cells))


if __name__ == "__main__":
    main()
