"""``pack --detect``: raw photos in, aligned faces out -- detect, choose one face, align it, pack it.

Each photo is decoded (strictly, :func:`~facemargin.data.formats.photo.decode_photo`, as
``data=folder data.detect=`` decodes it), its faces detected with a detector of ``conf/detector/``
(:func:`facemargin.detect.pipeline.load_detector`, MTCNN by default, offline), one chosen (the
largest, or the most central: ``choice``), and aligned to the ArcFace template at ``size`` x
``size`` (:func:`facemargin.detect.pipeline.detect_and_align`), then encoded. Photos where no face
is found are left out; photos with several faces give the chosen one. Both are listed next to the
set, in the output folder: ``no_face.txt`` (one photo per line, relative to the image root) and
``several_faces.txt`` (the photo, then which face was taken: ``largest of 3 faces: box
x1,y1-x2,y2, score s``). An identity none of whose photos has a face is left out of the set (and
named in the summary); the others keep their sorted order, labels ``0 .. C-1``.

The aligned faces wait in an unnamed spool file in the output folder until every photo is done
(the set's meta record needs the final count first), so memory does not grow with the set.
``workers`` processes detect in parallel; each receives the detector once (it pickles without
its networks, which load on its first photo) and runs torch on one thread.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from ..formats.photo import decode_photo

__all__ = ["NO_FACE_LIST", "SEVERAL_LIST", "pack_detected"]

NO_FACE_LIST = "no_face.txt"
SEVERAL_LIST = "several_faces.txt"

_detector: Any = None  # the detector of this process (set once per worker by _init_worker)


class Detected(NamedTuple):
    """One photo's outcome: the aligned face's JPEG bytes (``None``: no face), faces found, which was taken."""

    jpeg: bytes | None
    count: int
    described: str


def _init_worker(detector: Any, single_thread: bool = True) -> None:
    global _detector
    _detector = detector
    if single_thread:  # a worker process: one torch thread (the caller's process keeps its setting)
        import torch

        torch.set_num_threads(1)


def detect_photo(path: str, choice: str = "largest", min_score: float = 0.0, size: int = 112,
                 quality: int = 95, subsampling: str = "420", detector: Any = None) -> Detected:
    """Decode ``path``, detect, align the chosen face to ``size`` x ``size`` and encode it."""
    from ...detect.pipeline import detect_and_align
    from .pack import encode_image, read_file

    image = decode_photo(read_file(path), path)
    crop, found = detect_and_align(detector if detector is not None else _detector, image, choice, min_score, size)
    if crop is None:
        return Detected(None, 0, found.describe())
    return Detected(encode_image(crop, quality, subsampling), found.count, found.describe())


def _relative(path: str, root: str | os.PathLike) -> str:
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel


def pack_detected(root: str | os.PathLike, out: Path, names: Sequence[str], items: Sequence[tuple[str, int]],
                  detector: Any, choice: str, min_score: float, size: int, quality: int, subsampling: str,
                  workers: int, progress: bool) -> dict:
    """Detect and align every photo of ``items`` (``(path, label)``), then write the set to ``out``.

    Returns the summary :func:`~facemargin.data.tools.pack.pack_images` returns, plus ``no_face``
    and ``several`` (photo paths relative to ``root``), ``no_face_list`` / ``several_list`` (where
    they were written) and ``dropped_identities``.
    """
    from functools import partial

    from tqdm import tqdm

    from .faceset_writer import write_faceset

    job = partial(detect_photo, choice=choice, min_score=min_score, size=size, quality=quality,
                  subsampling=subsampling)
    paths = [path for path, _ in items]
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    kept: list[tuple[int, int, int]] = []  # (label, offset, length) in the spool
    no_face: list[str] = []
    several: list[str] = []
    try:
        with tempfile.TemporaryFile(dir=out, prefix=".faces.", suffix=".spool") as spool:
            from .pack import worker_pool

            pool = worker_pool(workers, _init_worker, (detector,)) if workers > 1 else None
            try:
                if pool is None:
                    _init_worker(detector, single_thread=False)
                results = pool.imap(job, paths, chunksize=4) if pool else map(job, paths)
                bar = tqdm(total=len(paths), unit="photo", desc=f"detect ({detector.name})", disable=not progress)
                with bar:
                    for (path, label), found in zip(items, results):
                        bar.update(1)
                        if found.jpeg is None:
                            no_face.append(_relative(path, root))
                            continue
                        if found.count > 1:
                            several.append(f"{_relative(path, root)}\t{found.described}")
                        kept.append((label, spool.tell(), len(found.jpeg)))
                        _spool_write(spool, found.jpeg, out)
            finally:
                if pool is not None:
                    pool.terminate()
                    pool.join()
                _init_worker(None, single_thread=False)
            if not kept:
                raise ValueError(f"no face was found in any of the {len(paths)} photos under {root} "
                                 f"(detector {detector.name}); nothing was packed")
            identities, labels = _compact(names, [label for label, _, _ in kept])
            write_faceset(out, labels, _spooled(spool, kept), len(identities), (size, size))
        dropped = sorted(set(names) - set(identities))
        lists = _write_lists(out, no_face, several)
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    return {"out_dir": out, "num_images": len(kept), "num_classes": len(identities), "image_size": (size, size),
            "identities": identities, "photos": len(paths), "no_face": no_face,
            "several": [line.split("\t")[0] for line in several], "dropped_identities": dropped, **lists}


def _spool_write(spool: Any, data: bytes, out: Path) -> None:
    try:
        spool.write(data)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write the aligned faces' spool file in {out}: {exc.strerror}") from None


def _spooled(spool: Any, kept: list[tuple[int, int, int]]) -> Iterator[bytes]:
    spool.flush()
    for _, offset, length in kept:
        spool.seek(offset)
        yield spool.read(length)


def _compact(names: Sequence[str], labels: list[int]) -> tuple[list[str], np.ndarray]:
    """The identities that kept a face, and the kept photos' labels renumbered ``0 .. C-1`` in order."""
    present = sorted(set(labels))
    new = np.full(len(names), -1, dtype=np.int64)
    new[present] = np.arange(len(present))
    return [names[i] for i in present], new[np.asarray(labels, dtype=np.int64)]


def _write_lists(out: Path, no_face: list[str], several: list[str]) -> dict:
    """``no_face.txt`` and ``several_faces.txt`` in ``out`` (each written, empty when nothing to list)."""
    written = {}
    for key, name, lines in (("no_face_list", NO_FACE_LIST, no_face), ("several_list", SEVERAL_LIST, several)):
        path = out / name
        try:
            path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        written[key] = path
    return written
