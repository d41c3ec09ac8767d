"""Pack an identity-per-folder image tree into an insightface RecordIO set.

    python -m facemargin.data.pack IMAGE_ROOT OUT_DIR [--resize 112] [--crop square|F|WxH]
                                   [--align LANDMARKS] [--quality 95] [--workers N] [--overwrite]

``IMAGE_ROOT/<identity>/<image>``: sorted folder names become labels ``0 .. C-1`` (folders
without images are skipped), files are taken in sorted order. ``OUT_DIR`` receives
``train.rec``, ``train.idx`` and ``property`` in the insightface layout: key 0 is the meta record
(labels ``(a, b)``, ``a = 1 + num_images``, ``b = a + C``), images are keys ``1 .. a-1`` with
their identity as label, identity ``c`` is key ``a + c`` with labels ``(first_key, last_key + 1)``.

Images: a JPEG that needs no crop and already has the target size is copied byte for byte (its
size is read from the JPEG header, nothing is decoded); anything else is decoded, centre-cropped,
resized (bicubic) and encoded as RGB JPEG. ``--crop`` takes ``square`` (the largest centred
square), a fraction ``F`` (the centred square of ``F`` x the shorter side: ``--crop 0.5 --resize
112`` frames the face of an LFW-style 250x250 photo, where the detector box was enlarged about
2x) or ``WxH`` pixels. ``--resize N`` alone crops non-square photos to their centred square first,
so faces are never squashed. ``--align LANDMARKS`` aligns every face instead: a list of ``PATH x1
y1 ... x5 y5`` lines (the 5 points of the ArcFace template: eyes, nose, mouth corners) maps each
face onto the ``--resize`` (default 112) template with :mod:`facemargin.align`, as insightface's
training sets were made. ``--workers N`` prepares images in N processes; the output is
byte-identical to one worker. Files are written under temporary names and renamed at the end: an
error leaves no partial ``train.rec`` / ``train.idx`` / ``property`` behind.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import multiprocessing.pool
import os
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ...detect.landmarks import read_landmarks
from ..formats.photo import CropSpec, Framing, crop_box, parse_crop, photo_size
from ..formats.recordio import IRHeader, RecordIOWriter, pack_record
from ..sources.folder import list_image_tree

__all__ = ["CropSpec", "crop_box", "parse_crop", "read_image_size", "prepare_image", "read_landmarks",
           "pack_images", "write_faceset", "main"]

_MAX_EXACT_KEY = 1 << 24  # float32 labels hold integer keys exactly only below 2**24


def read_image_size(data: bytes, path: Path | str = "image") -> tuple[int, int]:
    """``(height, width)`` from the header alone (JPEG via libjpeg-turbo, PNG by hand; nothing decoded)."""
    return photo_size(data, path)


def prepare_image(path: str | os.PathLike, resize: int | None = None, crop: CropSpec | None = None,
                  quality: int = 95, landmarks: np.ndarray | None = None) -> tuple[bytes, tuple[int, int]]:
    """``(JPEG bytes, (height, width))`` of one source file: its own bytes when nothing changes.

    With ``landmarks`` (``[5, 2]`` pixels) the face is aligned to the ArcFace template instead
    (a ``resize`` x ``resize`` crop, 112 by default). The pixels are those of
    :meth:`~facemargin.data.formats.photo.Framing.apply`, which ``data=folder`` uses too.
    """
    with open(path, "rb") as f:
        data = f.read()
    framing = Framing.of(crop, resize, align=landmarks is not None)
    if landmarks is None:
        h, w = read_image_size(data, path)
        if data[:3] == b"\xff\xd8\xff" and framing.keeps(h, w):
            return data, (h, w)
    import simplejpeg

    rgb = framing.apply(data, path, landmarks)
    return simplejpeg.encode_jpeg(rgb, quality=quality, colorspace="RGB"), (int(rgb.shape[0]), int(rgb.shape[1]))


def _replace_atomically(out: Path, files: dict[str, Path]) -> None:
    """Rename finished temporaries to their final names (``train.rec`` last: readers look for it)."""
    for final in sorted(files, key=lambda name: name == "train.rec"):
        os.replace(files[final], out / final)


def write_faceset(
    out_dir: str | os.PathLike,
    labels: Sequence[int],
    images: Iterable[bytes],
    num_classes: int,
    image_size: tuple[int, int] | None,
    progress: bool = False,
) -> Path:
    """Write ``train.rec/.idx/property`` in the insightface layout, under temporary names renamed at the end.

    ``labels`` (known up front, sorted, every class ``0 .. num_classes-1`` present) gives the
    identity of each image; ``images`` yields the encoded bytes in the same order (may be lazy; an
    exception it raises aborts the write and removes the temporaries). ``image_size=None`` reads
    the size from the first image's header.
    """
    out = Path(out_dir)
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = int(lab.size)
    if n == 0:
        raise ValueError("write_faceset: no images")
    if np.any(np.diff(lab) < 0) or lab[0] != 0 or lab[-1] != num_classes - 1 or np.any(np.diff(lab) > 1):
        raise ValueError("write_faceset: labels must be sorted and cover every class 0 .. num_classes-1")
    a, b = 1 + n, 1 + n + num_classes
    if b > _MAX_EXACT_KEY:
        raise ValueError(f"write_faceset: {n} images + {num_classes} classes exceed 2**24 keys (float32 labels)")
    starts = np.searchsorted(lab, np.arange(num_classes), side="left") + 1
    ends = np.searchsorted(lab, np.arange(num_classes), side="right") + 1
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp: dict[str, Path] = {}
    for name in ("train.rec", "train.idx", "property"):
        fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=out)
        os.close(fd)
        tmp[name] = Path(path)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="img", desc=f"packing {out}")
    try:
        with RecordIOWriter(tmp["train.rec"], tmp["train.idx"]) as writer:
            writer.write(0, pack_record(IRHeader(0, 0.0, 0, 0), b"", labels=[a, b]))
            count = 0
            for key, (label, data) in enumerate(zip(lab.tolist(), images), start=1):
                if image_size is None:
                    image_size = read_image_size(data, f"image {key}")
                writer.write(key, pack_record(IRHeader(0, float(label), key, 0), data))
                count += 1
                if bar is not None:
                    bar.update(1)
            if count != n:
                raise ValueError(f"write_faceset: {n} labels but {count} images")
            for c in range(num_classes):
                writer.write(a + c, pack_record(IRHeader(0, 0.0, a + c, 0), b"", labels=[starts[c], ends[c]]))
        assert image_size is not None
        tmp["property"].write_text(f"{num_classes},{image_size[0]},{image_size[1]}", encoding="ascii")
        _replace_atomically(out, tmp)
    finally:
        if bar is not None:
            bar.close()
        for path in tmp.values():
            path.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
    return out


def _prepare_job(job: tuple[str, np.ndarray | None], **options) -> tuple[bytes, tuple[int, int]]:
    return prepare_image(job[0], landmarks=job[1], **options)


def _prepared(jobs: list[tuple[str, np.ndarray | None]], prepare: partial,
              pool: multiprocessing.pool.Pool | None) -> Iterator[bytes]:
    """Encoded images in order, each checked to share the first image's size."""
    paths = [p for p, _ in jobs]
    first: tuple[int, int] | None = None
    for path, (data, hw) in zip(paths, pool.imap(prepare, jobs, chunksize=32) if pool else map(prepare, jobs)):
        if first is None:
            first = hw
        elif hw != first:
            raise ValueError(f"{path} is {hw[1]}x{hw[0]} but earlier images are {first[1]}x{first[0]}; "
                             "use --resize (and --crop) to make them equal")
        yield data


