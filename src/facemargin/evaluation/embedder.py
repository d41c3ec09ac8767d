"""A trained face embedder as the entry points use it: a checkpoint, ONNX or TorchScript file.

:class:`Embedder` pairs a network (normalised float images ``[B, 3, H, W]`` -> ``[B, D]``)
with the input pipeline recorded next to it (``metadata``: ``input_size``, ``channel_order``,
``mean``/``std`` of ``(x / 255 - mean) / std``, ``embedding_size``, ``flip_fused``, the
``verification`` thresholds validation chose, the training ``config``). It takes uint8 images,
so every caller feeds it exactly as training did (:attr:`Embedder.spec`, an
:class:`~facemargin.input_spec.InputSpec`). :func:`load_embedder` opens any of the files
``facemargin.train`` and ``facemargin.export`` write, and the published models
:mod:`facemargin.published` reads (insightface, AdaFace, CVLface, foreign ONNX); the file's kind
is recognised from its bytes and keys, never its name.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..data.loading.normalize import CHANNEL_ORDER, MEAN, STD
from ..input_spec import InputSpec, input_spec_of
from ..published.files import ModelFileError
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
    for the embedding cache (``None``: never cached); ``source``: named in messages; ``format``:
    what was loaded (``"facemargin"``, ``"insightface"``, ``"adaface"``, ``"cvlface"``, ``"onnx"``).
    ``spec`` (:class:`~facemargin.input_spec.InputSpec`) is read from ``metadata``.
    """

    def __init__(
        self,
        net: Callable[[Tensor], Tensor],
        metadata: dict[str, Any] | None = None,
        key: str | None = None,
        source: str = "model",
        device: str | torch.device = "cpu",
        format: str = "facemargin",
    ) -> None:
        self.net = net
        self.metadata = {**default_metadata(), **(metadata or {})}
        self.key = key
        self.source = source
        self.device = torch.device(device)
        self.format = format
        self.spec = InputSpec.from_dict(self.metadata, source)

    @classmethod
    def from_module(cls, module: nn.Module, metadata: dict[str, Any] | None = None, key: str | None = None,
                    source: str = "model", device: str | torch.device = "cpu", format: str = "facemargin") -> "Embedder":
        """Wrap an ``nn.Module`` (put in eval mode on ``device``); its ``input_spec`` unless ``metadata`` says otherwise."""
        module = module.to(device).eval()
        meta = {**input_spec_of(module).to_dict(), "embedding_size": getattr(module, "embedding_size", None)}
        return cls(module, {**meta, **(metadata or {})}, key, source, device, format)

    @property
    def input_size(self) -> int:
        return int(self.spec.size)

    @property
    def flip_fused(self) -> bool:
        """True when the network itself adds the flipped view (an exported flip-fused model)."""
        return bool(self.metadata.get("flip_fused", False))

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 ``[B, 3, H, W]`` RGB -> the network's float input on its device (:meth:`InputSpec.normalize`)."""
        return self.spec.normalize(images.to(self.device, non_blocking=True))

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


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _load_onnx(path: Path, device: str, given: dict[str, Any]) -> Embedder:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelFileError(f"{path}: running ONNX models needs onnxruntime: pip install 'facemargin[onnx]'") from None
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), providers=[p for p in providers if p in ort.get_available_providers()])
    except Exception as err:  # noqa: BLE001 -- onnxruntime's own error types
        raise ModelFileError(f"{path}: not a readable ONNX model ({str(err).splitlines()[0]})") from None
    props = session.get_modelmeta().custom_metadata_map
    input_name = session.get_inputs()[0].name
    batch = None
    if METADATA_KEY in props:
        if given:
            raise ModelFileError(f"{path}: a facemargin export carries its input convention; input.* options are for foreign ONNX models")
        meta, fmt, key = json.loads(props[METADATA_KEY]), "facemargin", file_key(path)
    else:
        from ..published.onnx_spec import foreign_onnx_spec

        spec, batch, dim = foreign_onnx_spec(session.get_inputs(), session.get_outputs(), path, given)
        meta, fmt = {**spec.to_dict(), "embedding_size": dim, "format": "onnx"}, "onnx"
        key = f"{file_key(path)}|{json.dumps(spec.to_dict(), sort_keys=True)}"

    def run(x: Tensor) -> Tensor:
        arr = x.detach().cpu().numpy()
        step = batch or len(arr)  # a graph with a fixed batch size runs chunk by chunk
        outs = [session.run(None, {input_name: arr[i:i + step]})[0] for i in range(0, len(arr), step)]
        return torch.from_numpy(np.concatenate(outs))

    return Embedder(run, meta, key, str(path), "cpu", fmt)


def _load_torchscript(path: Path, device: str) -> Embedder:
    extra = {f"{METADATA_KEY}.json": ""}
    with warnings.catch_warnings():  # TorchScript is deprecated in recent torch, still loads
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    if not extra[f"{METADATA_KEY}.json"]:
        raise ModelFileError(f"{path}: TorchScript file without facemargin metadata; export with python -m facemargin.export")
    return Embedder(module.eval(), json.loads(extra[f"{METADATA_KEY}.json"]), file_key(path), str(path), device)


def _load_checkpoint(path: Path, device: str, checkpoint: dict[str, Any] | None = None) -> Embedder:
    from ..checkpoint import load_module

    module = load_module(path, map_location="cpu", checkpoint=checkpoint)
    return Embedder.from_module(module.backbone, module.record(), file_key(path), str(path), device)


def _load_weights(path: Path, device: str, backbone: str | None) -> Embedder:
    """A published weights file (insightface, AdaFace, CVLface ...) in the facemargin backbone of its layout."""
    from ..published import open_backbone, read_weights

    w = read_weights(path)
    if w.format == "facemargin":
        if backbone and backbone != w.named:
            raise ModelFileError(f"{path}: a facemargin checkpoint of backbone {w.named}; backbone={backbone} is for files "
                            "that do not name theirs")
        return _load_checkpoint(path, device, w.raw)  # read once
    model, w, name = open_backbone(path, backbone, w)
    meta = {**input_spec_of(model).to_dict(), "embedding_size": model.embedding_size, "format": w.format,
            "backbone": name, "source": path.name}
    return Embedder.from_module(model, meta, f"{file_key(path)}|{name}", str(path), device, w.format)


def load_embedder(
    path: str | os.PathLike, device: str = "cpu", backbone: str | None = None, input: Any = None
) -> Embedder:
    """An :class:`Embedder` from any model file a command takes (see :mod:`facemargin.published`).

    facemargin checkpoints and exports; insightface / AdaFace / CVLface weights (``backbone``
    names the architecture where the file does not); foreign ONNX models (``input``: ``size``,
    ``channel_order``, ``mean``, ``std`` complete their input convention).
    """
    from ..published import input_overrides, sniff

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(2, "model file not found", str(path))
    device = _pick_device(device)
    given = input_overrides(input)
    kind = sniff(path)
    if kind == "onnx":
        return _load_onnx(path, device, given)
    if given:
        raise ModelFileError(f"{path}: input.* options complete a foreign ONNX model's input convention; this {kind} file's "
                        "convention is known (facemargin record, or the published format's)")
    if kind == "torchscript":
        return _load_torchscript(path, device)
    return _load_weights(path, device, backbone)
