"""Same person? ``python -m facemargin.compare MODEL a.jpg b.jpg [threshold=COS] [set=NAME] [key=value ...]``.

Prints the cosine similarity of the two faces' embeddings (image + flip, L2-normalised) and
"same" or "different" at the threshold a verification run chose: validation stores a squared-L2
threshold ``t`` on normalised embeddings in the checkpoint (and the export copies it);
``|a - b|^2 = 2 - 2 cos``, so the cosine threshold is ``1 - t / 2``. ``set`` picks which
validation set's threshold (default: the first stored); ``threshold`` gives a cosine directly.
The photos must be aligned crops of the model's input size unless ``landmarks=FILE`` gives their
5 points (lines ``a.jpg x1 y1 ... x5 y5``, paths as given on the command line). Other options:
``device`` (auto), and the model options of ``embed`` (``backbone``, ``input.*``) for published models.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .embed import embed_files, parse_args, read_landmarks
from .evaluation.embedder import load_embedder
from .published.options import MODEL_OPTIONS, model_options

__all__ = ["compare", "main"]


def compare(model_path: str, a: str, b: str, threshold: float | None = None, set_name: str | None = None,
            landmarks: str | None = None, device: str = "auto", backbone: str | None = None,
            input: dict[str, str] | None = None) -> dict[str, object]:
    """``{"cosine", "threshold", "threshold_from", "same"}`` for two photos."""
    model = load_embedder(model_path, device, backbone=backbone, input=input)
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
    if threshold is not None:
        cos_threshold, source = float(threshold), "given"
    else:
        cos_threshold, name = model.cosine_threshold(set_name)
        acc = (model.metadata.get("verification") or {}).get(name, {}).get("acc")
        source = f"chosen by validation on {name}" + (f" (accuracy {acc:.4f})" if acc is not None else "")
    return {"cosine": cosine, "threshold": cos_threshold, "threshold_from": source, "same": cosine > cos_threshold}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(
        sys.argv[1:] if argv is None else argv, ["model", "a", "b"],
        {"threshold": "", "set": "", "landmarks": "", "device": "auto", **{k: o.default for k, o in MODEL_OPTIONS.items()}},
        __doc__.split("\n\n")[0],
    )
    r = compare(args["model"], args["a"], args["b"], float(args["threshold"]) if args["threshold"] else None,
                args["set"] or None, args["landmarks"] or None, args["device"], **model_options(args))
    verdict = "same person" if r["same"] else "different people"
    print(f"cosine similarity {r['cosine']:.4f}; threshold {r['threshold']:.4f} ({r['threshold_from']}): {verdict}")


if __name__ == "__main__":
    main()
