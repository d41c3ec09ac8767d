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

The threshold is searched as insightface searches it (squared distance on unit vectors) and
reported as a **cosine similarity**, ``threshold_cosine = 1 - d / 2`` (``|a - b|^2 = 2 - 2 cos``
for unit vectors: "same" is ``cos > threshold_cosine``), the number a user compares with.

A figure is reported only where the pairs can support it; otherwise it is NaN (``null`` in JSON)
and the evaluator says why in :attr:`~facemargin.evaluation.base.Evaluator.notes`:

* ``acc``, ``acc_std``, ``threshold_cosine`` need **at least one same-person and one
  different-person pair in every fold** (:func:`accuracy_undefined`). The 9 training folds choose
  the threshold by trading false rejects against false accepts: with one kind only, every
  threshold beyond (or below) all distances is "best" and the first grid point wins, so the
  threshold says where the data lies, not where the classes separate. The held-out fold's
  accuracy with one kind only is a TAR (or TRR) alone, and the mean over folds becomes a mixture
  of the two. One pair of each kind per held-out fold also puts at least 9 of each into every
  training split. insightface's own files are ordered so that every fold is balanced (LFW: 300
  + 300 per fold); a file of same-person pairs only (insightface's ``small_lfw.bin``) has neither.
* ``tar@far=<far>`` needs ``round(1 / far)`` different-person pairs in every training split to
  resolve that FAR (LFW's 2 700 per split resolve 1e-3, not 1e-4) and a same-person pair in every
  held-out fold (a TAR of zero genuine pairs is undefined).
* every figure needs finite embeddings (a diverged model's NaN is never scored).
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
    "accuracy_undefined",
    "kfold_splits",
    "squared_distance_to_cosine",
    "undefined_figures",
    "verification_scores",
]

ACC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
#: FAR targets reported by default (insightface reports 1e-3; 1e-4 where the pairs allow).
FAR_TARGETS = (1e-3, 1e-4)
#: the figures that need both kinds of pair in every fold
ACCURACY_KEYS = ("acc", "acc_std", "threshold_cosine")


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


def accuracy_undefined(issame: np.ndarray, nfolds: int = 10) -> str | None:
    """Why accuracy and threshold are undefined on these pairs (``None``: they are defined).

    Every one of the ``nfolds`` ordered folds must hold at least one same-person and one
    different-person pair (see the module docstring for why).
    """
    same = np.asarray(issame, dtype=bool).reshape(-1)
    n_same, n_diff = int(same.sum()), int((~same).sum())
    counts = f"{n_same} same-person pairs, {n_diff} different-person pairs"
    rule = f"insightface's {nfolds}-fold protocol needs a same-person and a different-person pair in every fold"
    if n_same == 0 or n_diff == 0:
        return f"{counts}: accuracy and threshold are undefined ({rule})"
    if nfolds > 1 and same.size < 2 * nfolds:
        return f"{counts}: accuracy and threshold are undefined ({rule}: at least {2 * nfolds} pairs)"
    for k, (_, test) in enumerate(kfold_splits(same.size, nfolds)):
        s = int(same[test].sum())
        if s == 0 or s == test.size:
            return (
                f"{counts}, but fold {k + 1} of {nfolds} (pairs {test[0] + 1}-{test[-1] + 1}) has {s} same-person and "
                f"{test.size - s} different-person pairs: accuracy and threshold are undefined ({rule}; the folds "
                "are consecutive blocks of the pairs, so each block must hold both kinds)"
            )
    return None


def undefined_figures(
    issame: np.ndarray, nfolds: int = 10, far_targets: Sequence[float] = FAR_TARGETS
) -> dict[str, str]:
    """``{figure: why it is undefined}`` for these pairs, known from the labels alone.

    ``acc``, ``acc_std`` and ``threshold_cosine``: :func:`accuracy_undefined`. ``tar@far=<far>``:
    at least ``round(1 / far)`` different-person pairs in every training split and a same-person
    pair in every held-out fold.
    """
    same = np.asarray(issame, dtype=bool).reshape(-1)
    out: dict[str, str] = {}
    why = accuracy_undefined(same, nfolds)
    if why is not None:
        out.update({key: why for key in ACCURACY_KEYS})
    if nfolds > 1 and same.size < nfolds:
        few = f"{same.size} pairs: the {nfolds}-fold protocol needs at least {nfolds}"
        out.update({far_key(f): few for f in far_targets})
        return out
    folds = kfold_splits(same.size, nfolds)
    negatives = min(int((~same[train]).sum()) for train, _ in folds)
    no_genuine = [k + 1 for k, (_, test) in enumerate(folds) if not same[test].any()]
    for far in far_targets:
        need = round(1.0 / far)
        if negatives < need:
            out[far_key(far)] = (
                f"FAR {far:g} needs at least {need} negative pairs in each of the {nfolds} training splits, this set "
                f"has {negatives}; choose larger far_targets or a larger set"
            )
        elif no_genuine:
            out[far_key(far)] = (
                f"TAR needs a same-person pair in every held-out fold; fold {no_genuine[0]} of {nfolds} has none"
            )
    return out


def squared_distance_to_cosine(d: float) -> float:
    """The cosine similarity of two unit vectors whose squared L2 distance is ``d``: ``1 - d / 2``."""
    return 1.0 - float(d) / 2.0


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

    Returns ``acc`` (mean of the fold accuracies), ``acc_std``, ``threshold_cosine`` (the mean best
    threshold over folds, as a cosine similarity), ``xnorm`` and ``tar@far=<far>`` for each of
    ``far_targets`` (mean TAR over folds). A figure the pairs cannot support is NaN
    (:func:`undefined_figures` says why); non-finite embeddings make every figure NaN.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    same = np.asarray(issame, dtype=bool).reshape(-1)
    if emb.ndim != 2 or emb.shape[0] != 2 * same.size:
        raise ValueError(f"need embeddings [2N, D] for N={same.size} pairs, got {tuple(emb.shape)}")
    keys = [*ACCURACY_KEYS, "xnorm", *(far_key(f) for f in far_targets)]
    if not np.isfinite(emb).all() or (view_norms is not None and not np.isfinite(view_norms).all()):
        return {k: float("nan") for k in keys}
    undefined = undefined_figures(same, nfolds, far_targets)
    norms = np.linalg.norm(emb, axis=1)
    xnorm = float(norms.mean() if view_norms is None else np.asarray(view_norms, dtype=np.float64).mean())
    emb = emb / np.where(norms == 0, 1.0, norms)[:, None]  # like sklearn.preprocessing.normalize
    dist = np.square(emb[0::2] - emb[1::2]).sum(axis=1)
    scores: dict[str, float] = {k: float("nan") for k in keys}
    scores["xnorm"] = xnorm
    if "acc" not in undefined:
        accs, best_thresholds = [], []
        for train, test in kfold_splits(same.size, nfolds):
            best = int(np.argmax(_accuracy_curve(dist[train], same[train], ACC_THRESHOLDS)))
            best_thresholds.append(ACC_THRESHOLDS[best])
            accs.append(_accuracy_curve(dist[test], same[test], ACC_THRESHOLDS[best : best + 1])[0])
        scores["acc"], scores["acc_std"] = float(np.mean(accs)), float(np.std(accs))
        scores["threshold_cosine"] = squared_distance_to_cosine(float(np.mean(best_thresholds)))
    for far_target in far_targets:
        key = far_key(far_target)
        if key in undefined:
            continue
        tars = []
        for train, test in kfold_splits(same.size, nfolds):
            far_train = _far_curve(dist[train], same[train], VAL_THRESHOLDS)
            threshold = _threshold_at_far(far_train, VAL_THRESHOLDS, far_target)
            tars.append(_tar_far(dist[test], same[test], threshold)[0])
        scores[key] = float(np.mean(tars))
    return scores


class PairsEvaluator(Evaluator):
    """insightface's 1:1 verification protocol over encoded images whose pairs are ``(2i, 2i+1)``.

    ``compute()`` returns ``acc``, ``acc_std``, ``threshold_cosine``, ``xnorm`` and
    ``tar@far=<far>`` for each of ``far_targets`` (see :func:`verification_scores`); a figure the
    pairs cannot support is NaN and :attr:`notes` says why. ``images``: the encoded images (a
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
        if int(nfolds) < 1:
            raise ValueError(f"{source or name}: nfolds must be >= 1, got {nfolds}")
        super().__init__(name, len(images), **kwargs)
        self.images = images
        self.issame = issame
        self.nfolds = int(nfolds)
        self.far_targets = tuple(float(f) for f in far_targets)
        self.source = source or name

    def dataset(self) -> Dataset:
        return EncodedImages(self.images, self.source)

    def monitor_undefined(self) -> str | None:
        why = accuracy_undefined(self.issame, self.nfolds)
        return None if why is None else f"{self.name}: {why}"

    def score(self, embeddings: np.ndarray, view_norms: np.ndarray) -> dict[str, float]:
        scores = verification_scores(embeddings, self.issame, self.nfolds, view_norms, self.far_targets)
        bad = int((~np.isfinite(embeddings).all(axis=1)).sum())
        if bad:
            self.explain(list(scores), f"{bad} of {len(embeddings)} images have non-finite embeddings (NaN or inf)")
            return scores
        by_why: dict[str, list[str]] = {}
        for key, why in undefined_figures(self.issame, self.nfolds, self.far_targets).items():
            by_why.setdefault(why, []).append(key)
        for why, keys in by_why.items():
            self.explain(keys, why)
        return scores


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
