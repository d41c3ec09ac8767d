"""Pack an identity-per-folder image tree into an insightface RecordIO set.

    python -m facemargin.data.pack IMAGE_ROOT OUT_DIR [--resize 112] [--crop square|F|WxH]
        [--resize-quality fast|high|full] [--align LANDMARKS | --detect [--detector mtcnn]
        [--choice largest|central]] [--verify markers|decode] [--quality 95] [--subsampling 420|444]
        [--workers N] [--overwrite]

``IMAGE_ROOT/<identity>/<image>``: sorted folder names become labels ``0 .. C-1`` (folders
without images are skipped), files are taken in sorted order. ``OUT_DIR`` receives ``train.rec``,
``train.idx`` and ``property`` in the insightface layout (:mod:`.faceset_writer`).

Images: a JPEG that needs no crop and already has the target size is copied byte for byte once
:func:`check_copied_jpeg` has found its end-of-image marker (a truncated file is refused;
``--verify decode`` decodes each one instead). Anything else is made into the image
:class:`~facemargin.data.formats.photo.Framing` gives (``data=folder`` trains on the same pixels
with the same options): decoded strictly, centre-cropped, resized (antialiased bicubic; a JPEG
shrunk 2x or more is first decoded at 1/2, 1/4 or 1/8 scale: ``--resize-quality``) or aligned,
and encoded as RGB JPEG (``--quality``, chroma subsampled 4:2:0 as OpenCV does, or
``--subsampling 444``). ``--crop`` takes ``square`` (the largest centred square), a fraction ``F`` (the centred square
of ``F`` x the shorter side: ``--crop 0.5 --resize 112`` frames the face of an LFW-style 250x250
photo, where the detector box was enlarged about 2x) or ``WxH`` pixels. ``--resize N`` alone
crops non-square photos to their centred square first, so faces are never squashed.
``--align LANDMARKS`` aligns every face instead: a list of ``PATH x1 y1 ... x5 y5`` lines (the 5
points of the ArcFace template: eyes, nose, mouth corners; inside the photo, one row per photo)
maps each face onto the ``--resize`` (default 112) template with :mod:`facemargin.align`, as
insightface's training sets were made. ``--detect`` finds the landmarks itself
(:mod:`.pack_detect`). ``--workers N`` prepares images in N processes; the output is
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
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ...detect.landmarks import read_landmarks
from ..formats.image import CorruptImageError
from ..formats.jpeg import decode_check, walk_jpeg
from ..formats.photo import RESIZE_QUALITY, CropSpec, Framing, crop_box, parse_crop, photo_size
from ..sources.folder import list_image_tree
from .faceset_writer import write_faceset
from .pack_align import LandmarksOutsideError, check_landmarks_inside, landmarks_by_path

__all__ = ["CropSpec", "crop_box", "parse_crop", "read_image_size", "prepare_image", "frame_file", "read_landmarks",
           "check_copied_jpeg", "check_landmarks_inside", "read_file", "encode_image", "VERIFY", "SUBSAMPLING",
           "pack_images", "write_faceset", "main"]

#: how a JPEG copied byte for byte is checked (:func:`check_copied_jpeg`)
VERIFY = ("markers", "decode")
#: chroma subsampling of re-encoded images (:func:`encode_image`)
SUBSAMPLING = ("420", "444")


def read_image_size(data: bytes, path: Path | str = "image") -> tuple[int, int]:
    """``(height, width)`` from the header alone (JPEG via libjpeg-turbo, PNG by hand; nothing decoded)."""
    return photo_size(data, path)


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of ``path`` (one ``open``, ``fstat`` and ``read``: no buffered-reader object)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)
        if len(data) > size:  # the file grew since fstat: read the rest
            parts = [data]
            while more := os.read(fd, 1 << 20):
                parts.append(more)
            data = b"".join(parts)
        return data
    finally:
        os.close(fd)


def check_copied_jpeg(data: bytes, path: str | os.PathLike, verify: str = "markers") -> None:
    """Refuse a JPEG about to be copied byte for byte that would not decode (``ValueError`` naming ``path``).

    ``verify="markers"`` (libjpeg has already read its header): it must end with its end-of-image
    marker; where it does not, its marker segments and scan data are walked
    (:func:`~facemargin.data.formats.jpeg.walk_jpeg`) to tell a truncated file (refused, saying
    where it ends) from one with bytes after its end-of-image marker (copied). ``verify="decode"``:
    each one is decoded, strictly, at 1/8 scale (all of its entropy-coded data: damage inside the
    scan is found too; ~60 us more per 112x112 face).
    """
    if verify not in VERIFY:
        raise ValueError(f"--verify must be one of {', '.join(VERIFY)}, got {verify!r}")
    try:
        if verify == "decode":
            decode_check(data)
        elif data[-2:] != b"\xff\xd9":
            walk_jpeg(data)
    except CorruptImageError as exc:
        raise ValueError(f"cannot pack {path}: {exc}") from None


def prepare_image(path: str | os.PathLike, resize: int | None = None, crop: CropSpec | None = None,
                  quality: int = 95, landmarks: np.ndarray | None = None, *, verify: str = "markers",
                  resize_quality: str = "fast", subsampling: str = "420") -> tuple[bytes, tuple[int, int]]:
    """``(JPEG bytes, (height, width))`` of one source file: its own bytes when nothing changes.

    ``resize``, ``crop`` and ``resize_quality`` make the :class:`~facemargin.data.formats.photo.Framing`
    of :func:`frame_file`; with ``landmarks`` (``[5, 2]`` pixels, inside the photo) the face is
    aligned to the ArcFace template instead (a ``resize`` x ``resize`` crop, 112 by default).
    """
    framing = Framing.of(crop, resize, align=landmarks is not None, resize_quality=resize_quality)
    return frame_file(path, framing, landmarks, quality=quality, verify=verify, subsampling=subsampling)


def frame_file(path: str | os.PathLike, framing: Framing, landmarks: np.ndarray | None = None, *, quality: int = 95,
               verify: str = "markers", subsampling: str = "420") -> tuple[bytes, tuple[int, int]]:
    """``(JPEG bytes, (height, width))``: the photo at ``path`` made into ``framing``'s image.

    A JPEG the framing keeps as it is is copied after :func:`check_copied_jpeg` (``verify``);
    anything else becomes :meth:`Framing.apply <facemargin.data.formats.photo.Framing.apply>`'s
    pixels (the ones ``data=folder`` trains on), encoded by :func:`encode_image`. Aligning
    ``landmarks`` must lie inside the photo (:func:`check_landmarks_inside`).
    """
    data = read_file(path)
    hw = read_image_size(data, path)
    if landmarks is not None:
        check_landmarks_inside(landmarks, hw, path)
    elif data[:3] == b"\xff\xd8\xff" and framing.keeps(*hw):
        check_copied_jpeg(data, path, verify)
        return data, hw
    rgb = framing.apply(data, path, landmarks, hw)
    return encode_image(rgb, quality, subsampling), (int(rgb.shape[0]), int(rgb.shape[1]))


def encode_image(rgb: np.ndarray, quality: int = 95, subsampling: str = "420") -> bytes:
    """RGB JPEG bytes: libjpeg-turbo at ``quality``, chroma at half resolution (``"420"``: what
    OpenCV and so insightface's sets use; smaller and faster to decode) or full (``"444"``)."""
    import simplejpeg

    if subsampling not in SUBSAMPLING:
        raise ValueError(f"--subsampling must be one of {', '.join(SUBSAMPLING)}, got {subsampling!r}")
    return simplejpeg.encode_jpeg(rgb, quality=quality, colorspace="RGB", colorsubsampling=subsampling)


def _prepare_job(job: tuple[str, np.ndarray | None], framing: Framing, landmark_file: str | None = None,
                 **options) -> tuple[bytes, tuple[int, int]]:
    try:
        return frame_file(job[0], framing, job[1], **options)
    except LandmarksOutsideError as exc:
        raise LandmarksOutsideError(f"{exc} (landmarks from {landmark_file})") from None


def _single_thread_worker() -> None:
    """A pool worker resizes on one torch thread (set before torch is imported there)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def worker_pool(workers: int, initializer: Callable[..., None], initargs: tuple = ()) -> multiprocessing.pool.Pool:
    """``workers`` spawned processes. Not forked: a fork of a process that runs threads (torch's
    OpenMP pool, a test runner's or an application's) can leave the child waiting forever on a
    lock that no thread holds there."""
    return multiprocessing.get_context("spawn").Pool(workers, initializer, initargs)


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


@contextlib.contextmanager
def _one_torch_thread(needed: bool) -> Iterator[None]:
    """torch on one thread while images are resized or faces detected here (restored after)."""
    if not needed:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    *,
    verify: str = "markers",
    resize_quality: str = "fast",
    subsampling: str = "420",
    detect: str | Mapping[str, Any] | Any | None = None,
    choice: str = "largest",
    min_score: float = 0.0,
) -> dict:
    """Pack ``root/<identity>/<image>`` into ``out_dir``; returns a summary dict.

    All images must end up one size: equal already, or made equal by ``resize`` (and ``crop``).
    ``align``: a landmark list (:func:`read_landmarks`) holding every image: each face is aligned
    to the ``resize`` x ``resize`` (default 112) ArcFace template. ``verify``: how a JPEG copied
    byte for byte is checked (:func:`check_copied_jpeg`). ``resize_quality``: how far a resized
    JPEG is decoded at reduced scale (:data:`~facemargin.data.formats.resize.RESIZE_QUALITY`:
    ``fast``, ``high``, ``full``). ``subsampling``: the chroma of re-encoded images
    (:func:`encode_image`). ``detect``: a detector (name in
    ``conf/detector/``, ``_target_`` mapping or built detector): photos in, aligned faces out
    (:mod:`~facemargin.data.tools.pack_detect`; ``choice`` and ``min_score`` pick the face).
    """
    out = Path(out_dir)
    if (out / "train.rec").exists() and not overwrite:
        raise FileExistsError(f"{out / 'train.rec'} exists (pass overwrite=True / --overwrite)")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if verify not in VERIFY:
        raise ValueError(f"--verify must be one of {', '.join(VERIFY)}, got {verify!r}")
    if subsampling not in SUBSAMPLING:
        raise ValueError(f"--subsampling must be one of {', '.join(SUBSAMPLING)}, got {subsampling!r}")
    if detect is not None and align is not None:
        raise ValueError("--detect and --align exclude each other: the detected landmarks decide the crop")
    # options checked before any file is read (a size the ArcFace template has, when aligning)
    framing = Framing.of(crop, resize, align=align is not None or detect is not None,
                         align_option="--detect" if detect is not None else None, resize_quality=resize_quality)
    if detect is not None:
        from ...detect.base import FACE_CHOICES
        from ...detect.pipeline import load_detector

        if choice not in FACE_CHOICES:
            raise ValueError(f"--choice must be one of {', '.join(FACE_CHOICES)}, got {choice!r}")
        detector = load_detector(detect)
    names, items = list_image_tree(root)
    if detect is not None:
        from .pack_detect import pack_detected

        with _one_torch_thread(workers == 1):
            return pack_detected(root, out, names, items, detector, choice, min_score, framing.aligned_size, quality,
                                 subsampling, workers, progress)
    labels = [label for _, label in items]
    jobs: list[tuple[str, np.ndarray | None]] = [(path, None) for path, _ in items]
    if align is not None:
        marks = landmarks_by_path(align, root)
        missing = [path for path, _ in items if os.path.abspath(path) not in marks]
        if missing:
            raise ValueError(f"{align} has no landmarks for {len(missing)} image(s), e.g. {missing[0]}")
        jobs = [(path, marks[os.path.abspath(path)]) for path, _ in items]
    prepare = partial(_prepare_job, framing=framing, quality=quality, verify=verify, subsampling=subsampling,
                      landmark_file=None if align is None else os.fspath(align))
    with _one_torch_thread(workers == 1 and framing.changes_pixels), \
            worker_pool(workers, _single_thread_worker) if workers > 1 else _no_pool() as pool:
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
    parser.add_argument("--resize-quality", default="fast", choices=tuple(RESIZE_QUALITY),
                        help="JPEGs decoded at 1/2-1/8 scale down to the output size (fast), to 2x it (high), or in full")
    parser.add_argument("--align", default=None, metavar="LIST",
                        help="align every face to the ArcFace template from 5 landmarks: lines 'PATH x1 y1 ... x5 y5'")
    parser.add_argument("--detect", action="store_true",
                        help="raw photos: detect the faces, align one per photo (lists no_face.txt, several_faces.txt)")
    parser.add_argument("--detector", default="mtcnn", metavar="NAME", help="with --detect: conf/detector/NAME.yaml")
    parser.add_argument("--choice", default="largest", choices=("largest", "central"),
                        help="with --detect: the face of a photo with several")
    parser.add_argument("--min-score", type=float, default=0.0, help="with --detect: ignore faces scoring lower")
    parser.add_argument("--verify", default="markers", choices=VERIFY,
                        help="JPEGs copied as they are: walk their markers to the end (markers) or also decode them")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    parser.add_argument("--subsampling", default="420", choices=SUBSAMPLING,
                        help="chroma of re-encoded images: half resolution (420, as OpenCV/insightface) or full (444)")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="processes preparing images (same output)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing train.rec")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from ...cli import run_cli

    # pack's own checks raise ValueError / OSError naming the image, option or folder: one line, status 2
    info = run_cli(lambda: pack_images(args.image_root, args.out_dir, resize=args.resize, quality=args.quality,
                                       progress=not args.quiet, overwrite=args.overwrite, crop=args.crop,
                                       workers=args.workers, align=args.align, verify=args.verify,
                                       resize_quality=args.resize_quality, subsampling=args.subsampling,
                                       detect=args.detector if args.detect else None, choice=args.choice,
                                       min_score=args.min_score),
                   "facemargin.data.pack", user_errors=(OSError, ValueError))
    h, w = info["image_size"]
    print(f"wrote {info['num_images']} images of {info['num_classes']} identities ({w}x{h}) to {info['out_dir']}")
    if "no_face" in info:
        print(f"{info['photos']} photos: no face in {len(info['no_face'])} (listed in {info['no_face_list']}), "
              f"several faces in {len(info['several'])} (the {args.choice} taken; listed in {info['several_list']})")
        if info["dropped_identities"]:
            shown = ", ".join(info["dropped_identities"][:5])
            print(f"left out {len(info['dropped_identities'])} identities with no face in any photo: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
