"""The evaluator contract: one object holds an evaluation set's images and its protocol.

An :class:`Evaluator` is a ``torchmetrics.Metric``. Whoever embeds the images (the
LightningModule in validation, ``python -m facemargin.evaluate`` on a checkpoint or an exported
model) iterates :meth:`Evaluator.dataset`, embeds each image and its horizontal flip, sums the two
views and calls :meth:`Evaluator.update` with the images' indices; :meth:`Evaluator.compute`
gathers the embeddings across ranks, drops the duplicates the ``DistributedSampler`` pads with,
orders them by index and scores them with the subclass's :meth:`Evaluator.score`.

Three additions to the torchmetrics contract serve training and the entry points:
:attr:`Evaluator.notes` explains figures that come out null (``NaN``: e.g. a FAR the set has too few
negative pairs to resolve, an accuracy on same-person pairs only; each reason is also warned once),
:meth:`Evaluator.monitor_undefined` says before anything is embedded why a set cannot choose a
checkpoint (it is then left out of ``val/acc``), and :meth:`Evaluator.cache_key` names the set's
content so ``python -m facemargin.evaluate`` can cache embeddings and re-score instantly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat, rank_zero_warn

from ..align import align_face
from ..data.formats.image import CorruptImageError, decode_image
from ..data.loading.normalize import to_uint8_chw

__all__ = ["EncodedImages", "Evaluator", "ImageFiles", "file_key", "stat_key"]


def stat_key(st: os.stat_result) -> str:
    """What changes when a file's content may have changed: size, modification and status-change
    times (ns) and inode. ``st_ctime_ns`` cannot be set back by a program (``touch -d``, ``cp -p``
    and ``os.utime`` set ``mtime`` only), and a file replaced by a rename has a new inode."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def file_key(*paths: str | os.PathLike) -> str:
    """Identity of files for caching: resolved path and :func:`stat_key` of each."""
    return "|".join(f"{Path(p).resolve()}:{stat_key(Path(p).stat())}" for p in paths)


class EncodedImages(Dataset):
    """Encoded images kept in memory, decoded on access: ``(uint8 [3, H, W] RGB, int64 index)``.

    ``source`` names the file the images came from in every error message.
    """

    def __init__(self, images: Sequence[bytes], source: str) -> None:
        self.images = images
        self.source = source

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        try:
            img = decode_image(self.images[index])
        except CorruptImageError as exc:
            raise CorruptImageError(f"{self.source} (image {index}): corrupt image: {exc}") from exc
        return to_uint8_chw(img), torch.tensor(index, dtype=torch.long)


