"""1:1 verification on image pairs: insightface's LFW / CFP-FP / AgeDB-30 protocol and its evaluators.

Protocol, identical to insightface ``verification.evaluate`` so figures compare with published
ones: the caller passes each image's embedding summed with its horizontal flip's; XNorm is the
mean L2 norm of those rows; rows are L2-normalised; pair ``i`` is rows ``(2i, 2i+1)``; distance is
the squared L2 distance; a pair is predicted "same" when ``dist < threshold``. Accuracy uses
thresholds ``arange(0, 4, 0.01)`` and 10 ordered folds (sklearn ``KFold(10, shuffle=False)``):
the threshold maximising accuracy on the 9 training folds (first maximum) scores the held-out
fold. TAR@FAR follows ``calculate_val`` (thresholds ``arange(0, 4, 0.001)``): per fold, the
threshold reaching the target FAR on the training folds is found by linear interpolation of
(FAR, threshold) and the TAR of the held-out fold at that threshold is averaged.

A FAR target needs at least ``1 / FAR`` negative pairs in every training split to be resolved
(LFW's 2 700 negatives per split resolve 1e-3, not 1e-4); otherwise its TAR is NaN (``null`` in
JSON) and the evaluator says why in :attr:`~facemargin.evaluation.base.Evaluator.notes`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch.utils.data import Dataset

from .base import EncodedImages, Evaluator, ImageFiles, file_key

__all__ = [
    "BinPairsEvaluator",
    "datamodule_evaluators",
    "FolderPairsEvaluator",
    "PairsEvaluator",
    "far_key",
    "kfold_splits",
    "unresolved_far_targets",
    "verification_scores",
]

ACC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
#: FAR targets reported by default (insightface reports 1e-3; 1e-4 where the pairs allow).
FAR_TARGETS = (1e-3, 1e-4)


def far_key(far: float) -> str:
    """The metric name of TAR at ``far``: ``1e-3 -> "tar@far=1e-3"``."""
    return "tar@far=" + re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{far:.0e}")


def kfold_splits(n: int, nfolds: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ordered (train, test) index splits as sklearn ``KFold(nfolds, shuffle=False)``.

    The first ``n % nfolds`` folds hold one extra item. ``nfolds == 1`` trains and tests on all
    items (insightface's ``LFold``).
    """
    idx = np.arange(n)
    if nfolds == 1:
        return [(idx, idx)]
    if not 1 < nfolds <= n:
        raise ValueError(f"need 1 <= nfolds <= number of pairs, got nfolds={nfolds}, pairs={n}")
    sizes = np.full(nfolds, n // nfolds)
    sizes[: n % nfolds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [
        (np.concatenate([idx[: bounds[k]], idx[bounds[k + 1] :]]), idx[bounds[k] : bounds[k + 1]])
        for k in range(nfolds)
    ]


def _count_below(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of values strictly below each threshold (``sorted_values`` ascending)."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def _accuracy_curve(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of ``dist < t`` as a 'same' prediction, for every threshold ``t``."""
    pos, neg = np.sort(dist[same]), np.sort(dist[~same])
    true_accept = _count_below(pos, thresholds)
    true_reject = neg.size - _count_below(neg, thresholds)
    return (true_accept + true_reject) / dist.size


def _far_curve(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """False accept rate of ``dist < t`` for every threshold (0 when there is no negative pair)."""
    neg = np.sort(dist[~same])
    if neg.size == 0:
        return np.zeros(thresholds.size)
    return _count_below(neg, thresholds) / neg.size


def _threshold_at_far(far: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """Threshold where the non-decreasing ``far`` curve reaches ``far_target``.

    Reproduces ``scipy.interpolate.interp1d(far, thresholds, kind="slinear")(far_target)`` on a
    monotone curve with repeated values: linear between the last point at or below the target and
    the next point; on an exact hit the last point with that FAR (the first one at the top end).
    Returns 0.0 when the target FAR is never reached (insightface).
    """
    if far.max() < far_target:
        return 0.0
    hits = np.flatnonzero(far == far_target)
    if hits.size:
        return float(thresholds[hits[0] if far_target == far[-1] else hits[-1]])
    i = int(np.searchsorted(far, far_target, side="right")) - 1  # last far < target
    x0, x1, y0, y1 = far[i], far[i + 1], thresholds[i], thresholds[i + 1]
    return float(y0 + (far_target - x0) * (y1 - y0) / (x1 - x0))


def _tar_far(dist: np.ndarray, same: np.ndarray, threshold: float) -> tuple[float, float]:
    """(TAR, FAR) on these pairs at ``dist < threshold``; NaN where a class is absent."""
    accept = dist < threshold
    n_same, n_diff = int(same.sum()), int((~same).sum())
    tar = float((accept & same).sum()) / n_same if n_same else float("nan")
    far = float((accept & ~same).sum()) / n_diff if n_diff else float("nan")
    return tar, far


def unresolved_far_targets(
    issame: np.ndarray, nfolds: int = 10, far_targets: Sequence[float] = FAR_TARGETS
) -> dict[float, tuple[int, int]]:
    """FAR targets these pairs cannot resolve: ``{far: (negatives needed, negatives in the smallest
    training split)}``; a target needs ``round(1 / far)`` negative pairs in every training split."""
    same = np.asarray(issame, dtype=bool).reshape(-1)
    have = min(int((~same[train]).sum()) for train, _ in kfold_splits(same.size, nfolds))
    return {float(f): (round(1.0 / f), have) for f in far_targets if have < round(1.0 / f)}


def verification_scores(
    embeddings: np.ndarray,
    issame: np.ndarray,
    nfolds: int = 10,
    view_norms: np.ndarray | None = None,
    far_targets: Sequence[float] = FAR_TARGETS,
) -> dict[str, float]:
    """insightface verification figures for ``embeddings [2N, D]`` (image + flip summed, not normalised).

    ``view_norms [2N]``: each image's mean L2 norm over its views (image and flip) before they were
    summed; insightface's XNorm is their mean. Without it, XNorm is the mean norm of ``embeddings``.

    Returns ``acc`` (mean of the fold accuracies), ``acc_std``, ``threshold`` (mean best threshold
    over folds), ``xnorm`` and ``tar@far=<far>`` for each of ``far_targets`` (mean TAR over folds;
    NaN when the training folds hold fewer than ``1/FAR`` negative pairs, too few to resolve that FAR).
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    same = np.asarray(issame, dtype=bool).reshape(-1)
    if emb.ndim != 2 or emb.shape[0] != 2 * same.size:
        raise ValueError(f"need embeddings [2N, D] for N={same.size} pairs, got {tuple(emb.shape)}")
    norms = np.linalg.norm(emb, axis=1)
    xnorm = float(norms.mean() if view_norms is None else np.asarray(view_norms, dtype=np.float64).mean())
    emb = emb / np.where(norms == 0, 1.0, norms)[:, None]  # like sklearn.preprocessing.normalize
    dist = np.square(emb[0::2] - emb[1::2]).sum(axis=1)

    folds = kfold_splits(same.size, nfolds)
    accs, best_thresholds = [], []
    for train, test in folds:
        best = int(np.argmax(_accuracy_curve(dist[train], same[train], ACC_THRESHOLDS)))
        best_thresholds.append(ACC_THRESHOLDS[best])
        accs.append(_accuracy_curve(dist[test], same[test], ACC_THRESHOLDS[best : best + 1])[0])

    scores: dict[str, float] = {
        "acc": float(np.mean(accs)),
        "acc_std": float(np.std(accs)),
        "threshold": float(np.mean(best_thresholds)),
        "xnorm": xnorm,
    }
    unresolved = unresolved_far_targets(same, nfolds, far_targets)
    for far_target in far_targets:
        key = far_key(far_target)
        if float(far_target) in unresolved:
            scores[key] = float("nan")
            continue
        tars = []
        for train, test in folds:
            far_train = _far_curve(dist[train], same[train], VAL_THRESHOLDS)
            threshold = _threshold_at_far(far_train, VAL_THRESHOLDS, far_target)
            tars.append(_tar_far(dist[test], same[test], threshold)[0])
        scores[key] = float(np.mean(tars))
    return scores


class PairsEvaluator(Evaluator):
    """insightface's 1:1 verification protocol over encoded images whose pairs are ``(2i, 2i+1)``.

    ``compute()`` returns ``acc``, ``acc_std``, ``threshold``, ``xnorm`` and ``tar@far=<far>`` for
    each of ``far_targets`` (see :func:`verification_scores`). ``images``: the encoded images (a
    subclass may hold what its :meth:`dataset` reads instead, e.g. file paths).
    """

    def __init__(
        self,
        images: Sequence[bytes] | Sequence[Path],
        issame: Sequence[bool] | np.ndarray,
        name: str = "pairs",
        nfolds: int = 10,
        far_targets: Sequence[float] = FAR_TARGETS,
        source: str | None = None,
        **kwargs: Any,
    ) -> None:
        issame = np.asarray(issame, dtype=bool).reshape(-1)
        if len(images) != 2 * issame.size:
            raise ValueError(f"{source or name}: {len(images)} images for {issame.size} pairs (expected {2 * issame.size})")
        super().__init__(name, len(images), **kwargs)
        self.images = images
        self.issame = issame
        self.nfolds = int(nfolds)
        self.far_targets = tuple(float(f) for f in far_targets)
        self.source = source or name

    def dataset(self) -> Dataset:
        return EncodedImages(self.images, self.source)

    def score(self, embeddings: np.ndarray, view_norms: np.ndarray) -> dict[str, float]:
        for far, (need, have) in unresolved_far_targets(self.issame, self.nfolds, self.far_targets).items():
            self.explain(
                far_key(far),
                f"FAR {far:g} needs at least {need} negative pairs in each of the {self.nfolds} training "
                f"splits, this set has {have}; choose larger far_targets or a larger set",
            )
        return verification_scores(embeddings, self.issame, self.nfolds, view_norms, self.far_targets)


class BinPairsEvaluator(PairsEvaluator):
    """A :class:`PairsEvaluator` over an insightface ``.bin`` (``lfw.bin`` -> name ``lfw``).

    ``path``: a local path or a URL (read through :func:`facemargin.data.storage.cache.cached_copy`).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        nfolds: int = 10,
        far_targets: Sequence[float] = FAR_TARGETS,
        **kwargs: Any,
    ) -> None:
        from ..data.formats.verification import load_bin

        self.path = str(path)
        images, issame = load_bin(self.path)
        super().__init__(images, issame, name or Path(self.path).stem, nfolds, far_targets, source=self.path, **kwargs)

    @classmethod
    def demo(cls, name: str = "demo_val", **kwargs: Any) -> "BinPairsEvaluator":
        """The built-in demo set's ``demo_val.bin`` (generated on first use, like ``data=demo``)."""
        from ..data.tools.synthetic import ensure_demo_dataset

        return cls(ensure_demo_dataset() / "demo_val.bin", name=name, **kwargs)

    def cache_key(self) -> str:
        from ..data.storage.cache import cached_copy

        return file_key(cached_copy(self.path))


def datamodule_evaluators(datamodule: Any, **kwargs: Any) -> list[BinPairsEvaluator]:
    """One :class:`BinPairsEvaluator` per verification file a DataModule names (its
    ``verification_files()``, in order); ``[]`` for ``None`` or a DataModule without that method.

    The data layer only says which files its set has; evaluators are built here, above it.
    """
    files = getattr(datamodule, "verification_files", None)
    return [BinPairsEvaluator(path, **kwargs) for path in files()] if callable(files) else []


class FolderPairsEvaluator(PairsEvaluator):
    """insightface's protocol over an LFW-style ``pairs.txt`` and a folder of aligned face images.

    ``pairs``: the pairs file (see :func:`facemargin.data.formats.verification.read_pairs_txt` for the
    accepted line formats); ``root``: the image folder (``root/<name>/<name>_0001.jpg``, or the
    relative paths the file gives). The faces must already be aligned crops of the model's input
    size; images of different sizes are refused here, naming two of them.
    """

    def __init__(
        self,
        pairs: str | os.PathLike,
        root: str | os.PathLike,
        name: str | None = None,
        ext: str = ".jpg",
        nfolds: int = 10,
        far_targets: Sequence[float] = FAR_TARGETS,
        **kwargs: Any,
    ) -> None:
        from ..data.formats.verification import check_same_size, read_pairs_txt

        self.pairs_file = Path(pairs)
        paths, issame = read_pairs_txt(self.pairs_file, root, ext)
        unique = sorted(set(paths))
        heads = []
        for p in unique:
            with open(p, "rb") as f:
                heads.append(f.read(1 << 16))
        check_same_size(heads, str(self.pairs_file), names=[str(p) for p in unique])
        super().__init__(paths, issame, name or Path(root).name, nfolds, far_targets, source=str(self.pairs_file), **kwargs)

    def dataset(self) -> Dataset:
        return ImageFiles(self.images)

    def cache_key(self) -> str:
        return file_key(self.pairs_file, *sorted(set(self.images)))
