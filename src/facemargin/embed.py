"""Embed your photos: ``python -m facemargin.embed MODEL IMAGES_DIR [out=embeddings.npy] [key=value ...]``.

``MODEL``: a training checkpoint, an exported ``.onnx`` / TorchScript file, or a published model
(insightface ``backbone.pth`` with ``backbone=iresnet50``, AdaFace ``.ckpt``, CVLface ``model.pt``,
a foreign ONNX file with ``input.channel_order= input.mean= input.std=``). ``IMAGES_DIR``: aligned
face crops of the model's input size (112x112), read recursively in sorted order; or any photos
when ``landmarks=FILE`` gives 5 points per image (lines ``relative/path x1 y1 ... x5 y5 [score]``,
insightface's ``*_5pts`` format; then exactly the listed images are embedded, aligned first).

Writes ``out`` (float32 ``[N, D]``, L2-normalised, image + flip) and next to it ``<out>.txt`` with
the image paths, one per row. Options: ``out``, ``landmarks``, ``batch_size`` (64), ``device``
(auto), ``num_workers`` (0), ``progress`` (true), and the model options ``backbone``, ``input.size``,
``input.channel_order``, ``input.mean``, ``input.std`` (:mod:`facemargin.published.options`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .data.verification import encoded_image_size
from .detect.landmarks import read_landmarks as read_landmark_file
from .evaluation.base import ImageFiles
from .evaluation.embedder import Embedder, load_embedder
from .evaluation.runner import embed_dataset
from .published.options import MODEL_OPTIONS, model_options

__all__ = ["IMAGE_SUFFIXES", "embed_files", "find_images", "parse_args", "read_landmarks"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def parse_args(argv: Sequence[str], positional: Sequence[str], options: dict[str, str], usage: str) -> dict[str, str]:
    """``NAME ... key=value ...`` -> one dict; unknown keys and missing positionals exit with ``usage``."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        raise SystemExit(0)
    pos = [a for a in argv if "=" not in a]
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = sorted(set(opts) - set(options))
    if len(pos) != len(positional) or unknown:
        why = f"unknown option(s) {unknown}; known: {sorted(options)}" if unknown else f"expected {' '.join(positional)}"
        raise SystemExit(f"{why}\n{usage}")
    return {**options, **dict(zip(positional, pos)), **opts}


def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, sorted)."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise FileNotFoundError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def read_landmarks(path: Path, root: Path) -> tuple[list[Path], np.ndarray]:
    """``(image paths, landmarks [N, 5, 2])`` in file order from a landmark list (:mod:`facemargin.detect.landmarks`)."""
    marks = read_landmark_file(path, root)
    return [Path(p) for p in marks], np.stack(list(marks.values()))


def embed_files(
    model: Embedder, paths: Sequence[Path], landmarks: np.ndarray | None = None, batch_size: int = 64,
    num_workers: int = 0, progress: bool = True,
) -> np.ndarray:
    """L2-normalised embeddings ``[N, D]`` (image + flip) of image files, aligned when landmarks are given.

    Without landmarks every image must be an aligned crop of the model's input size: a file of
    another size (read from its header) is refused by name.
    """
    side = model.input_size
    if landmarks is None:
        for path in paths:
            with open(path, "rb") as f:
                size = encoded_image_size(f.read(1 << 16))
            if size is not None and size != (side, side):
                raise ValueError(f"{path} is {size[1]}x{size[0]} but the model takes {side}x{side} aligned faces: "
                                 "align it first, or give its 5 landmarks (landmarks=FILE)")
    images = ImageFiles(paths, landmarks, side)
    emb, _ = embed_dataset(model, images, batch_size, num_workers, progress, name=str(Path(paths[0]).parent))
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(
        sys.argv[1:] if argv is None else argv, ["model", "images"],
        {"out": "embeddings.npy", "landmarks": "", "batch_size": "64", "device": "auto", "num_workers": "0",
         "progress": "true", **{k: o.default for k, o in MODEL_OPTIONS.items()}},
        __doc__.split("\n\n")[0],
    )
    root = Path(args["images"])
    if args["landmarks"]:
        paths, landmarks = read_landmarks(Path(args["landmarks"]), root)
    else:
        paths, landmarks = find_images(root), None
    model = load_embedder(args["model"], args["device"], **model_options(args))
    emb = embed_files(model, paths, landmarks, int(args["batch_size"]), int(args["num_workers"]),
                      args["progress"].lower() == "true")
    out = Path(args["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, emb.astype(np.float32))
    names = out.with_suffix(".txt")
    names.write_text("".join(f"{p.relative_to(root) if p.is_relative_to(root) else p}\n" for p in paths))
    print(f"{emb.shape[0]} embeddings of size {emb.shape[1]} -> {out} (image paths: {names})")


if __name__ == "__main__":
    main()
