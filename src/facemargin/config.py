"""Config plumbing shared by the modules that accept Hydra/OmegaConf nodes, and where facemargin's
configs (``conf/``) and caches (``$FACEMARGIN_CACHE``) live."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["cache_home", "config_dir", "to_plain"]


def to_plain(obj: Any) -> Any:
    """OmegaConf nodes and mappings -> plain dicts and lists (resolved), anything else unchanged.

    Hyper-parameters saved in checkpoints and keyword arguments handed to timm must be plain Python.
    """
    from omegaconf import OmegaConf  # here, so that importing this module stays stdlib-only

    if OmegaConf.is_config(obj):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def config_dir() -> Path:
    """The packaged ``facemargin/conf`` (wheel installs) or the repository's ``conf/`` (editable)."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "conf"


def cache_home() -> Path:
    """facemargin's cache folder: ``$FACEMARGIN_CACHE`` if set, else ``~/.cache/facemargin``."""
    env = os.environ.get("FACEMARGIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "facemargin"
