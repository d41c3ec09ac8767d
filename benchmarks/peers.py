"""What the peer benchmarks share: finding the MXNet peer, saying what could not run, real faces, CPU clocks.

The peer (MXNet 1.9.1, ``im2rec``) lives in its own virtual environment, never in the project's:
``bash benchmarks/setup_mxnet_peer.sh DIR`` installs it and prints the python to pass as
``--mxnet-python`` or ``FACEMARGIN_MXNET_PYTHON``. No path on any machine is assumed. A requested
peer row that cannot run is named with its reason, and the script exits non-zero unless
``--allow-missing-peers`` (the rows that ran are still printed).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

MXNET_ENV = "FACEMARGIN_MXNET_PYTHON"
SETUP_HINT = "install it with: bash benchmarks/setup_mxnet_peer.sh DIR (prints the python to pass)"
JPEG_SUFFIXES = (".jpg", ".jpeg")


def add_peer_args(parser: argparse.ArgumentParser) -> None:
    """``--mxnet-python`` (default ``$FACEMARGIN_MXNET_PYTHON``) and ``--allow-missing-peers``."""
    parser.add_argument("--mxnet-python", default=os.environ.get(MXNET_ENV) or None, metavar="PY",
                        help=f"a python with mxnet==1.9.1 (default ${MXNET_ENV}); {SETUP_HINT}")
    parser.add_argument("--allow-missing-peers", action="store_true",
                        help="exit 0 even when peer rows could not run (they are still listed)")


def check_mxnet(python: str | None) -> tuple[str | None, str]:
    """``(python, "mxnet 1.9.1 ...")`` when the peer imports, else ``(None, why not)``."""
    if not python:
        return None, f"no MXNet peer given (--mxnet-python or ${MXNET_ENV}); {SETUP_HINT}"
    if not (shutil.which(python) or Path(python).is_file()):
        return None, f"--mxnet-python {python}: no such file; {SETUP_HINT}"
    probe = "import mxnet, numpy, cv2; print(mxnet.__version__, numpy.__version__, cv2.__version__)"
    res = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=peer_env())
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"{python} cannot import mxnet/numpy/cv2 ({tail}); {SETUP_HINT}"
    mx, np_, cv = res.stdout.split()
    if mx != "1.9.1":
        return None, f"{python} has mxnet {mx}, the benchmarks pair with 1.9.1; {SETUP_HINT}"
    return python, f"mxnet {mx} (numpy {np_}, opencv {cv}) from {python}"


def peer_env(**extra: str) -> dict[str, str]:
    """The peer's environment: ours without PYTHONPATH (its own numpy), single-threaded math libraries."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MXNET_CPU_WORKER_NTHREADS="1", **extra)
    return env


def report_missing(missing: dict[str, str], allow: bool) -> int:
    """Print the rows that could not run and why; the exit status (1 if any, unless ``allow``)."""
    if not missing:
        return 0
    print("\nrows NOT run:", file=sys.stderr)
    for row, why in missing.items():
        print(f"  {row}: {why}", file=sys.stderr)
    if allow:
        print("(--allow-missing-peers: exit 0)", file=sys.stderr)
        return 0
    print("(exit 1; pass --allow-missing-peers to accept)", file=sys.stderr)
    return 1


def omp_procs_shim(procs: int, where: Path) -> tuple[Path | None, str]:
    """A preloadable library whose ``omp_get_num_procs()`` returns ``procs``, or ``(None, why not)``.

    MXNet 1.x's ``ImageRecordIter`` uses ``min(preprocess_threads, max(omp_get_num_procs() / 2 - 1, 1))``
    decoding threads: on a 2-CPU machine one thread, whatever ``preprocess_threads`` says. With this
    library in ``LD_PRELOAD`` it runs the threads it is asked for.
    """
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc) to build the omp_get_num_procs shim"
    src, lib = where / "omp_procs.c", where / "omp_procs.so"
    src.write_text(f"int omp_get_num_procs(void) {{ return {int(procs)}; }}\n")
    res = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(src)], capture_output=True, text=True)
    if res.returncode != 0:
        return None, f"building the omp_get_num_procs shim failed: {res.stderr.strip()[-200:]}"
    return lib, f"LD_PRELOAD={lib.name} (omp_get_num_procs() = {procs})"


class Clock(NamedTuple):
    """CPU seconds (user + system) of this process and of its waited-for children, minor page faults, wall."""

    self_cpu: float
    child_cpu: float
    minflt: int
    wall: float

    @staticmethod
    def now() -> "Clock":
        import time

        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return Clock(s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime, s.ru_minflt + c.ru_minflt, time.perf_counter())

    def since(self, start: "Clock") -> dict[str, float]:
        """``cpu`` (this process + children that ended meanwhile; ``children`` alone), ``wall``, ``minflt``."""
        children = self.child_cpu - start.child_cpu
        return {"cpu": self.self_cpu - start.self_cpu + children, "children": children,
                "wall": self.wall - start.wall, "minflt": self.minflt - start.minflt}