@contextlib.contextmanager
def _no_pool() -> Iterator[None]:
    yield None


def pack_images(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    resize: int | None = None,
    quality: int = 95,
    progress: bool = True,
    overwrite: bool = False,
    crop: str | CropSpec | None = None,
    workers: int = 1,
    align: str | os.PathLike | None = None,
) -> dict:
    """Pack ``root/<identity>/<image>`` into ``out_dir``; returns a summary dict.

    All images must end up one size: equal already, or made equal by ``resize`` (and ``crop``).
    ``align``: a landmark list (:func:`read_landmarks`) holding every image: each face is aligned
    to the ``resize`` x ``resize`` (default 112) ArcFace template.
    """
    out = Path(out_dir)
    if (out / "train.rec").exists() and not overwrite:
        raise FileExistsError(f"{out / 'train.rec'} exists (pass overwrite=True / --overwrite)")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    spec = Framing.of(crop, resize, align=align is not None).crop  # options checked before any file is read
    names, items = list_image_tree(root)
    labels = [label for _, label in items]
    jobs: list[tuple[str, np.ndarray | None]] = [(path, None) for path, _ in items]
    if align is not None:
        marks = read_landmarks(align, root)
        missing = [path for path, _ in items if os.path.normpath(path) not in marks]
        if missing:
            raise ValueError(f"{align} has no landmarks for {len(missing)} image(s), e.g. {missing[0]}")
        jobs = [(path, marks[os.path.normpath(path)]) for path, _ in items]
    prepare = partial(_prepare_job, resize=resize, crop=spec, quality=quality)
    # the pool starts before the progress bar's thread, so no thread is running when it forks
    with multiprocessing.Pool(workers) if workers > 1 else _no_pool() as pool:
        write_faceset(out, labels, _prepared(jobs, prepare, pool), len(names), None, progress=progress)
    num_classes, h, w = (int(v) for v in (out / "property").read_text().split(","))
    return {"out_dir": out, "num_images": len(items), "num_classes": num_classes, "image_size": (h, w), "identities": names}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m facemargin.data.pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("image_root", help="directory with one sub-folder of images per identity")
    parser.add_argument("out_dir", help="output directory for train.rec/train.idx/property")
    parser.add_argument("--resize", type=int, default=None, metavar="N", help="make every image N x N")
    parser.add_argument("--crop", default=None, metavar="SPEC",
                        help="centre crop before resizing: 'square', a fraction F of the shorter side, or WxH pixels")
    parser.add_argument("--align", default=None, metavar="LIST",
                        help="align every face to the ArcFace template from 5 landmarks: lines 'PATH x1 y1 ... x5 y5'")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="processes preparing images (same output)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing train.rec")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        info = pack_images(args.image_root, args.out_dir, resize=args.resize, quality=args.quality,
                           progress=not args.quiet, overwrite=args.overwrite, crop=args.crop, workers=args.workers,
                           align=args.align)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    h, w = info["image_size"]
    print(f"wrote {info['num_images']} images of {info['num_classes']} identities ({w}x{h}) to {info['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
