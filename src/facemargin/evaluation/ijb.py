"""IJB-B / IJB-C template protocols, as insightface evaluates them, and :class:`IJBEvaluator`.

Followed from insightface ``recognition/arcface_torch/eval_ijbc.py`` (1:1) and
``recognition/_evaluation_/ijb/ijb_evals.py`` (1:N), its defaults included (TestMode N1 D1 F2):

1. every image is aligned to the 112x112 ArcFace template from its 5 landmarks; its feature is
   the embedding of the image plus that of its horizontal flip (not normalised: the norm is kept
   as a quality weight), times the detector's faceness score (``faceness=True``);
   ``normalize_images=True`` L2-normalises each image feature first (TestMode N0);
2. inside a template, the images of one media (the frames of a video) are averaged; the media
   features are summed and the sum is L2-normalised (an all-zero sum stays zero);
3. 1:1: the score of a template pair is the cosine of the two template features; the ROC is
   sklearn's ``roc_curve`` (intermediate collinear points dropped), and TAR at a FAR target is the
   TPR of the ROC point whose FPR is nearest to the target (the largest TPR among equals);
4. 1:N, per gallery (IJB-C G1 and G2, IJB-B S1 and S2) against the mixed probes: a probe whose
   subject is in the gallery is *mated*; rank-k counts mated probes whose mate is among the k
   highest scores, divided by the number of probes, summed over the galleries; TPIR at an FPIR
   target takes the threshold at position ``int(FPIR * n) - 1`` of the non-mated probes' top
   scores (descending) and counts mated probes ranked first with a score above it; it is averaged
   over the galleries.

One deviation, on purpose: insightface prints a number for every target even when the set is too
small to resolve it (a FAR below ``1 / negative pairs`` reads the TPR at FPR 0). Here such a figure
is ``NaN`` (``null`` in JSON) and :attr:`~facemargin.evaluation.base.Evaluator.notes` says how many
negative pairs (or non-mated probes) it needs and how many the set has.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import numpy as np
from torch.utils.data import Dataset

from .base import Evaluator, ImageFiles
from .ijb_files import GALLERIES, image_identity, read_ijb_meta
from .pairs import far_key

__all__ = [
    "IJB_FAR_TARGETS",
    "IJBEvaluator",
    "fpir_key",
    "identification_scores",
    "image_features",
    "roc_curve",
    "tar_at_far",
    "template_features",
]

#: The FAR columns of insightface's IJB table.
IJB_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: The FPIR targets of insightface's 1:N script.
FPIR_TARGETS = (1e-2, 1e-1)


def fpir_key(fpir: float) -> str:
    """The metric name of TPIR at ``fpir``: ``1e-2 -> "tpir@fpir=1e-2"``."""
    return "tpir@fpir=" + re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{fpir:.0e}")


def image_features(
    embeddings: np.ndarray, faceness: np.ndarray | None = None, normalize_images: bool = False
) -> np.ndarray:
    """Step 1: ``embeddings [N, D]`` (image + flip summed) -> weighted image features (float64)."""
    feats = np.asarray(embeddings, dtype=np.float64)
    if normalize_images:
        feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    if faceness is not None:
        feats = feats * np.asarray(faceness, dtype=np.float64)[:, None]
    return feats


def template_features(
    features: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Step 2: ``(template ids ascending, L2-normalised template features)`` from image features.

    Vectorised (one sort and two ``reduceat``) instead of insightface's loop over templates, which
    scans every image once per template.
    """
    order = np.lexsort((medias, templates))
    t, m, f = templates[order], medias[order], features[order]
    new_media = np.r_[True, (t[1:] != t[:-1]) | (m[1:] != m[:-1])]
    starts = np.flatnonzero(new_media)
    counts = np.diff(np.r_[starts, t.size])
    media = np.add.reduceat(f, starts, axis=0) / counts[:, None]
    media_t = t[starts]
    t_starts = np.flatnonzero(np.r_[True, media_t[1:] != media_t[:-1]])
    sums = np.add.reduceat(media, t_starts, axis=0)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return media_t[t_starts], sums / np.where(norms == 0, 1.0, norms)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` exactly as ``sklearn.metrics.roc_curve(labels, scores)`` (defaults).

    Points at distinct score thresholds, highest first; points collinear with both neighbours
    are dropped (``drop_intermediate=True``); ``(0, 0)`` at threshold ``inf`` comes first. Like
    sklearn, scores or labels that are NaN or infinite raise ``ValueError``.
    """
    s = np.asarray(scores, dtype=np.float64)
    raw = np.asarray(labels)
    for what, values in (("labels", raw), ("scores", s)):
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise ValueError(f"roc_curve: {what} contain NaN or infinity ({bad} of {values.size}), as sklearn refuses")
    y = raw.astype(bool)
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # last position of each distinct score
    tps = np.cumsum(y)[last]
    fps = 1 + last - tps
    if fps.size > 2:
        keep = np.flatnonzero(np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True])
        fps, tps, last = fps[keep], tps[keep], last[keep]
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    with np.errstate(invalid="ignore", divide="ignore"):
        return fps / fps[-1], tps / tps[-1], np.r_[np.inf, s[last]]


def tar_at_far(
    labels: np.ndarray, scores: np.ndarray, far_targets: Sequence[float] = IJB_FAR_TARGETS
) -> tuple[dict[str, float], dict[str, str]]:
    """Step 3: ``({"tar@far=...": TPR, "auc": area}, {key: why null})`` for cosine ``scores``."""
    labels = np.asarray(labels).astype(bool)
    n_neg, n_pos = int((~labels).sum()), int(labels.sum())
    if n_neg == 0 or n_pos == 0:
        why = f"needs both genuine and impostor pairs, the pairs have {n_pos} genuine and {n_neg} impostor"
        keys = [far_key(f) for f in far_targets] + ["auc"]
        return {k: float("nan") for k in keys}, {k: why for k in keys}
    fpr, tpr, _ = roc_curve(labels, scores)
    out: dict[str, float] = {}
    notes: dict[str, str] = {}
    fpr_desc, tpr_desc = fpr[::-1], tpr[::-1]  # ties in FPR: the first hit has the largest TPR
    for far in far_targets:
        key = far_key(far)
        if n_neg < round(1.0 / far):
            out[key] = float("nan")
            notes[key] = f"FAR {far:g} needs at least {round(1.0 / far)} impostor pairs, this set has {n_neg}"
            continue
        out[key] = float(tpr_desc[int(np.argmin(np.abs(fpr_desc - far)))])
    out["auc"] = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return out, notes


def identification_scores(
    probe_feats: np.ndarray,
    probe_ids: np.ndarray,
    galleries: Sequence[tuple[str, np.ndarray, np.ndarray]],
    fpir_targets: Sequence[float] = FPIR_TARGETS,
    ranks: Sequence[int] = (1, 5),
) -> tuple[dict[str, float], dict[str, str]]:
    """Step 4: ``({"rank1": ..., "tpir@fpir=...": ...}, {key: why null})``.

    ``galleries``: ``(name, template features, subject ids)`` per gallery; features L2-normalised.
    """
    hits = {k: 0 for k in ranks}
    tpirs: dict[float, list[float]] = {f: [] for f in fpir_targets}
    notes: dict[str, str] = {}
    for gname, g_feats, g_ids in galleries:
        sim = probe_feats @ g_feats.T
        match = probe_ids[:, None] == g_ids[None, :]
        mated = match.any(axis=1)
        mate = match.argmax(axis=1)[mated]  # the first gallery template of the subject
        s_mated = sim[mated]
        order = np.argsort(s_mated, axis=1)[:, ::-1]
        rank = np.argmax(order == mate[:, None], axis=1)
        for k in ranks:
            hits[k] += int((rank < k).sum())
        pos = s_mated[np.arange(mate.size), mate]
        neg = np.where(match[mated], -np.inf, s_mated).max(axis=1, initial=-np.inf)
        top_non_mated = np.sort(sim[~mated].max(axis=1, initial=-np.inf))[::-1]
        for fpir in fpir_targets:
            n = top_non_mated.size
            if int(n * fpir) < 1:
                notes.setdefault(fpir_key(fpir), (
                    f"FPIR {fpir:g} needs at least {int(np.ceil(1 / fpir))} non-mated probes per gallery, "
                    f"gallery {gname} has {n}"
                ))
                continue
            threshold = top_non_mated[int(n * fpir) - 1]
            tpirs[fpir].append(float(((pos > neg) & (pos > threshold)).sum() / max(mate.size, 1)))
    out = {f"rank{k}": hits[k] / probe_feats.shape[0] for k in ranks}
    for fpir in fpir_targets:
        key = fpir_key(fpir)
        out[key] = float("nan") if key in notes else float(np.mean(tpirs[fpir]))
    return out, notes


class IJBEvaluator(Evaluator):
    """IJB-B / IJB-C 1:1 verification (and 1:N identification when the CSVs are there).

    ``root``: the set's folder in insightface's ``IJB_release`` layout (see
    :mod:`facemargin.evaluation.ijb_files`); ``target``: ``"IJBC"`` or ``"IJBB"``. ``compute()``
    returns ``tar@far=1e-6`` ... ``tar@far=1e-1`` and ``auc``, plus ``rank1``, ``rank5`` and
    ``tpir@fpir=1e-2``, ``tpir@fpir=1e-1`` for 1:N. Its images are the aligned faces.
    """

    monitor = None  # no accuracy to average into val/acc

    def __init__(
        self,
        root: str | os.PathLike,
        target: str = "IJBC",
        name: str | None = None,
        far_targets: Sequence[float] = IJB_FAR_TARGETS,
        fpir_targets: Sequence[float] = FPIR_TARGETS,
        ranks: Sequence[int] = (1, 5),
        faceness: bool = True,
        normalize_images: bool = False,
        identification: bool = True,
        image_size: int = 112,
        **kwargs: Any,
    ) -> None:
        self.meta = read_ijb_meta(root, target)
        super().__init__(name or self.meta.target.lower(), len(self.meta.names), **kwargs)
        self.far_targets = tuple(float(f) for f in far_targets)
        self.fpir_targets = tuple(float(f) for f in fpir_targets)
        self.ranks = tuple(int(k) for k in ranks)
        self.faceness = bool(faceness)
        self.normalize_images = bool(normalize_images)
        self.identification = bool(identification) and self.meta.probes is not None
        self.image_size = int(image_size)
        self._images: str | None = None

    def images_checked(self) -> str:
        """:func:`~facemargin.evaluation.ijb_files.image_identity` of the images (every one present
        and inside ``loose_crop/``), computed once per evaluator."""
        if self._images is None:
            self._images = image_identity(self.meta)
        return self._images

    def dataset(self) -> Dataset:
        self.images_checked()
        crops = self.meta.root / "loose_crop"
        return ImageFiles([crops / n for n in self.meta.names], self.meta.landmarks, self.image_size)

    def cache_key(self) -> str:
        """The meta files' content, every image's identity (name, size, mtime, ctime, inode), the
        crop folder and size: replacing an image changes it."""
        crops = self.meta.root.resolve() / "loose_crop"
        return f"ijb:{self.meta.target}:{self.meta.meta_digest}:{self.images_checked()}|{crops}|{self.image_size}"

    def template_features(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(template ids, template features)`` of every template, from the image embeddings."""
        feats = image_features(embeddings, self.meta.faceness if self.faceness else None, self.normalize_images)
        return template_features(feats, self.meta.templates, self.meta.medias)

    def score(self, embeddings: np.ndarray, view_norms: np.ndarray) -> dict[str, float]:
        bad = int((~np.isfinite(embeddings).all(axis=1)).sum())
        if bad:  # a diverged model: no figure (the ROC refuses NaN scores)
            keys = [far_key(f) for f in self.far_targets] + ["auc"]
            if self.identification:
                keys += [f"rank{k}" for k in self.ranks] + [fpir_key(f) for f in self.fpir_targets]
            self.explain(keys, f"{bad} of {len(embeddings)} images have non-finite embeddings (NaN or inf)")
            return {k: float("nan") for k in keys}
        ids, feats = self.template_features(embeddings)
        row = {int(t): i for i, t in enumerate(ids)}
        p = self.meta.pairs
        a = feats[[row[int(t)] for t in p[:, 0]]]
        b = feats[[row[int(t)] for t in p[:, 1]]]
        scores, notes = tar_at_far(p[:, 2], np.sum(a * b, axis=1), self.far_targets)
        if self.identification:
            def chosen(templates: np.ndarray, subjects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                uniq, first = np.unique(templates, return_index=True)
                return feats[[row[int(t)] for t in uniq]], subjects[first]

            probe_feats, probe_ids = chosen(*self.meta.probes)
            galleries = [(gname, *chosen(*g)) for gname, g in zip(GALLERIES[self.meta.target], self.meta.galleries)]
            id_scores, id_notes = identification_scores(probe_feats, probe_ids, galleries, self.fpir_targets, self.ranks)
            scores.update(id_scores)
            notes.update(id_notes)
        for key, why in notes.items():
            self.explain(key, why)
        return scores
