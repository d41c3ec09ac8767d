"""Pack an identity-per-folder image tree into an insightface RecordIO set.

    python -m facemargin.data.pack IMAGE_ROOT OUT_DIR [--resize 112] [--quality 95]

``IMAGE_ROOT/<identity>/<image>``: sorted folder names become labels ``0 .. C-1`` (folders
without images are skipped), files are taken in sorted order. ``OUT_DIR`` receives
``train.rec``, ``train.idx`` and ``property`` in the insightface layout: key 0 is the meta record
(labels ``(a, b)``, ``a = 1 + num_images``, ``b = a + C``), images are keys ``1 .. a-1`` with
their identity as label, identity ``c`` is key ``a + c`` with labels ``(first_key, last_key + 1)``.
JPEG files are copied byte-for-byte unless ``--resize`` is given; other formats are re-encoded as
JPEG (RGB).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .recordio import IRHeader, RecordIOWriter, pack_record

__all__ = ["IMAGE_EXTENSIONS", "list_image_tree", "pack_images", "write_faceset", "main"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_MAX_EXACT_KEY = 1 << 24  # float32 labels hold integer keys exactly only below 2**24


def list_image_tree(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """``(identity names, [(image path, label), ...])`` for an identity-per-folder tree."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root is not a directory: {root}")
    names: list[str] = []
    items: list[tuple[Path, int]] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            print(f"warning: skipping {folder}: no images", file=sys.stderr)
            continue
        label = len(names)
        names.append(folder.name)
        items.extend((f, label) for f in files)
    if not items:
        raise ValueError(f"no images found under {root} (expected {root}/<identity>/<image>)")
    return names, items


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _image_size(data: bytes, path: Path) -> tuple[int, int]:
    """(height, width) from the image header."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.height, im.width
    except Exception as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


def encode_image(data: bytes, path: Path, resize: int | None = None, quality: int = 95) -> bytes:
    """JPEG bytes for one source image: copied if JPEG and not resized, else re-encoded (RGB)."""
    if resize is None and _is_jpeg(data):
        return data
    import simplejpeg
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if resize is not None and im.size != (resize, resize):
                im = im.resize((resize, resize), Image.BICUBIC)
            rgb = np.ascontiguousarray(np.asarray(im, dtype=np.uint8))
    except Exception as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from None
    return simplejpeg.encode_jpeg(rgb, quality=quality, colorspace="RGB")


def write_faceset(
    out_dir: str | os.PathLike,
    labels: Sequence[int],
    images: Iterable[bytes],
    num_classes: int,
    image_size: tuple[int, int],
    progress: bool = False,
) -> Path:
    """Write ``train.rec/.idx/property`` in the insightface layout.

    ``labels`` (known up front, sorted, every class ``0 .. num_classes-1`` present) gives the
    identity of each image; ``images`` yields the encoded bytes in the same order (may be lazy).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="img", desc=f"packing {out}")
    with RecordIOWriter(out / "train.rec", out / "train.idx") as writer:
        writer.write(0, pack_record(IRHeader(0, 0.0, 0, 0), b"", labels=[a, b]))
        count = 0
        for key, (label, data) in enumerate(zip(lab.tolist(), images), start=1):
            writer.write(key, pack_record(IRHeader(0, float(label), key, 0), data))
            count += 1
            if bar is not None:
                bar.update(1)
        if count != n:
            raise ValueError(f"write_faceset: {n} labels but {count} images")
        for c in range(num_classes):
            writer.write(a + c, pack_record(IRHeader(0, 0.0, a + c, 0), b"", labels=[starts[c], ends[c]]))
    if bar is not None:
        bar.close()
    (out / "property").write_text(f"{num_classes},{image_size[0]},{image_size[1]}", encoding="ascii")
    return out


def pack_images(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    resize: int | None = None,
    quality: int = 95,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Pack ``root/<identity>/<image>`` into ``out_dir``; returns a summary dict.

    All images must share one size unless ``resize`` makes them ``resize x resize``.
    """
    out = Path(out_dir)
    if (out / "train.rec").exists() and not overwrite:
        raise FileExistsError(f"{out / 'train.rec'} exists (pass overwrite=True / --overwrite)")
    names, items = list_image_tree(root)
    size: list[tuple[int, int]] = []

    def encoded() -> Iterable[bytes]:
        for path, _ in items:
            data = encode_image(path.read_bytes(), path, resize=resize, quality=quality)
            hw = _image_size(data, path)
            if not size:
                size.append(hw)
            elif hw != size[0]:
                raise ValueError(
                    f"{path} is {hw[1]}x{hw[0]} but earlier images are {size[0][1]}x{size[0][0]}; "
                    "use --resize to make them equal"
                )
            yield data

    labels = [label for _, label in items]
    # the property needs the size before writing: peek at the first image.
    first = items[0][0]
    size.append(_image_size(encode_image(first.read_bytes(), first, resize, quality), first))
    write_faceset(out, labels, encoded(), len(names), size[0], progress=progress)
    return {"out_dir": out, "num_images": len(items), "num_classes": len(names), "image_size": size[0], "identities": names}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m facemargin.data.pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("image_root", help="directory with one sub-folder of images per identity")
    parser.add_argument("out_dir", help="output directory for train.rec/train.idx/property")
    parser.add_argument("--resize", type=int, default=None, metavar="N", help="resize every image to N x N")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing train.rec")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        info = pack_images(args.image_root, args.out_dir, resize=args.resize, quality=args.quality,
                           progress=not args.quiet, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    h, w = info["image_size"]
    print(f"wrote {info['num_images']} images of {info['num_classes']} identities ({w}x{h}) to {info['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
