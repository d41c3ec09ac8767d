"""A trained face embedder as the entry points use it: a checkpoint, ONNX or TorchScript file.

:class:`Embedder` pairs a network (normalised float images ``[B, 3, H, W]`` -> ``[B, D]``)
with the input pipeline recorded next to it (``metadata``: ``input_size``, ``channel_order``,
``mean``/``std`` of ``(x / 255 - mean) / std``, ``embedding_size``, ``flip_fused``, the
``verification`` thresholds validation chose, the training ``config``). It takes uint8 images,
so every caller feeds it exactly as training did. :func:`load_embedder` opens any of the files
``facemargin.train`` and ``facemargin.export`` write.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..data.loading.normalize import CHANNEL_ORDER, MEAN, STD
from .base import file_key

__all__ = ["METADATA_KEY", "Embedder", "load_embedder"]

#: Name of the metadata entry inside exported files (ONNX ``metadata_props``, TorchScript extra file).
METADATA_KEY = "facemargin"


def default_metadata(input_size: int = 112, embedding_size: int | None = None) -> dict[str, Any]:
    """The input pipeline of every facemargin model: RGB, ``(x / 255 - 0.5) / 0.5``."""
    return {
        "channel_order": CHANNEL_ORDER, "mean": [MEAN] * 3, "std": [STD] * 3,
        "input_size": int(input_size), "embedding_size": embedding_size, "flip_fused": False,
    }


class Embedder:
    """Images in (uint8), embeddings out; flip test and normalisation as the metadata says.

    ``net``: a callable on normalised float images on ``device``; ``key``: identifies the weights
    for the embedding cache (``None``: never cached); ``source``: named in messages.
    """

    def __init__(
        self,
        net: Callable[[Tensor], Tensor],
        metadata: dict[str, Any] | None = None,
        key: str | None = None,
        source: str = "model",
        device: str | torch.device = "cpu",
    ) -> None:
        self.net = net
        self.metadata = {**default_metadata(), **(metadata or {})}
        self.key = key
        self.source = source
        self.device = torch.device(device)
        if self.metadata["channel_order"] not in ("RGB", "BGR"):
            raise ValueError(f"{source}: channel_order must be RGB or BGR, got {self.metadata['channel_order']!r}")
        self._mean = torch.tensor(self.metadata["mean"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(self.metadata["std"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    @classmethod
    def from_module(cls, module: nn.Module, metadata: dict[str, Any] | None = None, key: str | None = None,
                    source: str = "model", device: str | torch.device = "cpu") -> "Embedder":
        """Wrap an ``nn.Module`` (put in eval mode on ``device``)."""
        module = module.to(device).eval()
        size = getattr(module, "input_size", None)
        meta = {"embedding_size": getattr(module, "embedding_size", None), **({"input_size": size} if size else {})}
        return cls(module, {**meta, **(metadata or {})}, key, source, device)

    @property
    def input_size(self) -> int:
        return int(self.metadata["input_size"])

    @property
    def flip_fused(self) -> bool:
        """True when the network itself adds the flipped view (an exported flip-fused model)."""
        return bool(self.metadata.get("flip_fused", False))

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 ``[B, 3, H, W]`` RGB -> the network's float input on its device."""
        x = images.to(self.device, non_blocking=True)
        if self.metadata["channel_order"] == "BGR":
            x = x.flip(1)
        return x.float().div_(255.0).sub_(self._mean).div_(self._std)  # one float copy, then in place

    @torch.inference_mode()
    def embed_views(self, images: Tensor, flip: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(embedding of image + flip, summed [B, D] float32 CPU; mean view norm [B] or None)``.

        A flip-fused network already sums the views; its view norms are unknown (``None``).
        """
        x = self.normalize(images)
        if self.flip_fused or not flip:
            emb = self.net(x).float()
            return emb.cpu(), (None if self.flip_fused else emb.norm(dim=1).cpu())
        both = self.net(torch.cat([x, x.flip(3)])).float()
        a, b = both[: x.shape[0]], both[x.shape[0]:]
        return (a + b).cpu(), ((a.norm(dim=1) + b.norm(dim=1)) / 2).cpu()

    def embed(self, images: Tensor) -> np.ndarray:
        """L2-normalised embeddings ``[B, D]`` (float32 numpy) of uint8 images ``[B, 3, H, W]``."""
        emb = self.embed_views(images)[0]
        return torch.nn.functional.normalize(emb, dim=1).numpy()

    def cosine_threshold(self, set_name: str | None = None) -> tuple[float, str]:
        """``(cosine threshold, set name)`` chosen by a verification run and stored with the model:
        "same person" is ``cosine > threshold``. Without ``set_name`` the first stored set is used.

        Only sets that could support a threshold store one (see
        :mod:`facemargin.evaluation.thresholds`; old squared-distance records are converted).
        Raises :class:`~facemargin.evaluation.thresholds.NoThresholdError` when none is stored.
        """
        from .thresholds import choose_threshold

        cos, name, _ = choose_threshold(self.metadata, set_name, self.source)
        return cos, name


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist())


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _load_onnx(path: Path, device: str) -> Embedder:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(f"{path}: running ONNX models needs onnxruntime: pip install 'facemargin[onnx]'") from None
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), providers=[p for p in providers if p in ort.get_available_providers()])
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise ValueError(f"{path}: not a facemargin export (no '{METADATA_KEY}' metadata); export with python -m facemargin.export")
    input_name = session.get_inputs()[0].name

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {input_name: x.detach().cpu().numpy()})[0])

    return Embedder(run, json.loads(props[METADATA_KEY]), file_key(path), str(path), "cpu")


def _load_torchscript(path: Path, device: str) -> Embedder:
    extra = {f"{METADATA_KEY}.json": ""}
    with warnings.catch_warnings():  # TorchScript is deprecated in recent torch, still loads
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    if not extra[f"{METADATA_KEY}.json"]:
        raise ValueError(f"{path}: TorchScript file without facemargin metadata; export with python -m facemargin.export")
    return Embedder(module.eval(), json.loads(extra[f"{METADATA_KEY}.json"]), file_key(path), str(path), device)


def _load_checkpoint(path: Path, device: str) -> Embedder:
    from ..checkpoint import load_module

    module = load_module(path, map_location="cpu")
    return Embedder.from_module(module.backbone, module.record(), file_key(path), str(path), device)


def load_embedder(path: str | os.PathLike, device: str = "cpu") -> Embedder:
    """An :class:`Embedder` from a training checkpoint (``.ckpt``), an ONNX file or a TorchScript file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    device = _pick_device(device)
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path, device)
    if _is_torchscript(path):
        return _load_torchscript(path, device)
    return _load_checkpoint(path, device)
