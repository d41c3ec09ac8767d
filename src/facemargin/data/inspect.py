"""Summarise and check a RecordIO face set directory.

    python -m facemargin.data.inspect DIR [--decode N]

Reads the whole ``train.rec`` once, sequentially: every ``.idx`` offset must be the start of a
valid record, every image label an integer in ``[0, num_classes)``. ``--decode N`` also decodes
``N`` images spread over the set and checks their size against ``property``. Exits 1 when a
problem is found.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .faceset import FaceRecordSet
from .recordio import RecordIOError

__all__ = ["inspect_dir", "decode_image", "main"]


def decode_image(data: bytes) -> np.ndarray:
    """Decode JPEG (simplejpeg) or other formats (PIL) to ``uint8[H, W, 3]`` RGB."""
    if data[:3] == b"\xff\xd8\xff":
        import simplejpeg

        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _check_records(fs: FaceRecordSet, problems: list[str]) -> dict[int, bytes]:
    """Scan the .rec once; return {offset: payload} heads and record index/offset mismatches."""
    reader = fs.reader
    heads: dict[int, bytes] = {}
    try:
        for offset, payload in reader.scan():
            heads[offset] = payload[:28]
    except RecordIOError as exc:
        problems.append(str(exc))
    offsets = reader.offset_array
    keys = reader.key_array
    starts = np.fromiter(heads.keys(), dtype=np.int64, count=len(heads))
    bad = ~np.isin(offsets, starts)
    for key, off in list(zip(keys[bad].tolist(), offsets[bad].tolist()))[:10]:
        try:
            reader.read_at(off)
            why = "is not a record start reached by scanning the file"
        except RecordIOError as exc:
            why = str(exc)
        problems.append(f"{fs.idx_path}: key {key} -> offset {off}: {why}")
    if bad.sum() > 10:
        problems.append(f"{fs.idx_path}: {int(bad.sum()) - 10} more keys point to invalid offsets")
    return heads


def inspect_dir(root: str | os.PathLike, decode: int = 0) -> dict:
    """Check a ``train.rec/.idx/property`` directory and summarise it.

    Returns a dict with ``root, ok, problems (list[str]), layout, num_records, num_images,
    num_classes, image_size, label_min, label_max, num_labels_seen, identity_range, rec_bytes,
    decoded``. Missing files or an unreadable index are reported as problems, not raised.
    """
    root = Path(root)
    info: dict = {"root": str(root), "problems": [], "decoded": 0}
    problems: list[str] = info["problems"]
    try:
        fs = FaceRecordSet(root)
    except (OSError, ValueError, KeyError) as exc:
        problems.append(str(exc))
        info["ok"] = False
        return info
    info.update(
        layout=fs.layout,
        num_records=len(fs.reader),
        num_images=len(fs),
        num_classes=fs.num_classes,
        image_size=tuple(fs.image_size) if fs.image_size else None,
        identity_range=fs.identity_range,
        rec_bytes=fs.rec_path.stat().st_size,
    )
    heads = _check_records(fs, problems)
    labels: list[int] = []
    key_to_offset = dict(zip(fs.reader.key_array.tolist(), fs.reader.offset_array.tolist()))
    label_errors = 0
    for key in fs.image_keys.tolist():
        head = heads.get(key_to_offset.get(key, -1))
        if head is None:
            continue  # already reported as a bad offset
        try:
            labels.append(fs.label_from_head(head, key))
        except ValueError as exc:
            label_errors += 1
            if label_errors <= 10:
                problems.append(str(exc))
    if label_errors > 10:
        problems.append(f"{fs.rec_path}: {label_errors - 10} more bad labels")
    if labels:
        arr = np.asarray(labels)
        info.update(label_min=int(arr.min()), label_max=int(arr.max()), num_labels_seen=int(np.unique(arr).size))
    if decode > 0 and len(fs):
        picks = np.unique(np.linspace(0, len(fs) - 1, num=min(decode, len(fs))).astype(np.int64))
        for key in fs.image_keys[picks].tolist():
            try:
                _, data = fs.read(key)
                img = decode_image(data)
            except Exception as exc:  # decoding errors come in many types
                problems.append(f"{fs.rec_path} (key {key}): cannot decode image: {exc}")
                continue
            if fs.image_size and img.shape[:2] != tuple(fs.image_size):
                problems.append(
                    f"{fs.rec_path} (key {key}): image is {img.shape[1]}x{img.shape[0]}, "
                    f"property says {fs.image_size[1]}x{fs.image_size[0]}"
                )
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
