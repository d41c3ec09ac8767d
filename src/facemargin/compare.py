"""Same person? ``python -m facemargin.compare MODEL a.jpg b.jpg [threshold=COS] [set=NAME] [key=value ...]``.

Prints the cosine similarity of the two faces' embeddings (image + flip, L2-normalised) and
"same" or "different" at a cosine threshold: ``threshold`` given, or the one validation chose and
stored in the checkpoint (the export copies it), naming the set that chose it. ``set`` picks
which set's threshold (default: the first stored). Only sets with same- and different-person
pairs in every fold store one (:mod:`facemargin.evaluation.thresholds`); without one, compare
asks for ``threshold=``.
A photo of the model's input size is taken as an aligned crop; any other photo is detected and
aligned, and the face used is printed (box, score, how many were found, the choice rule) --
``detect=true|false`` forces either way, ``landmarks=FILE`` gives the 5 points instead (lines
``a.jpg x1 y1 ... x5 y5``, paths as given on the command line).
Published models take the model options of ``embed`` (``backbone``, ``input.*``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .cli import Option, parse_kv_args, run_cli
from .errors import UserError
from .published.options import MODEL_OPTIONS

if TYPE_CHECKING:
    from .evaluation.embedder import Embedder

__all__ = ["compare", "decision_threshold", "main"]

PROG = "facemargin.compare"
POSITIONAL = {"MODEL": "a checkpoint or an exported .onnx / TorchScript file", "A": "first photo", "B": "second photo"}
OPTIONS = {
    "threshold": Option("", "cosine threshold (default: the one validation stored with the model)"),
    "set": Option("", "which stored validation set's threshold (default: the first)"),
    "detect": Option("auto", "auto: detect a photo not of the model's input size | true | false"),
    "detector": Option("mtcnn", "face detector, conf/detector/NAME.yaml (mtcnn runs offline)"),
    "detector.KEY": Option("VALUE", "set a detector option, e.g. detector.min_face_size=40"),
    "choice": Option("largest", "which face of a photo with several: largest | central"),
    "min_score": Option("0", "ignore detected faces scoring below this"),
    "landmarks": Option("", "landmark list FILE (a.jpg x1 y1 ... x5 y5): align by it, no detection"),
    "device": Option("auto", "cpu | cuda | auto"),
    **MODEL_OPTIONS,
}


def compare(model_path: str, a: str, b: str, threshold: float | None = None, set_name: str | None = None,
            landmarks: str | None = None, device: str = "auto", detect: str = "auto", detector: Any = "mtcnn",
            choice: str = "largest", min_score: float = 0.0, backbone: str | None = None,
            input: dict[str, str] | None = None) -> dict[str, object]:
    """``{"cosine", "threshold", "threshold_from", "same", "faces"}`` for two photos.

    ``faces``: ``{photo: how its face was found}`` for each detected photo (empty when both are
    aligned crops or ``landmarks`` gives the points). ``detector``: a name in ``conf/detector/``,
    a ``_target_`` mapping or a built detector. ``backbone`` / ``input``: see
    :func:`~facemargin.evaluation.embedder.load_embedder` (published model files).
    """
    import numpy as np

    from .embed import embed_files, locate_faces, read_landmarks
    from .evaluation.embedder import load_embedder

    model = load_embedder(model_path, device, backbone=backbone, input=input)
    cos_threshold, source = decision_threshold(model, threshold, set_name)  # before any work: it may be missing
    paths = [Path(a), Path(b)]
    faces: dict[str, str] = {}
    if landmarks:
        listed, rows = read_landmarks(Path(landmarks), Path("."))
        lookup = {str(p): r for p, r in zip(listed, rows)}
        missing = [str(p) for p in paths if str(p) not in lookup]
        if missing:
            raise UserError(f"{landmarks}: no landmarks for {missing}")
        points = np.stack([lookup[str(p)] for p in paths])
    else:
        _, points, survey = locate_faces(paths, model.input_size, detect, detector, choice, min_score)
        if survey is not None:
            if survey.no_face:
                raise UserError(f"no face found in {', '.join(survey.no_face)} ({choice} face of those scoring >= "
                                f"{min_score:g})", hint="give its 5 landmarks (landmarks=FILE) or lower the detector's thresholds")
            faces = {name: found.describe() for name, found in survey.faces.items()}
    emb = embed_files(model, paths, points, batch_size=2, progress=False)
    cosine = float(emb[0] @ emb[1])
    return {"cosine": cosine, "threshold": cos_threshold, "threshold_from": source, "same": cosine > cos_threshold,
            "faces": faces}


def decision_threshold(model: "Embedder", threshold: float | None = None, set_name: str | None = None) -> tuple[float, str]:
    """``(cosine threshold, where it comes from)``: ``threshold`` as given, else the one a validation
    set chose and stored with the model (:func:`~facemargin.evaluation.thresholds.choose_threshold`:
    a :class:`~facemargin.errors.UserError` when none is stored, naming the sets that could not)."""
    from .evaluation.thresholds import choose_threshold

    if threshold is not None:
        return float(threshold), "given"
    cos_threshold, _, said = choose_threshold(model.metadata, set_name, model.source)
    return cos_threshold, said


def main(argv: Sequence[str] | None = None) -> None:
    from .detect.__main__ import split_detector_options

    argv, detector_options = split_detector_options(sys.argv[1:] if argv is None else argv)
    args = parse_kv_args(argv, PROG, __doc__, POSITIONAL, OPTIONS)
    run_cli(lambda: _run(args, detector_options), PROG)


def _run(args: dict[str, str], detector_options: dict[str, str]) -> None:
    from .detect.pipeline import load_detector
    from .published.options import model_options

    try:
        threshold = float(args["threshold"]) if args["threshold"] else None
        min_score = float(args["min_score"])
    except ValueError:
        raise UserError(f"threshold={args['threshold']!r} / min_score={args['min_score']!r}: expected numbers") from None
    detector: Any = load_detector(args["detector"], **detector_options) if detector_options else args["detector"]
    r = compare(args["MODEL"], args["A"], args["B"], threshold, args["set"] or None, args["landmarks"] or None,
                args["device"], args["detect"].lower(), detector, args["choice"], min_score, **model_options(args))
    for photo, found in r["faces"].items():  # type: ignore[union-attr]
        print(f"{photo}: {found}")
    verdict = "same person" if r["same"] else "different people"
    print(f"cosine similarity {r['cosine']:.4f}; threshold {r['threshold']:.4f} cosine ({r['threshold_from']}): {verdict}")


if __name__ == "__main__":
    main()
