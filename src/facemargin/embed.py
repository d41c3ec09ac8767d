"""Embed your photos: ``python -m facemargin.embed MODEL IMAGES_DIR [out=embeddings.npy] [key=value ...]``.

``MODEL``: a training checkpoint, an exported ``.onnx`` / TorchScript file, or a published model
(insightface ``backbone.pth`` with ``backbone=iresnet50``, AdaFace ``.ckpt``, CVLface ``model.pt``,
a foreign ONNX file with ``input.channel_order= input.mean= input.std=``). ``IMAGES_DIR``: photos,
read recursively in sorted order. Which face is embedded and how it is aligned (``detect``):
``auto`` (default): a photo of the model's input size (112x112) is taken as an aligned crop, any
other photo is detected (``detector``, ``choice``, ``min_score``) and aligned to the ArcFace
template; ``true``: every photo is detected; ``false``: every photo must be an aligned crop.
``landmarks=FILE`` gives the 5 points per photo instead (lines ``relative/path x1 y1 ... x5 y5
[score]``, insightface's ``*_5pts`` format; then exactly the listed photos are embedded).

Writes ``out`` (float32 ``[N, D]``, L2-normalised, image + flip) and next to it ``<out>.txt`` with
the image paths, one per row; where faces were detected, ``<out>.landmarks.txt`` (the faces used,
readable by ``landmarks=``) and ``<out>.noface.txt`` (photos left out: no face found).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .cli import Option, parse_kv_args, run_cli
from .errors import UserError
from .published.options import MODEL_OPTIONS

if TYPE_CHECKING:
    from .detect.survey import Survey
    from .evaluation.embedder import Embedder

__all__ = ["DETECT_MODES", "IMAGE_SUFFIXES", "NotAlignedError", "embed_files", "find_images", "locate_faces",
           "read_landmarks"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

#: How ``detect=`` decides which photos go through the face detector.
DETECT_MODES = ("auto", "true", "false")

PROG = "facemargin.embed"
POSITIONAL = {"MODEL": "a checkpoint or an exported .onnx / TorchScript file",
              "IMAGES_DIR": "folder of photos, read recursively in sorted order"}
OPTIONS = {
    "out": Option("embeddings.npy", "embeddings to write (.npy); image paths go to <out>.txt"),
    "detect": Option("auto", "auto: detect photos not of the model's input size | true: all | false: none"),
    "detector": Option("mtcnn", "face detector, conf/detector/NAME.yaml (mtcnn runs offline)"),
    "detector.KEY": Option("VALUE", "set a detector option, e.g. detector.min_face_size=40"),
    "choice": Option("largest", "which face of a photo with several: largest | central"),
    "min_score": Option("0", "ignore detected faces scoring below this"),
    "landmarks": Option("", "landmark list FILE (path x1 y1 ... x5 y5): align by it, no detection"),
    "batch_size": Option("64", "images per forward pass"),
    "device": Option("auto", "cpu | cuda | auto"),
    "num_workers": Option("0", "DataLoader workers decoding the photos"),
    "progress": Option("true", "show progress bars"),
    **MODEL_OPTIONS,
}


class NotAlignedError(UserError, ValueError):
    """A photo that is not an aligned crop of the model's input size where one is required."""