def print_ratios(med: dict[str, dict[str, float]], pairs: list[tuple[str, str, str, str]], title: str) -> dict:
    """A table of ``per image`` medians' ratios ``b / a`` (``a`` faster: above 1) per CPU- and wall-second."""
    print(f"\n| {title} | per CPU-s | per wall-s | pairing |")
    print("|---|---|---|---|")
    ratios = {}
    for name, a, b, pairing in pairs:
        if a in med and b in med:
            ratios[name] = {"cpu": med[b]["cpu"] / med[a]["cpu"], "wall": med[b]["wall"] / med[a]["wall"]}
            print(f"| {name} | {ratios[name]['cpu']:.2f} | {ratios[name]['wall']:.2f} | {pairing} |")
    return ratios


def machine_line() -> str:
    """CPUs and load, for the record (the shared machine is noisy)."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load}"


def jpeg_size(data: bytes, where: str) -> tuple[int, int]:
    """``(height, width)`` from a JPEG header; a clear error naming ``where`` otherwise."""
    import simplejpeg

    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as exc:
        raise SystemExit(f"{where}: not a readable JPEG ({exc})") from None
    return int(h), int(w)


def load_faces(folder: str | os.PathLike, per_identity: int = 20,
               same_size: bool = True) -> tuple[list[bytes], np.ndarray, list[str]]:
    """The JPEGs under ``folder`` (recursively, sorted): ``(bytes, labels, relative paths)``.

    Identities are the sub-folders holding the images when there are several, else consecutive
    groups of ``per_identity`` files. With ``same_size`` every image must have the first one's size.
    """
    root = Path(folder)
    if not root.is_dir():
        raise SystemExit(f"{folder}: not a directory")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in JPEG_SUFFIXES and p.is_file())
    if not paths:
        raise SystemExit(f"{folder}: no .jpg/.jpeg files")
    images = [p.read_bytes() for p in paths]
    first = jpeg_size(images[0], str(paths[0]))
    for p, data in zip(paths, images):
        if jpeg_size(data, str(p)) != first and same_size:
            raise SystemExit(f"{p} is {jpeg_size(data, str(p))} (h, w) but {paths[0]} is {first}: "
                             "the faces must share one size")
    parents = sorted({p.parent for p in paths})
    if len(parents) > 1:
        ids = {d: k for k, d in enumerate(parents)}
        labels = np.array([ids[p.parent] for p in paths], dtype=np.int64)
    else:
        labels = np.arange(len(paths), dtype=np.int64) // max(1, per_identity)
    return images, labels, [p.relative_to(root).as_posix() for p in paths]


def cycle_faces(images: list[bytes], labels: np.ndarray, count: int) -> tuple[list[bytes], np.ndarray]:
    """``count`` images taken in turn from a smaller set (the k-th pass relabelled as new identities), sorted by label."""
    reps = -(-count // len(images))
    span = int(labels.max()) + 1
    out_imgs = (images * reps)[:count]
    out_labels = np.concatenate([labels + r * span for r in range(reps)])[:count]
    order = np.argsort(out_labels, kind="stable")
    _, dense = np.unique(out_labels[order], return_inverse=True)
    return [out_imgs[i] for i in order], dense.astype(np.int64)


def procedural_faces(count: int, identities: int, seed: int = 0, size: int = 112) -> tuple[list[bytes], np.ndarray]:
    """``count`` distinct procedural faces (:mod:`facemargin.data.tools.synthetic`), JPEG quality 90, sorted by identity."""
    import simplejpeg

    from facemargin.data.tools.synthetic import render_identity

    rng = np.random.default_rng(seed)
    per_id = np.full(identities, count // identities)
    per_id[: count % identities] += 1
    images, labels = [], []
    for ident in range(identities):
        base = render_identity(ident, 12, size, seed)
        for j in range(int(per_id[ident])):
            img = np.roll(base[j % len(base)].astype(np.int16), tuple(int(x) for x in rng.integers(-4, 5, 2)), axis=(0, 1))
            img = np.clip(img * rng.uniform(0.85, 1.15) + rng.integers(-10, 11), 0, 255).astype(np.uint8)
            images.append(simplejpeg.encode_jpeg(img, quality=90, colorspace="RGB"))
            labels.append(ident)
    return images, np.asarray(labels, dtype=np.int64)


def scratch(prefix: str) -> Path:
    """A fresh temporary directory (removed by the caller)."""
    return Path(tempfile.mkdtemp(prefix=prefix))
