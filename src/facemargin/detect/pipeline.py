"""From a photo to the one aligned face a command uses: build a detector by name, pick a face, align it.

``load_detector("mtcnn")`` reads ``conf/detector/mtcnn.yaml`` (a Hydra ``_target_`` node) and
instantiates it, so ``detector=NAME`` means the same in ``python -m facemargin.detect``, ``embed``,
``compare`` and the packer; ``detector.KEY=VALUE`` options override the node's keys. A built
detector is cheap to pickle (its networks load on the first call), so a packer loop builds it
once and DataLoader workers receive it as it is::

    detector = load_detector("mtcnn")
    for path in photos:
        crop, found = detect_and_align(detector, decode_image(path.read_bytes()))
        if crop is None: ...                     # found.count == 0
        print(found.describe())                  # "largest of 2 faces: box ..., score 0.999"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import UserError
from .base import FACE_CHOICES, Detector, Face, select_face

__all__ = ["FaceChoice", "choose_face", "detect_and_align", "detector_names", "load_detector"]


def detector_names() -> list[str]:
    """The detectors ``conf/detector/`` defines."""
    from ..config import config_dir

    return sorted(p.stem for p in (config_dir() / "detector").glob("*.yaml"))


def load_detector(detector: str | Mapping[str, Any] | Detector = "mtcnn", **overrides: Any) -> Detector:
    """A detector from a name in ``conf/detector/``, a ``_target_`` mapping, or a built detector.

    ``overrides``: keys of the node to replace (values as typed on a command line are parsed as
    YAML: ``min_face_size=40``, ``thresholds=[0.6,0.7,0.9]``). A built detector is returned as
    it is (overrides refused).
    """
    if not isinstance(detector, (str, Mapping)) and not _is_config(detector):
        if overrides:
            raise UserError(f"detector options {sorted(overrides)} given for an already built {detector!r}")
        return _checked(detector, repr(detector))
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ..config import config_dir

    if isinstance(detector, str):
        path = config_dir() / "detector" / f"{detector}.yaml"
        if not path.is_file():
            raise UserError(f"unknown detector {detector!r}; conf/detector/ has: {', '.join(detector_names())}")
        node, where = OmegaConf.load(path), f"detector={detector}"
    else:
        node, where = OmegaConf.create(dict(detector) if isinstance(detector, Mapping) else detector), "detector"
    if "_target_" not in node:
        raise UserError(f"{where}: a detector config needs a _target_ (e.g. facemargin.detect.mtcnn.MTCNN)")
    unknown = sorted(set(overrides) - set(node) - {"_target_"})
    if unknown:
        raise UserError(f"{where}: unknown detector option(s) {unknown}; it has: {', '.join(k for k in node if k != '_target_')}")
    node = OmegaConf.merge(node, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))
    try:
        built = instantiate(node)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        raise UserError(f"{where}: {str(cause or err).splitlines()[0]}") from None
    return _checked(built, where)


def _is_config(obj: Any) -> bool:
    from omegaconf import OmegaConf

    return OmegaConf.is_config(obj)


def _checked(detector: Any, where: str) -> Detector:
    if not isinstance(detector, Detector):
        raise UserError(f"{where}: {type(detector).__name__} is not a detector (it needs name, cache_key and __call__(image))")
    return detector


@dataclass(frozen=True)
class FaceChoice:
    """The face chosen from one photo: ``face`` (``None`` when none), how many were found, the rule."""

    face: Face | None
    count: int
    choice: str

    def describe(self) -> str:
        """``largest of 2 faces: box 180,59-267,175, score 0.9998`` (``1 face: ...``) or ``no face found``."""
        if self.face is None:
            return "no face found"
        x1, y1, x2, y2 = (int(round(v)) for v in self.face.box)
        which = "1 face" if self.count == 1 else f"{self.choice} of {self.count} faces"
        return f"{which}: box {x1},{y1}-{x2},{y2}, score {self.face.score:.4f}"


def choose_face(detector: Detector, image: np.ndarray, choice: str = "largest", min_score: float = 0.0) -> FaceChoice:
    """Detect the faces of ``image`` (uint8 RGB) scoring at least ``min_score`` and pick one by ``choice``."""
    if choice not in FACE_CHOICES:
        raise UserError(f"face choice must be one of {', '.join(FACE_CHOICES)}, got {choice!r}")
    faces = [f for f in detector(image) if f.score >= min_score]
    return FaceChoice(select_face(faces, image.shape, choice), len(faces), choice)


def detect_and_align(detector: Detector, image: np.ndarray, choice: str = "largest", min_score: float = 0.0,
                     size: int = 112) -> tuple[np.ndarray | None, FaceChoice]:
    """``(the size x size ArcFace crop of the chosen face or None, the choice)``."""
    from ..align import align_face

    found = choose_face(detector, image, choice, min_score)
    if found.face is None:
        return None, found
    return align_face(image, found.face.landmarks, size), found
