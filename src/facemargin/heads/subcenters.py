"""Sub-centres (Deng et al., "Sub-center ArcFace", ECCV 2020): K centres per identity.

Layout: the centre matrix has ``C * K`` rows, class-major -- row ``c * K + k`` is sub-centre ``k``
of class ``c`` (insightface's ``SubCenter-ArcFace`` reshapes its ``fc7`` output to
``(-1, C, K)`` and reads the weights back with ``W.reshape(-1, K, D)`` in ``drop.py``, the same
order). A sample's cosine to a class is the largest cosine to any of its K sub-centres; the
margin and the objective see that pooled ``[N, C]`` block, so every margin and objective
combine with every K.

Gradient: the pooled cosine is ``cos[n, c, k*]`` with ``k* = argmax_k cos[n, c, k]``; only that
sub-centre gets the gradient. Ties go to the lowest ``k`` -- the sub-centre the cleaner
(``np.argmax`` in insightface's ``drop.py``, :func:`nearest_subcentres` here) assigns the sample
to. (MXNet's ``max`` backward, which the reference trains with, hands the full gradient to every
tied element; ties have probability zero once centres differ, so the two agree in training.)
The margin's gradient is the margin's own: the original symbol applies ArcFace through
``arccos``, i.e. the exact gradient, which ``grad="exact"`` reproduces; the psi-margins' default
``grad="detached"`` (insightface's ``arcface_torch``) differs from it.

Cleaning (insightface ``drop.py``, README: "drop non-dominant subcenters and high-confident noisy
data (>75 degrees)"): per class, each sample is assigned to its nearest sub-centre; the
*dominant* sub-centre is the one with the most samples (ties: lowest index); a sample is kept
when its cosine to the dominant sub-centre is strictly above ``cos(threshold)``. A class left
with no sample disappears from the cleaned set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CleaningResult",
    "clean_by_dominant_subcentre",
    "dominant_weights",
    "nearest_subcentres",
    "subcentre_counts",
    "subcentre_max",
]


def subcentre_max(cos: Tensor, subcenters: int) -> Tensor:
    """``[N, C * K]`` cosines against class-major sub-centres -> ``[N, C]``, the max over each
    class's K; the gradient goes to the maximal sub-centre (ties: the lowest index)."""
    if subcenters == 1:
        return cos
    n, rows = cos.shape
    if rows % subcenters:
        raise ValueError(f"{rows} centre columns are not a multiple of subcenters={subcenters}")
    grouped = cos.view(n, rows // subcenters, subcenters)
    best = grouped.detach().argmax(dim=2, keepdim=True)  # first maximum on ties
    return grouped.gather(2, best).squeeze(2)


def nearest_subcentres(x_n: Tensor, weight: Tensor, labels: Tensor, subcenters: int) -> tuple[Tensor, Tensor]:
    """For each L2-normalised row of ``x_n`` and its class ``labels``: the index ``k`` of its
    nearest sub-centre of that class (ties: lowest) and the cosines to all K, ``[N]`` and ``[N, K]``."""
    w = weight.detach().to(x_n.dtype).view(-1, subcenters, weight.shape[1])
    w = w / torch.linalg.vector_norm(w, dim=2, keepdim=True).clamp_min(1e-12)
    cos = torch.einsum("nkd,nd->nk", w[labels], x_n)
    return cos.argmax(dim=1), cos


def subcentre_counts(nearest: Tensor, labels: Tensor, num_classes: int, subcenters: int) -> Tensor:
    """``[C, K]``: how many samples of each class are nearest to each of its sub-centres. The
    dominant sub-centre of a class is ``counts.argmax(1)`` (ties, empty classes: the lowest index)."""
    counts = torch.zeros(num_classes * subcenters, dtype=torch.long, device=labels.device)
    counts.index_add_(0, labels * subcenters + nearest, torch.ones_like(labels))
    return counts.view(num_classes, subcenters)


@dataclass
class CleaningResult:
    """What :func:`clean_by_dominant_subcentre` found (tensors on the CPU).

    ``keep`` [N] bool; ``angle`` [N] degrees between each sample and its class's dominant
    sub-centre; ``nearest`` [N] each sample's nearest sub-centre; ``dominant`` [C] each class's
    dominant sub-centre; ``counts`` [C, K] samples nearest to each sub-centre.
    """

    keep: Tensor
    angle: Tensor
    nearest: Tensor
    dominant: Tensor
    counts: Tensor

    @property
    def dropped_samples(self) -> int:
        return int((~self.keep).sum())

    def identities(self, labels: Tensor) -> tuple[int, int]:
        """``(identities with samples before, identities left with none after)``."""
        before = torch.unique(labels)
        after = torch.unique(labels[self.keep])
        return int(before.numel()), int(before.numel() - after.numel())


def clean_by_dominant_subcentre(
    embeddings: Tensor, labels: Tensor, weight: Tensor, subcenters: int, threshold_deg: float = 75.0,
) -> CleaningResult:
    """Sub-center ArcFace's cleaning rule (see the module docstring) on un-normalised
    ``embeddings [N, D]`` with ``labels [N]`` against the class-major centres ``weight [C*K, D]``."""
    if weight.shape[0] % subcenters:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of subcenters={subcenters}")
    if not 0.0 < threshold_deg <= 180.0:
        raise ValueError(f"threshold must lie in (0, 180] degrees; got {threshold_deg}")
    num_classes = weight.shape[0] // subcenters
    labels = labels.long().cpu()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got [{int(labels.min())}, {int(labels.max())}]")
    x = embeddings.detach().double().cpu()
    x_n = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)
    nearest, cos = nearest_subcentres(x_n, weight.detach().double().cpu(), labels, subcenters)
    counts = subcentre_counts(nearest, labels, num_classes, subcenters)
    dominant = counts.argmax(dim=1)
    to_dominant = cos.gather(1, dominant[labels].unsqueeze(1)).squeeze(1)
    keep = to_dominant > math.cos(math.radians(threshold_deg))
    angle = torch.rad2deg(torch.acos(to_dominant.clamp(-1.0, 1.0))).float()
    return CleaningResult(keep, angle, nearest, dominant, counts)


def dominant_weights(weight: Tensor, dominant: Tensor, subcenters: int) -> Tensor:
    """``[C, D]``: each class's dominant sub-centre out of the class-major ``[C*K, D]`` centres
    (the K=1 head to continue with once the non-dominant sub-centres are dropped)."""
    grouped = weight.detach().view(-1, subcenters, weight.shape[1])
    if dominant.shape != (grouped.shape[0],):
        raise ValueError(f"dominant must be [{grouped.shape[0]}]; got {tuple(dominant.shape)}")
    return grouped[torch.arange(grouped.shape[0]), dominant.to(weight.device)].clone()