def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, sorted)."""
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UserError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def read_landmarks(path: Path, root: Path) -> tuple[list[Path], np.ndarray]:
    """``(image paths, landmarks [N, 5, 2])`` in file order from a landmark list (:mod:`facemargin.detect.landmarks`)."""
    from .detect.landmarks import read_landmarks as read_landmark_file

    marks = read_landmark_file(path, root)
    return [Path(p) for p in marks], np.stack(list(marks.values()))


def _header_size(path: Path) -> tuple[int, int] | None:
    from .data.formats.verification import encoded_image_size

    with open(path, "rb") as f:
        return encoded_image_size(f.read(1 << 16))


def embed_files(
    model: "Embedder", paths: Sequence[Path], landmarks: np.ndarray | None = None, batch_size: int = 64,
    num_workers: int = 0, progress: bool = True,
) -> np.ndarray:
    """L2-normalised embeddings ``[N, D]`` (image + flip) of image files, aligned when landmarks are given.

    Without landmarks every image must be an aligned crop of the model's input size: a file of
    another size (read from its header) is refused by name (:class:`NotAlignedError`).
    """
    from .evaluation.base import ImageFiles
    from .evaluation.runner import embed_dataset

    side = model.input_size
    if landmarks is None:
        for path in paths:
            size = _header_size(Path(path))
            if size is not None and size != (side, side):
                raise NotAlignedError(f"{path} is {size[1]}x{size[0]} but the model takes {side}x{side} aligned faces: "
                                      "let a detector find the face (detect=auto or true), or give its 5 landmarks "
                                      "(landmarks=FILE)")
    images = ImageFiles(paths, landmarks, side)
    emb, _ = embed_dataset(model, images, batch_size, num_workers, progress, name=str(Path(paths[0]).parent))
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def locate_faces(
    paths: Sequence[Path], side: int, detect: str = "auto", detector: object = "mtcnn", choice: str = "largest",
    min_score: float = 0.0, root: Path | None = None, progress: bool = False,
) -> tuple[list[Path], np.ndarray | None, "Survey | None"]:
    """``(photos to embed, their landmarks [N, 5, 2] or None, the detection survey or None)``.

    ``detect`` (:data:`DETECT_MODES`): ``auto`` detects the photos whose header size is not
    ``side x side``, ``true`` every photo, ``false`` none (the photos must be aligned crops). An
    aligned crop among detected photos gets the template's own points, so aligning it is the
    identity. Photos where no face is found are left out (listed in the survey).
    ``detector``: a name in ``conf/detector/``, a ``_target_`` mapping, or a built detector.
    """
    if detect not in DETECT_MODES:
        raise UserError(f"detect={detect!r}: expected one of {', '.join(DETECT_MODES)}")
    paths = [Path(p) for p in paths]
    if detect == "false":
        return paths, None, None
    unique = list(dict.fromkeys(paths))
    to_detect = unique if detect == "true" else [p for p in unique if _header_size(p) != (side, side)]
    if not to_detect:
        return paths, None, None
    from .align import arcface_template
    from .detect.pipeline import load_detector
    from .detect.survey import survey

    found = survey(to_detect, load_detector(detector), choice, min_score, root, progress)
    by_path = dict(zip(to_detect, found.faces.values()))
    template = arcface_template(side)
    kept, marks = [], []
    for path in paths:
        face = by_path[path].face if path in by_path else None
        if path in by_path and face is None:
            continue
        kept.append(path)
        marks.append(template if face is None else face.landmarks)
    if not kept:
        raise UserError(f"no face found in any of the {len(paths)} photo(s) ({found.no_face[0]}{', ...' if len(paths) > 1 else ''})",
                        hint="lower the detector's thresholds (detector.thresholds=...) or give landmarks=FILE")
    return kept, np.stack(marks), found


def main(argv: Sequence[str] | None = None) -> None:
    from .detect.__main__ import split_detector_options

    argv, detector_options = split_detector_options(sys.argv[1:] if argv is None else argv)
    args = parse_kv_args(argv, PROG, __doc__, POSITIONAL, OPTIONS)
    run_cli(lambda: _run(args, detector_options), PROG)


def _number(args: dict[str, str], key: str, kind: type = int):
    try:
        return kind(args[key])
    except ValueError:
        raise UserError(f"{key}={args[key]!r}: expected {'an integer' if kind is int else 'a number'}") from None


def _run(args: dict[str, str], detector_options: dict[str, str]) -> None:
    from .evaluation.embedder import load_embedder
    from .published.options import model_options

    root = Path(args["IMAGES_DIR"])
    out = Path(args["out"])
    progress = args["progress"].lower() == "true"
    model = load_embedder(args["MODEL"], args["device"], **model_options(args))
    survey = None
    if args["landmarks"]:
        if args["detect"] == "true":
            raise UserError("landmarks=FILE and detect=true: give the landmarks or let the detector find them, not both")
        paths, landmarks = read_landmarks(Path(args["landmarks"]), root)
    else:
        detector = {"detector": args["detector"], **detector_options}
        paths, landmarks, survey = locate_faces(
            find_images(root), model.input_size, args["detect"].lower(), _detector_spec(detector), args["choice"],
            _number(args, "min_score", float), root, progress)
    emb = embed_files(model, paths, landmarks, _number(args, "batch_size"), _number(args, "num_workers"), progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, emb.astype(np.float32))
    names = out.with_suffix(".txt")
    names.write_text("".join(f"{p.relative_to(root) if p.is_relative_to(root) else p}\n" for p in paths))
    print(f"{emb.shape[0]} embeddings of size {emb.shape[1]} -> {out} (image paths: {names})")
    if survey is not None:
        _report_survey(survey, out)


def _detector_spec(options: dict[str, str]) -> object:
    """``detector=NAME`` plus ``detector.KEY=VALUE`` options -> what :func:`load_detector` takes."""
    name = options.pop("detector")
    if not options:
        return name
    from .detect.pipeline import load_detector

    return load_detector(name, **options)


def _report_survey(survey: "Survey", out: Path) -> None:
    """Write the faces used and the photos without one next to ``out``; say so."""
    from .detect.landmarks import write_landmarks

    used = out.with_suffix(".landmarks.txt")
    rows = [(name, face.face.landmarks, face.face.score) for name, face in survey.faces.items() if face.face is not None]
    if rows:
        write_landmarks(used, rows)
    several = survey.several
    print(f"detected {len(rows)} of {survey.total} photos ({survey.choice} face where several: {len(several)} photos)"
          + (f"; faces used -> {used}" if rows else ""))
    if survey.no_face:
        noface = out.with_suffix(".noface.txt")
        noface.write_text("".join(f"{name}\n" for name in survey.no_face))
        print(f"no face found in {len(survey.no_face)} photos, not embedded -> {noface}")


if __name__ == "__main__":
    main()
