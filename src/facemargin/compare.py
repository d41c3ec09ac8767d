"""Same person? ``python -m facemargin.compare MODEL a.jpg b.jpg [threshold=COS] [set=NAME] [key=value ...]``.

Prints the cosine similarity of the two faces' embeddings (image + flip, L2-normalised) and
"same" or "different" at a cosine threshold: ``threshold`` given, or the one validation chose and
stored in the checkpoint (the export copies it), naming the set that chose it. ``set`` picks
which set's threshold (default: the first stored). Only sets with same- and different-person
pairs in every fold store one (:mod:`facemargin.evaluation.thresholds`); without one, compare
asks for ``threshold=``.
The photos must be aligned crops of the model's input size unless ``landmarks=FILE`` gives their
5 points (lines ``a.jpg x1 y1 ... x5 y5``, paths as given on the command line). Other options:
``device`` (auto).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .embed import embed_files, parse_args, read_landmarks
from .evaluation.embedder import Embedder, load_embedder
from .evaluation.thresholds import choose_threshold

__all__ = ["compare", "decision_threshold", "main"]


def compare(model_path: str, a: str, b: str, threshold: float | None = None, set_name: str | None = None,
            landmarks: str | None = None, device: str = "auto") -> dict[str, object]:
    """``{"cosine", "threshold", "threshold_from", "same"}`` for two photos."""
    model = load_embedder(model_path, device)
    cos_threshold, source = decision_threshold(model, threshold, set_name)  # before any work: it may be missing
    paths = [Path(a), Path(b)]
    points = None
    if landmarks:
        listed, rows = read_landmarks(Path(landmarks), Path("."))
        lookup = {str(p): r for p, r in zip(listed, rows)}
        missing = [str(p) for p in paths if str(p) not in lookup]
        if missing:
            raise ValueError(f"{landmarks}: no landmarks for {missing}")
        points = np.stack([lookup[str(p)] for p in paths])
    emb = embed_files(model, paths, points, batch_size=2, progress=False)
    cosine = float(emb[0] @ emb[1])
    return {"cosine": cosine, "threshold": cos_threshold, "threshold_from": source, "same": cosine > cos_threshold}


def decision_threshold(model: Embedder, threshold: float | None = None, set_name: str | None = None) -> tuple[float, str]:
    """``(cosine threshold, where it comes from)``: ``threshold`` as given, else the one a validation
    set chose and stored with the model (:func:`~facemargin.evaluation.thresholds.choose_threshold`:
    a :class:`~facemargin.errors.UserError` when none is stored, naming the sets that could not)."""
    if threshold is not None:
        return float(threshold), "given"
    cos_threshold, _, said = choose_threshold(model.metadata, set_name, model.source)
    return cos_threshold, said


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(
        sys.argv[1:] if argv is None else argv, ["model", "a", "b"],
        {"threshold": "", "set": "", "landmarks": "", "device": "auto"}, __doc__.split("\n\n")[0],
    )
    r = compare(args["model"], args["a"], args["b"], float(args["threshold"]) if args["threshold"] else None,
                args["set"] or None, args["landmarks"] or None, args["device"])
    verdict = "same person" if r["same"] else "different people"
    print(f"cosine similarity {r['cosine']:.4f}; threshold {r['threshold']:.4f} cosine ({r['threshold_from']}): {verdict}")


if __name__ == "__main__":
    main()
