"""facemargin: margin-based softmax losses for face recognition, as a PyTorch Lightning plug-in.

The main classes are exported lazily: ``import facemargin`` is cheap, and e.g.
``from facemargin import FaceRecognitionModule`` imports Lightning only then. Importing
:mod:`facemargin.backbones` registers the face backbones (iresnet*, mobilefacenet) in timm.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "MarginHead": "facemargin.heads",
    "PartialFCHead": "facemargin.heads",
    "Margin": "facemargin.margins",
    "available_margins": "facemargin.margins",
    "build_margin": "facemargin.margins",
    "FaceRecognitionModule": "facemargin.module",
    "FaceRecordDataModule": "facemargin.data.module",
    "load_module": "facemargin.checkpoint",
    "build_embedder": "facemargin.backbones",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'facemargin' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
