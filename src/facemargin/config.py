"""Config plumbing shared by the modules that accept Hydra/OmegaConf nodes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

__all__ = ["to_plain"]


def to_plain(obj: Any) -> Any:
    """OmegaConf nodes and mappings -> plain dicts and lists (resolved), anything else unchanged.

    Hyper-parameters saved in checkpoints and keyword arguments handed to timm must be plain Python.
    """
    if OmegaConf.is_config(obj):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
