"""Rebuild a trained model from its checkpoint alone.

Every checkpoint written by :class:`facemargin.module.FaceRecognitionModule` carries a plain record
(``checkpoint["facemargin"]``, loadable with ``torch.load(weights_only=True)``): the ``_target_``
nodes the backbone and head were built from, the number of classes, the embedding and input
sizes, the channel order and normalisation, and the thresholds the last validation chose.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .module import RECORD_KEY, FaceRecognitionModule

__all__ = ["load_module", "read_record"]


def read_record(checkpoint: dict[str, Any], path: str | os.PathLike = "<checkpoint>") -> dict[str, Any]:
    """The facemargin record of a loaded checkpoint; a clear error when it has none."""
    record = checkpoint.get(RECORD_KEY)
    if not isinstance(record, dict) or not record.get("config"):
        raise ValueError(
            f"{path}: no facemargin record (checkpoint['{RECORD_KEY}']['config']); it was not written by "
            "FaceRecognitionModule.from_config / python -m facemargin.train. Build the module yourself and "
            "use FaceRecognitionModule.load_from_checkpoint(path, backbone=..., head=...)"
        )
    return record


def load_module(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> FaceRecognitionModule:
    """The :class:`FaceRecognitionModule` saved in ``path``, in eval mode, on ``map_location``.

    Sharded Partial FC centres are consolidated in checkpoints, so the head is rebuilt whole on one
    process. ``module.verification`` holds the thresholds chosen by the last validation.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    record = read_record(checkpoint, path)
    module = FaceRecognitionModule.from_config(record["config"], num_classes=int(record["num_classes"]))
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    return module.to(map_location).eval()
