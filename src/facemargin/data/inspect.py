"""Summarise and check a RecordIO face set directory.

    python -m facemargin.data.inspect DIR [--decode N]

Opening the set validates ``property``, the ``.idx`` and the meta record (see
:mod:`facemargin.data.faceset`). Then the whole ``train.rec`` is read once, sequentially: every
``.idx`` offset must be the start of a valid record and every image label an integer in
``[0, num_classes)`` that matches its identity range (every mismatch is listed). ``--decode N``
also decodes ``N`` images spread over the set, checking their declared size against ``property``
before decoding. Exits 1 when a problem is found. Imports numpy only (no torch, Lightning, timm).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from .decode import decode_face
from .faceset import FaceRecordSet
from .recordio import RecordIOError

__all__ = ["inspect_dir", "main"]

_MAX_LISTED = 10


def _scan(fs: FaceRecordSet, problems: list[str]) -> np.ndarray:
    """Read the .rec once in file order, walking the index alongside; returns the image labels read.

    Reports index offsets that are not record starts and every label problem.
    """
    reader = fs.reader
    offsets, keys = reader.offset_array, reader.key_array
    is_image = np.zeros(len(offsets), dtype=bool)
    is_image[fs.positions(np.arange(len(fs)))] = True
    labels: list[int] = []
    bad: list[int] = []
    j = 0
    try:
        for offset, payload in reader.scan():
            while j < offsets.size and offsets[j] < offset:
                bad.append(j)
                j += 1
            if j < offsets.size and offsets[j] == offset:
                if is_image[j]:
                    try:
                        labels.append(fs.label_from_head(payload, int(keys[j])))
                    except ValueError as exc:
                        problems.append(str(exc))  # every one: each is a silently wrong class otherwise
                j += 1
    except RecordIOError as exc:
        problems.append(str(exc))
    bad += range(j, offsets.size)
    for pos in bad[:_MAX_LISTED]:
        try:
            reader.payload_at(pos)
            why = "is not a record start reached by scanning the file"
        except RecordIOError as exc:
            why = str(exc)
        problems.append(f"{fs.idx_path}: key {int(keys[pos])} -> offset {int(offsets[pos])}: {why}")
    if len(bad) > _MAX_LISTED:
        problems.append(f"{fs.idx_path}: {len(bad) - _MAX_LISTED} more keys point to invalid offsets")
    return np.asarray(labels, dtype=np.int64)


def inspect_dir(root: str | os.PathLike, decode: int = 0) -> dict:
    """Check a ``train.rec/.idx/property`` directory and summarise it.

    Returns a dict with ``root, ok, problems (list[str]), layout, num_records, num_images,
    num_classes, image_size, label_min, label_max, num_labels_seen, identity_range, rec_bytes,
    decoded``. Missing files, an unreadable index or a bad meta record are reported as problems.
    """
    info: dict = {"root": str(root), "problems": [], "decoded": 0}
    problems: list[str] = info["problems"]
    try:
        fs = FaceRecordSet(root)
    except (OSError, ValueError, KeyError) as exc:
        problems.append(str(exc))
        info["ok"] = False
        return info
    info.update(
        layout=fs.layout, num_records=len(fs.reader), num_images=len(fs), num_classes=fs.num_classes,
        image_size=tuple(fs.image_size) if fs.image_size else None, identity_range=fs.identity_range,
        rec_bytes=fs.reader.source.size,
    )
    labels = _scan(fs, problems)
    if labels.size:
        info.update(label_min=int(labels.min()), label_max=int(labels.max()), num_labels_seen=int(np.unique(labels).size))
    if decode > 0 and len(fs):
        picks = np.unique(np.linspace(0, len(fs) - 1, num=min(decode, len(fs))).astype(np.int64))
        for i in picks.tolist():
            try:
                _, data = fs.parse(i, fs.read_raw(i))
                decode_face(data, fs.image_size)
            except ValueError as exc:
                problems.append(f"{fs.where(i)}: {exc}")
                continue
            info["decoded"] += 1
    info["ok"] = not problems
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: print the summary, exit 1 on problems."""
    parser = argparse.ArgumentParser(prog="python -m facemargin.data.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="directory with train.rec, train.idx, property")
    parser.add_argument("--decode", type=int, default=0, metavar="N", help="decode N images as well")
    args = parser.parse_args(argv)
    from ..cli import run_cli
    from ..errors import UserError

    def run() -> dict:
        if "://" not in args.root and not os.path.isdir(args.root):
            raise UserError(f"{args.root}: no such folder (a set folder holds train.rec, train.idx and property)")
        return inspect_dir(args.root, decode=args.decode)

    info = run_cli(run, "facemargin.data.inspect")
    for name in ("root", "layout", "num_records", "num_images", "num_classes", "image_size",
                 "label_min", "label_max", "num_labels_seen", "identity_range", "rec_bytes", "decoded"):
        if name in info:
            print(f"{name:>16}: {info[name]}")
    if info["ok"]:
        print("OK")
        return 0
    for p in info["problems"]:
        print(f"ERROR: {p}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
