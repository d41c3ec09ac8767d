"""Rebuild a trained model from its checkpoint alone.

Every checkpoint written by :class:`facemargin.module.FaceRecognitionModule` carries a plain record
(``checkpoint["facemargin"]``, loadable with ``torch.load(weights_only=True)``): the ``_target_``
nodes the backbone and head were built from, the number of classes, the embedding and input
sizes, the channel order and normalisation, and the thresholds the last validation chose.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .published.files import ModelFileError
from .module import RECORD_KEY, FaceRecognitionModule

log = logging.getLogger(__name__)

__all__ = ["init_weights", "load_module", "read_record"]


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


def load_module(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", checkpoint: dict[str, Any] | None = None
) -> FaceRecognitionModule:
    """The :class:`FaceRecognitionModule` saved in ``path``, in eval mode, on ``map_location``.

    Sharded Partial FC centres are consolidated in checkpoints, so the head is rebuilt whole on one
    process. ``module.verification`` holds the thresholds chosen by the last validation.
    ``checkpoint``: the file's contents when already read (``torch.load(weights_only=True)``).
    """
    path = Path(path)
    if checkpoint is None:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    record = read_record(checkpoint, path)
    config = dict(record["config"])
    if isinstance(config.get("backbone"), dict) and config["backbone"].get("pretrained_file"):
        # the run started from that file; its weights are in this checkpoint now
        config["backbone"] = {**config["backbone"], "pretrained_file": None}
    module = FaceRecognitionModule.from_config(config, num_classes=int(record["num_classes"]))
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    return module.to(map_location).eval()


def _is_facemargin_checkpoint(obj: Any) -> bool:
    """A checkpoint of a FaceRecognitionModule: its record, or a Lightning state dict of ``backbone.*`` tensors."""
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        return False
    return RECORD_KEY in obj or any(str(k).startswith("backbone.") for k in obj["state_dict"])


def init_weights(module: FaceRecognitionModule, path: str | os.PathLike) -> None:
    """Start ``module`` from the weights of ``path`` (a new run: its own optimizer, schedule and
    step 0 -- unlike resuming with ``ckpt_path``).

    ``path`` is a facemargin checkpoint, or a published backbone (insightface ``backbone.pth``,
    AdaFace ``.ckpt``, CVLface ``model.pt``: :mod:`facemargin.published`) -- then only the backbone
    comes from the file (it must fit the configured ``backbone=`` exactly; an error names the first
    tensor that does not and the architecture the file suggests) and the head starts new.

    From a facemargin checkpoint every backbone tensor must be there with the same shape; head
    tensors are taken where names and shapes match (the margin's running statistics, UniFace's
    bias), so a run may change the head's layout (``head=partial_fc``) or objective. Sharded Partial
    FC centres are consolidated in checkpoints and re-sharded when training starts. A shape mismatch
    (e.g. other ``num_classes`` or ``subcenters``) raises, naming the tensor.
    """
    from .published import load_weights_into, read_weights

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "init_weights: checkpoint not found", str(path))
    w = read_weights(path)
    if not _is_facemargin_checkpoint(w.raw):
        name = str((module.config.get("backbone") or {}).get("name") or type(module.backbone).__name__)
        load_weights_into(module.backbone, path, name, w)
        log.info("init_weights %s: backbone from the %s file, head new", path, w.format)
        return
    weights = {k: v for k, v in w.raw.items() if k != "optimizer_states"}  # weights only
    module.on_load_checkpoint(weights)
    own = module.state_dict()
    for name, value in weights["state_dict"].items():
        if name in own and own[name].shape != value.shape:
            raise ModelFileError(
                f"{path}: {name} has shape {tuple(value.shape)}, this model's has {tuple(own[name].shape)} "
                "(num_classes, subcenters and the backbone must match)"
            )
    result = module.load_state_dict(weights["state_dict"], strict=False)
    missing = [k for k in result.missing_keys if k.startswith("backbone.")]
    if missing:
        raise ModelFileError(f"{path}: the backbone does not match this model's (missing {missing[:5]})")
    if result.missing_keys or result.unexpected_keys:
        log.info("init_weights %s: kept this model's own %s; ignored %s", path, result.missing_keys, result.unexpected_keys)
