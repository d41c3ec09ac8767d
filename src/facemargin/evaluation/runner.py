"""The embedding runner behind ``facemargin.evaluate`` and ``facemargin.embed``, and its cache.

:func:`embed_dataset` runs an :class:`~facemargin.evaluation.embedder.Embedder` over any
dataset of ``(uint8 image [3, H, W], index)`` items: batched, decoded in DataLoader workers,
image + flip in one forward, a progress bar. :func:`run_evaluator` feeds the result to an
evaluator; with an :class:`EmbeddingCache` the embeddings of a (model, set) pair are stored once,
so scoring the same model on the same set again skips the network entirely.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .base import Evaluator
from .embedder import Embedder

__all__ = ["EmbeddingCache", "embed_dataset", "run_evaluator"]


def _collate(batch: list[tuple[torch.Tensor, torch.Tensor]], size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    for image, index in batch:
        if tuple(image.shape) != (3, size, size):
            raise ValueError(
                f"{name}: image {int(index)} is {image.shape[-1]}x{image.shape[-2]} but the model takes "
                f"{size}x{size} aligned faces; align them first (facemargin.align, or 5-point landmarks)"
            )
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


def embed_dataset(
    model: Embedder,
    dataset: Dataset,
    batch_size: int = 256,
    num_workers: int = 2,
    progress: bool = True,
    name: str = "images",
    flip: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(embeddings [N, D] float32, mean view norms [N] or None)`` in index order.

    Embeddings are image + horizontal flip summed (the image alone with ``flip=False``), not
    normalised (the evaluators' input).
    Images of the wrong size raise ``ValueError`` naming ``name`` and the image.
    """
    n = len(dataset)  # type: ignore[arg-type]
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=partial(_collate, size=model.input_size, name=name),
        pin_memory=model.device.type == "cuda", persistent_workers=False,
    )
    emb: np.ndarray | None = None
    norms: np.ndarray | None = None
    with tqdm(total=n, desc=f"embed {name}", unit="img", disable=not progress, leave=False) as bar:
        for images, idx in loader:
            e, v = model.embed_views(images, flip=flip)
            if emb is None:
                emb = np.empty((n, e.shape[1]), dtype=np.float32)
                norms = None if v is None else np.empty(n, dtype=np.float32)
            emb[idx.numpy()] = e.numpy()
            if norms is not None and v is not None:
                norms[idx.numpy()] = v.numpy()
            bar.update(images.shape[0])
    if emb is None:
        raise ValueError(f"{name}: no images to embed")
    return emb, norms


class EmbeddingCache:
    """``<root>/<hash of model key + set key>.npz``: embeddings and view norms of one (model, set)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()

    def path(self, model_key: str, set_key: str) -> Path:
        digest = hashlib.sha1(f"{model_key}\n{set_key}".encode()).hexdigest()[:24]
        return self.root / f"{digest}.npz"

    def load(self, model_key: str, set_key: str) -> tuple[np.ndarray, np.ndarray | None] | None:
        path = self.path(model_key, set_key)
        if not path.is_file():
            return None
        with np.load(path) as data:
            if json.loads(str(data["keys"])) != [model_key, set_key]:
                return None
            return data["embeddings"], (data["view_norms"] if data["view_norms"].size else None)

    def save(self, model_key: str, set_key: str, embeddings: np.ndarray, view_norms: np.ndarray | None) -> Path:
        path = self.path(model_key, set_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, embeddings=embeddings, view_norms=np.zeros(0) if view_norms is None else view_norms,
                 keys=np.array(json.dumps([model_key, set_key])))
        os.replace(tmp, path)
        return path


def run_evaluator(
    model: Embedder,
    evaluator: Evaluator,
    cache: EmbeddingCache | None = None,
    batch_size: int = 256,
    num_workers: int = 2,
    progress: bool = True,
) -> tuple[dict[str, float], bool]:
    """``(figures of evaluator.compute() as floats, whether the embeddings came from the cache)``."""
    set_key = evaluator.cache_key() if cache is not None and model.key is not None else None
    cached = cache.load(model.key, set_key) if set_key is not None else None  # type: ignore[union-attr, arg-type]
    if cached is None:
        emb, norms = embed_dataset(model, evaluator.dataset(), batch_size, num_workers, progress, evaluator.name)
        if set_key is not None:
            cache.save(model.key, set_key, emb, norms)  # type: ignore[union-attr, arg-type]
    else:
        emb, norms = cached
    evaluator.reset()
    evaluator.update(torch.from_numpy(emb), torch.arange(emb.shape[0]), None if norms is None else torch.from_numpy(norms))
    return {k: float(v) for k, v in evaluator.compute().items()}, cached is not None
