"""Packing throughput: ``python -m facemargin.data.pack`` vs MXNet 1.9.1's ``tools/im2rec.py``, the same work.

    bash benchmarks/setup_mxnet_peer.sh ~/peers/mxnet          # once: prints the peer's python
    python benchmarks/pack_throughput.py --mxnet-python ~/peers/mxnet/bin/python \\
        [--faces DIR] [--images 5000] [--photos DIR] [--photo-count 2000] [--repeats 5] [--workers 2]
        [--baseline-src OLD/src]

Each run is a fresh process of its tool's real command line, timed inside after the interpreter
has imported the tool (``runpy`` of ``im2rec.py``; ``facemargin.data.pack.main``): CPU seconds of
that process and its worker processes (``getrusage`` SELF + CHILDREN) and wall seconds, from the
identity-per-folder tree to the finished ``.rec``/``.idx``. **Both sides list the tree inside the
timing**: im2rec runs ``--list --recursive --no-shuffle`` and then its pack step (the list in the
packer's sorted order); facemargin's packer lists the tree itself (and also reads every JPEG
header, writes the insightface meta and identity records and renames its temporaries).

Paths (rows interleaved, ``--repeats`` rounds, medians):

* **pass-through** (``--faces DIR`` of equally sized JPEG faces, used in turn up to ``--images``;
  else procedural 112x112 faces, quality 90): ``im2rec --pass-through`` (read, ``recordio.pack``,
  ``write_idx``) vs ``pack`` (the JPEG's size is the target size: its bytes are copied). The
  script checks both ``.rec`` files hold byte-identical image payloads.
* **resize photos** (``--photos DIR``: any JPEG photos, e.g. LFW's 250x250; else LFW-like 250x250
  photos made from the faces: the face scaled to 125 px in the centre of a blurred, noisy
  250-px context, quality 90): ``im2rec --resize 112 --quality 95`` (``cv2.imread``,
  ``cv2.resize`` bilinear without antialiasing, ``cv2.imencode`` q95; ``--center-crop`` added for
  non-square photos) vs ``pack --resize 112 --quality 95`` (simplejpeg decode, at 1/2 scale in the
  DCT domain where the photo shrinks 2x or more (``--resize-quality fast``, the default), centred
  square, antialiased bicubic by torch's uint8 kernel, simplejpeg q95). ``pack --resize-quality
  full`` decodes in full (the best fidelity); ``pack --crop 0.5 --resize 112`` (the face's
  framing in an LFW photo) is shown too: it resizes a 125-px crop, other work than im2rec's row.
* **pass-through, checked**: ``pack --verify decode`` also decodes every copied JPEG strictly (at
  1/8 scale); im2rec checks nothing (its row is the same as above).
* ``--workers N`` (0 skips): ``im2rec --num-thread N`` vs ``pack --workers N`` on both paths.
* ``--baseline-src DIR`` adds ``base: fm pack`` rows: the same commands from another source tree
  (``PYTHONPATH=DIR``, e.g. ``git worktree add DIR <commit>`` then ``DIR/src``), interleaved with
  the others, for a before/after ratio.

The resize rows also report each output's PSNR against a float reference (the original decoded
by simplejpeg, centred square, Pillow's Lanczos to 112: what an ideal resize gives). Peer rows need
``--mxnet-python`` / ``$FACEMARGIN_MXNET_PYTHON``; without it they are listed as not run and
the exit status is 1 (``--allow-missing-peers``: 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

# facemargin's data modules (one block: the data/ tree is being regrouped)
from facemargin.data.formats.recordio import RecordIOReader, unpack_record  # noqa: E402

_CLOCK = r"""
import json, resource, sys, time
def _clock():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime, time.perf_counter()
"""

# im2rec's own command line, twice: --list, then the pack step (its imports paid before the clock)
IM2REC = _CLOCK + r"""
import contextlib, io, os, runpy
import cv2, mxnet as mx
script = os.path.join(os.path.dirname(mx.__file__), "tools", "im2rec.py")
prefix, root, *pack_args = sys.argv[1:]
cpu0, wall0 = _clock()
with contextlib.redirect_stdout(io.StringIO()):
    for argv in (["--list", "--recursive", "--no-shuffle", prefix, root], [prefix, root, *pack_args]):
        sys.argv = [script, *argv]
        runpy.run_path(script, run_name="__main__")
