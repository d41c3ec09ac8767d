"""Summarise and check a RecordIO face set directory.

    python -m facemargin.data.inspect DIR [--decode N]

Opening the set validates ``property``, the ``.idx`` and the meta record (see
:mod:`facemargin.data.sources.recordio`). Then the whole ``train.rec`` is read once, sequentially: every
``.idx`` offset must be the start of a valid record, every record must have its ``.idx`` line (a
deleted line drops the record from training) and every image label must be an integer in
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

from ..formats.image import decode_face
from ..formats.recordio import RecordIOError, unindexed_record
from ..formats.setfiles import SetFiles
from ..sources.recordio import FaceRecordSet

__all__ = ["inspect_dir", "main"]

_MAX_LISTED = 10


def _scan(fs: FaceRecordSet, problems: list[str]) -> np.ndarray:
    """Read the .rec once in file order, walking the index alongside; returns the image labels read.

    Reports index offsets that are not record starts, records no ``.idx`` line points at (a deleted
    line: the record would never be trained on) and every label problem.
    """
    reader = fs.reader
    is_image = np.zeros(len(reader), dtype=bool)
    is_image[fs.positions(np.arange(len(fs)))] = True
    labels: list[int] = []
    bad: list[int] = []
    unindexed: list[int] = []
    reached = 0
    try:
        for offset, pos, payload in reader.walk():
            if pos < 0:
                if not fs.subset:  # a subset index (facemargin.clean) leaves records out on purpose
                    unindexed.append(offset)
                continue
            reached = pos + 1
            if payload is None:
                bad.append(pos)
            elif is_image[pos]:
                try:
                    labels.append(fs.label_from_head(payload, reader.index.key_at(pos)))
                except ValueError as exc:
                    problems.append(str(exc))  # every one: each is a silently wrong class otherwise
    except RecordIOError as exc:
        problems.append(str(exc))
    bad += range(reached, len(reader))
    for pos in bad[:_MAX_LISTED]:
        try:
            reader.payload_at(pos)
            why = "is not a record start reached by scanning the file"
        except RecordIOError as exc:
            why = str(exc)
        problems.append(f"{fs.idx_path}: key {reader.index.key_at(pos)} -> offset {int(reader.index.offsets[pos])}: {why}")
    if len(bad) > _MAX_LISTED:
        problems.append(f"{fs.idx_path}: {len(bad) - _MAX_LISTED} more keys point to invalid offsets")
    problems += [str(unindexed_record(reader, offset)) for offset in unindexed[:_MAX_LISTED]]
    if len(unindexed) > _MAX_LISTED:
        problems.append(f"{fs.rec_path}: {len(unindexed) - _MAX_LISTED} more records are in no .idx line")
    return np.asarray(labels, dtype=np.int64)


def inspect_dir(root: str | os.PathLike | SetFiles, decode: int = 0) -> dict:
    """Check a ``train.rec/.idx/property`` directory (or the :class:`SetFiles` of one) and summarise it.

    Returns a dict with ``root, ok, problems (list[str]), layout, num_records, num_images,
    num_classes, image_size, label_min, label_max, num_labels_seen, identity_range, rec_bytes,
    decoded``. Missing files, an unreadable index or a bad meta record are reported as problems.
    """
    info: dict = {"root": str(root.root if isinstance(root, SetFiles) else root), "problems": [], "decoded": 0}
    problems: list[str] = info["problems"]
    try:
        fs = FaceRecordSet(root if isinstance(root, SetFiles) else SetFiles.at(root))
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
    info = inspect_dir(args.root, decode=args.decode)
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