class ImageFiles(Dataset):
    """Image files decoded on access: ``(uint8 [3, H, W] RGB, int64 index)``; errors name the file.

    With ``landmarks [N, 5, 2]`` each image is first aligned to the ``size x size`` ArcFace crop
    (:func:`facemargin.align.align_face`).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], landmarks: np.ndarray | None = None, size: int = 112) -> None:
        self.paths = [Path(p) for p in paths]
        if landmarks is not None and len(landmarks) != len(self.paths):
            raise ValueError(f"{len(landmarks)} landmark rows for {len(self.paths)} images")
        self.landmarks = landmarks
        self.size = int(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        path = self.paths[index]
        try:
            img = decode_image(path.read_bytes())
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {path}") from None
        except CorruptImageError as exc:
            raise CorruptImageError(f"{path}: corrupt image: {exc}") from exc
        if self.landmarks is not None:
            img = align_face(img, self.landmarks[index], self.size)
        return to_uint8_chw(img), torch.tensor(index, dtype=torch.long)


class Evaluator(Metric):
    """Base class of every evaluator: collects per-image embeddings, scores them with :meth:`score`.

    Subclasses set ``name`` and ``num_images`` (via ``__init__``) and implement :meth:`dataset` and
    :meth:`score`. ``monitor`` is the key of :meth:`compute` that the LightningModule averages into
    ``val/acc`` (``None``: not averaged).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    monitor: str | None = "acc"

    def __init__(self, name: str, num_images: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = str(name)
        self.num_images = int(num_images)
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")
        self.add_state("view_norms", default=[], dist_reduce_fx="cat")
        #: why a figure of the last :meth:`compute` is null, by key (plain sentences)
        self.notes: dict[str, str] = {}
        self._warned: set[str] = set()

    # ---- what a subclass provides
    def dataset(self) -> Dataset:
        """The images to embed: items ``(uint8 image [3, H, W] RGB, int64 index)``."""
        raise NotImplementedError

    def score(self, embeddings: np.ndarray, view_norms: np.ndarray) -> dict[str, float]:
        """Figures from every image's embedding ``[num_images, D]`` (index order, un-normalised)."""
        raise NotImplementedError

    def cache_key(self) -> str | None:
        """A string that changes whenever the set's images or their order change (``None``: never cache)."""
        return None

    def monitor_undefined(self) -> str | None:
        """Why this set cannot choose a checkpoint, known before anything is embedded (``None``: it
        can). Such a set is left out of ``val/acc``; a run none of whose sets can choose keeps
        checkpoints by its training loss. Default: only a set with a :attr:`monitor` figure can."""
        if self.monitor is None:
            return f"{self.name}: reports no accuracy to average into val/acc"
        return None

    def explain(self, keys: str | Sequence[str], why: str) -> None:
        """Record why the figures ``keys`` are null; warn the first time (rank zero only), once for
        all the keys that share this reason."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        for key in keys:
            self.notes[key] = why
        new = [k for k in keys if k not in self._warned]
        if new:
            self._warned.update(new)
            rank_zero_warn(f"{self.name}: {', '.join(new)} {'is' if len(new) == 1 else 'are'} null: {why}")

    # ---- the metric
    def update(
        self, embeddings: torch.Tensor, indices: torch.Tensor, view_norms: torch.Tensor | None = None
    ) -> None:
        """``embeddings [B, D]`` (views summed), ``indices [B]`` into :meth:`dataset`,
        ``view_norms [B]`` each image's mean norm over its views (insightface's XNorm; default: the
        norm of the summed embedding)."""
        if embeddings.ndim != 2 or indices.ndim != 1 or embeddings.shape[0] != indices.shape[0]:
            raise ValueError(
                f"{self.name}: need embeddings [B, D] and indices [B], got {tuple(embeddings.shape)} "
                f"and {tuple(indices.shape)}"
            )
        if view_norms is None:
            view_norms = embeddings.detach().float().norm(dim=1)
        if view_norms.shape != indices.shape:
            raise ValueError(f"{self.name}: need view_norms [B], got {tuple(view_norms.shape)}")
        self.embeddings.append(embeddings.detach().float())
        self.indices.append(indices.detach().long())
        self.view_norms.append(view_norms.detach().float())

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Same as ``update``: a batch alone has no meaningful score."""
        self.update(*args, **kwargs)

    def gathered(self) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings [N, D], view_norms [N])`` in index order, each image once.

        Raises ``RuntimeError`` naming the missing indices when some image was never embedded.
        """
        if isinstance(self.indices, list) and not self.indices:
            raise RuntimeError(f"{self.name}: compute() called before any update()")
        emb = dim_zero_cat(self.embeddings).cpu().numpy()
        idx = dim_zero_cat(self.indices).cpu().numpy()
        norms = dim_zero_cat(self.view_norms).cpu().numpy()
        uniq, first = np.unique(idx, return_index=True)  # sorted, first occurrence of each
        n = self.num_images
        if uniq.size != n or uniq[0] != 0 or uniq[-1] != n - 1:
            missing = np.setdiff1d(np.arange(n), uniq)
            extra = uniq[(uniq < 0) | (uniq >= n)]
            raise RuntimeError(
                f"{self.name}: {n} images but {uniq.size} distinct indices were embedded; missing "
                f"{missing[:10].tolist()}{'...' if missing.size > 10 else ''} ({missing.size} in all), "
                f"out of range {extra[:10].tolist()}"
            )
        return emb[first], norms[first]

    def compute(self) -> dict[str, torch.Tensor]:
        self.notes = {}
        scores = self.score(*self.gathered())
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in scores.items()}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_images={self.num_images}"