cpu1, wall1 = _clock()
print(json.dumps({"cpu": cpu1 - cpu0, "wall": wall1 - wall0}))
"""

# facemargin's command line (its imports, including the lazy ones, paid before the clock)
PACK = _CLOCK + r"""
import contextlib, io
import PIL.Image, simplejpeg, torch
from facemargin.data import pack
cpu0, wall0 = _clock()
with contextlib.redirect_stdout(io.StringIO()):
    code = pack.main(sys.argv[1:])
cpu1, wall1 = _clock()
assert code == 0, code
print(json.dumps({"cpu": cpu1 - cpu0, "wall": wall1 - wall0}))
"""


def run(cmd: list[str], env: dict[str, str]) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} ... failed:\n{res.stderr[-1500:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_tree(root: Path, images: list[bytes], labels: np.ndarray) -> None:
    for n, (data, label) in enumerate(zip(images, labels.tolist())):
        path = root / f"{label:05d}" / f"{n:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def lfw_like(face_jpeg: bytes, rng: np.random.Generator, size: int = 250) -> bytes:
    """A ``size``-px photo: the face scaled to half the width in the centre of a blurred, noisy context."""
    import simplejpeg
    from PIL import Image, ImageFilter

    face = Image.fromarray(simplejpeg.decode_jpeg(face_jpeg, colorspace="RGB"))
    ctx = face.resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(6))
    arr = np.asarray(ctx, dtype=np.int16) + rng.normal(0, 4, (size, size, 3)).astype(np.int16)
    canvas = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    inner = size // 2
    canvas.paste(face.resize((inner, inner), Image.BICUBIC), ((size - inner) // 2, (size - inner) // 2))
    return simplejpeg.encode_jpeg(np.asarray(canvas), quality=90, colorspace="RGB")


def payloads(rec: Path, idx: Path) -> dict[int, bytes]:
    reader = RecordIOReader(rec, idx)
    out = {}
    for key in reader.keys:
        header, _, data = unpack_record(reader.read(key))
        if data:
            out[key] = data
    return out


def psnr_vs_reference(outputs: list[bytes], originals: list[bytes], size: int = 112) -> float:
    """Mean PSNR (dB) of packed images against Lanczos-resized originals (centred square)."""
    import simplejpeg
    from PIL import Image

    values = []
    for out, orig in zip(outputs, originals):
        im = Image.fromarray(simplejpeg.decode_jpeg(orig, colorspace="RGB"))
        s = min(im.size)
        left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
        ref = np.asarray(im.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS), np.float64)
        got = simplejpeg.decode_jpeg(out, colorspace="RGB").astype(np.float64)
        values.append(10 * np.log10(255.0 ** 2 / max(np.mean((got - ref) ** 2), 1e-12)))
    return float(np.mean(values))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faces", default=None, metavar="DIR", help="a folder of equally sized JPEG faces (default: procedural)")
    ap.add_argument("--images", type=int, default=5000, help="pass-through images")
    ap.add_argument("--photos", default=None, metavar="DIR", help="a folder of JPEG photos to resize (default: LFW-like, made)")
    ap.add_argument("--photo-count", type=int, default=2000, help="photos to resize (made or used in turn)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2, help="im2rec --num-thread N vs pack --workers N (0: skip)")
    ap.add_argument("--baseline-src", default=None, metavar="DIR",
                    help="also run 'fm pack' rows from this source tree (PYTHONPATH), interleaved: before/after")
    ap.add_argument("--json", default=None, metavar="OUT")
    peers.add_peer_args(ap)
    args = ap.parse_args()
    work = peers.scratch("fm_pack_")
    try:
        if args.faces:
            faces, face_labels, _ = peers.load_faces(args.faces)
            what = f"{len(faces)} JPEG faces from {args.faces}"
        else:
            faces, face_labels = peers.procedural_faces(args.images, max(1, args.images // 50))
            what = "procedural 112x112 faces (quality 90)"
        images, labels = peers.cycle_faces(faces, face_labels, args.images)
        write_tree(work / "faces", images, labels)
        if args.photos:
            photos, photo_labels, _ = peers.load_faces(args.photos, same_size=False)
            photos, photo_labels = peers.cycle_faces(photos, photo_labels, args.photo_count)
            photo_what = f"JPEG photos from {args.photos}"
        else:
            rng = np.random.default_rng(0)
            photos = [lfw_like(images[i % len(images)], rng) for i in range(args.photo_count)]
            photo_labels = np.arange(len(photos), dtype=np.int64) // 20
            photo_what = "LFW-like 250x250 photos made from the faces (quality 90)"
        write_tree(work / "photos", photos, photo_labels)
        square = all(np.equal(*peers.jpeg_size(p, "photo")) for p in photos[:50])
        print(f"pass-through: {len(images)} JPEGs, {np.mean([len(b) for b in images]) / 1024:.1f} KB mean: {what}")
        print(f"resize: {len(photos)} photos, {np.mean([len(b) for b in photos]) / 1024:.1f} KB mean: {photo_what}")
        print(f"machine: {peers.machine_line()}; {args.repeats} interleaved rounds, medians")

        ours_env = {**os.environ, "OMP_NUM_THREADS": "1"}
        fm = [sys.executable, "-c", PACK]
        rows: dict[str, Callable[[str], dict]] = {}
        tag = {"pass": "faces", "resize": "photos"}
        count = {"faces": len(images), "photos": len(photos)}
        per_row: dict[str, int] = {}

        def ours(name: str, tree: str, *extra: str) -> None:
            per_row[name] = count[tree]
            rows[name] = lambda out: run([*fm, str(work / tree), out, "--overwrite", "--quiet", *extra], ours_env)

        ours("fm pack", tag["pass"])
        ours("fm pack --resize 112", tag["resize"], "--resize", "112")
        ours("fm pack --crop 0.5 --resize 112", tag["resize"], "--crop", "0.5", "--resize", "112")
        ours("fm pack --verify decode", tag["pass"], "--verify", "decode")
        ours("fm pack --resize 112 --resize-quality full", tag["resize"], "--resize", "112", "--resize-quality", "full")
        if args.workers:
            ours(f"fm pack --workers {args.workers}", tag["pass"], "--workers", str(args.workers))
            ours(f"fm pack --resize 112 --workers {args.workers}", tag["resize"], "--resize", "112",
                 "--workers", str(args.workers))
        if args.baseline_src:  # the same command from another source tree (e.g. the commit before a change)
            base_env = {**ours_env, "PYTHONPATH": str(Path(args.baseline_src).resolve())}
            for name, tree, extra in (("base: fm pack", "faces", ()), ("base: fm pack --resize 112", "photos",
                                                                       ("--resize", "112"))):
                per_row[name] = count[tree]
                rows[name] = lambda out, tree=tree, extra=extra: run(
                    [*fm, str(work / tree), out, "--overwrite", "--quiet", *extra], base_env)
        missing: dict[str, str] = {}
        mx_rows = {"im2rec --pass-through": ("pass", ["--pass-through"]),
                   "im2rec --resize 112": ("resize", ["--resize", "112", "--quality", "95"]
                                           + ([] if square else ["--center-crop"]))}
        if args.workers:
            mx_rows[f"im2rec --pass-through --num-thread {args.workers}"] = ("pass", ["--pass-through", "--num-thread", str(args.workers)])
            mx_rows[f"im2rec --resize 112 --num-thread {args.workers}"] = (
                "resize", [*mx_rows["im2rec --resize 112"][1], "--num-thread", str(args.workers)])
        python, said = peers.check_mxnet(args.mxnet_python)
        if python is None:
            missing.update({r: said for r in mx_rows})
        else:
            for name, (path, extra) in mx_rows.items():
                def im2rec(out: str, tree: str = tag[path], extra: list[str] = extra) -> dict:
                    Path(out).mkdir(parents=True, exist_ok=True)
                    return run([python, "-c", IM2REC, str(Path(out) / "train"), str(work / tree), *extra], peers.peer_env())
                rows[name] = im2rec
                per_row[name] = count[tag[path]]
        outs = {name: str(work / f"out{k}") for k, name in enumerate(rows)}
        for name, fn in rows.items():  # warm-up (page cache) and the outputs checked below
            fn(outs[name])
        quality = {}
        if python is not None:
            ours_p = payloads(work / "out0" / "train.rec", work / "out0" / "train.idx")
            mx_dir = Path(outs["im2rec --pass-through"])
            theirs = payloads(mx_dir / "train.rec", mx_dir / "train.idx")
            assert [ours_p[k + 1] for k in range(len(images))] == [theirs[k] for k in range(len(images))], \
                "pass-through payloads differ from im2rec's"
            print("pass-through: image payloads byte-identical to im2rec's")
            sample = list(range(0, len(photos), max(1, len(photos) // 200)))
            for name in ("fm pack --resize 112", "fm pack --resize 112 --resize-quality full", "base: fm pack --resize 112",
                         "im2rec --resize 112"):
                if name not in outs:
                    continue
                d = Path(outs[name])
                got = payloads(d / "train.rec", d / "train.idx")
                first = min(got)
                quality[name] = psnr_vs_reference([got[first + i] for i in sample], [photos[i] for i in sample])
        runs: dict[str, list[dict]] = {name: [] for name in rows}
        loads = []
        for k in range(args.repeats):
            loads.append(os.getloadavg()[0])
            for name, fn in rows.items():
                runs[name].append(fn(outs[name]))
            print(f"  round {k + 1} (load {loads[-1]:.1f}): " + ", ".join(
                f"{m} {r[-1]['cpu']:.2f}s" for m, r in runs.items()), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {m: {key: statistics.median(r[key] for r in v) / per_row[m] for key in ("cpu", "wall")} for m, v in runs.items()}
    print(f"\nload average during the rounds: {min(loads):.1f}-{max(loads):.1f} ({os.cpu_count()} CPUs)")
    print("\n| row | images / CPU-s | images / wall-s | PSNR vs Lanczos (dB) |")
    print("|---|---|---|---|")
    for m, v in med.items():
        q = f"{quality[m]:.1f}" if m in quality else ""
        print(f"| {m} | {1 / v['cpu']:,.0f} | {1 / v['wall']:,.0f} | {q} |")
    n = args.workers
    pairs = [("pass-through", "fm pack", "im2rec --pass-through", "1 process each"),
             ("resize 250 -> 112", "fm pack --resize 112", "im2rec --resize 112", "1 process each"),
             ("resize, --resize-quality full", "fm pack --resize 112 --resize-quality full", "im2rec --resize 112",
              "1 process each; pack decodes in full (best fidelity)"),
             ("pass-through, --verify decode", "fm pack --verify decode", "im2rec --pass-through",
              "1 process each; pack also decodes every JPEG (im2rec checks none)"),
             ("crop 0.5 + resize vs im2rec's resize", "fm pack --crop 0.5 --resize 112", "im2rec --resize 112",
              "not the same work: pack resizes a crop"),
             (f"pass-through, {n} workers", f"fm pack --workers {n}", f"im2rec --pass-through --num-thread {n}",
              f"{n} worker processes each"),
             (f"resize, {n} workers", f"fm pack --resize 112 --workers {n}", f"im2rec --resize 112 --num-thread {n}",
              f"{n} worker processes each")]
    ratios = peers.print_ratios(med, pairs, "facemargin / im2rec (goal >= 1.0)")
    if args.baseline_src:
        ratios.update(peers.print_ratios(med, [
            ("pass-through", "fm pack", "base: fm pack", "the same command, this tree vs --baseline-src"),
            ("resize 250 -> 112", "fm pack --resize 112", "base: fm pack --resize 112", "the same command")],
            f"this tree / {args.baseline_src}"))
    if args.json:
        Path(args.json).write_text(json.dumps({"loads": loads, "runs": runs, "median_per_image": med, "ratios": ratios,
                                               "psnr": quality, "missing": missing}, indent=1))
    return peers.report_missing(missing, args.allow_missing_peers)


if __name__ == "__main__":
    sys.exit(main())
