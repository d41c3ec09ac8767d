"""facemargin: margin-based softmax losses for face recognition, as a PyTorch Lightning plug-in.

Exports are imported on first use (PEP 562), so ``import facemargin.data`` (CLIs, DataLoader
workers) does not pay for torch, timm or Lightning. Using a backbone name in timm registers the
iresnet / MobileFaceNet models: ``import facemargin.backbones`` first.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_EXPORTS = {
    "MarginHead": "facemargin.heads",
    "Margin": "facemargin.margins",
    "available_margins": "facemargin.margins",
    "build_margin": "facemargin.margins",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        importlib.import_module("facemargin.backbones")  # registers iresnet*, mobilefacenet in timm
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'facemargin' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
