"""Published face models in: insightface, AdaFace, CVLface, timm weights and foreign ONNX files.

:func:`load_embedder` (``facemargin.evaluation.embedder``, re-exported here) opens every model file
a command takes; the format is recognised from the file's keys and bytes, never its name:

- facemargin checkpoints and exports (they carry their record / metadata);
- insightface arcface_torch ``backbone.pth`` (IResNet r18-r200, MobileFaceNet, ViT), AdaFace
  Lightning ``.ckpt`` (IR-18/34/50/101, BGR input), CVLface ``model.pt`` / ``.safetensors`` (IR,
  and insightface-layout IR), each loaded into the facemargin backbone of that layout
  (:mod:`~facemargin.published.weights`, :mod:`~facemargin.published.layouts`);
- foreign ONNX recognition models, their input convention from ``input.*`` options
  (:mod:`~facemargin.published.onnx_spec`).

:func:`load_weights_into` starts a backbone from such a file (``train init_weights=``,
``backbone.pretrained_file=``); :func:`load_timm_weights` does it for any timm model.
Every torch file is read with ``torch.load(weights_only=True)``: code is never unpickled.

Importing this package imports the standard library only (the entry points read
:data:`MODEL_OPTIONS` before torch); the loaders are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .options import MODEL_OPTIONS, input_overrides, model_options

_LAZY = {
    "sniff": "files", "check_fit": "loader", "load_weights_into": "loader", "open_backbone": "loader",
    "load_timm_weights": "loader", "Weights": "weights", "read_weights": "weights",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "MODEL_OPTIONS",
    "Weights",
    "check_fit",
    "input_overrides",
    "load_embedder",
    "load_weights_into",
    "model_options",
    "open_backbone",
    "read_weights",
    "sniff",
    "load_timm_weights",
]


def load_embedder(*args: Any, **kwargs: Any) -> Any:
    """:func:`facemargin.evaluation.embedder.load_embedder` (imported on use: no import cycle)."""
    from ..evaluation.embedder import load_embedder as _load

    return _load(*args, **kwargs)
