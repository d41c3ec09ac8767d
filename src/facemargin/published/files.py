"""What kind of model file this is (from its bytes, never its name), and its tensors, read without running code.

Kinds: ``"torchscript"`` (a zip with ``constants.pkl``), ``"torch"`` (``torch.save``: zip or legacy
pickle), ``"safetensors"`` (8-byte header length + JSON header) and ``"onnx"`` (a protobuf
``ModelProto``). Torch files are read with ``torch.load(weights_only=True)``: a file that needs code
to unpickle (a pickled class, an optimizer object, ``argparse.Namespace`` ...) is refused by name.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = ["ModelFileError", "describe_keys", "read_safetensors", "read_torch", "sidecar_config", "sniff"]


class ModelFileError(UserError, ValueError):
    """A model file that cannot be read or does not fit (named, with the tensor / key / option at fault)."""

_PICKLE_PROTO = b"\x80"


def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 10:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def sniff(path: str | os.PathLike) -> str:
    """``"torchscript"``, ``"torch"``, ``"safetensors"`` or ``"onnx"``; a clear error for anything else."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        raise ModelFileError(f"{path}: a zip archive but not a PyTorch file (no data.pkl); facemargin reads "
                        "PyTorch checkpoints / state dicts, safetensors, ONNX and TorchScript files")
    if head[:1] == _PICKLE_PROTO:
        return "torch"  # torch.save's legacy (pre-1.6) format starts with a pickle
    if _is_safetensors(head, size):
        return "safetensors"
    if head[:1] == b"\x08":  # ModelProto field 1 (ir_version), a varint: what every ONNX writer puts first
        return "onnx"
    raise ModelFileError(f"{path}: not a model file facemargin reads (first bytes {head[:8]!r}); expected a PyTorch "
                    "checkpoint or state dict, a .safetensors file, an ONNX model or a TorchScript file")


def read_torch(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; a file needing code is refused by name."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        needed = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({needed.group(1)})" if needed else ""
        raise ModelFileError(
            f"{path}: the file needs code to unpickle{what}; facemargin loads weights only "
            "(torch.load(weights_only=True)) and never runs code from a model file",
            hint="if you trust the file, save its tensors once in Python: torch.save(torch.load(PATH, "
                 "weights_only=False)['state_dict'], 'weights.pt') (or the state dict it holds), then load weights.pt",
        ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise ModelFileError(f"{path}: not a readable PyTorch file ({str(err).splitlines()[0]})") from None


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, header metadata)`` of a ``.safetensors`` file (a format that holds no code)."""
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - timm depends on safetensors
        raise ModelFileError(f"{path}: reading .safetensors needs the safetensors package: pip install safetensors") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = dict(f.metadata() or {})
    except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types
        raise ModelFileError(f"{path}: not a readable safetensors file ({err})") from None
    return tensors, meta


def sidecar_config(path: str | os.PathLike) -> dict[str, Any]:
    """CVLface's model config (``color_space``, ``input_size``), or ``{}``: ``<name>.yaml`` beside
    ``<name>.pt``, or ``pretrained_model/model.yaml`` beside a Hugging Face snapshot's weights."""
    path = Path(path)
    side = next((p for p in (path.with_suffix(".yaml"), path.parent / "pretrained_model" / "model.yaml") if p.is_file()), None)
    if side is None:
        return {}
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.load(side))
    except Exception as err:  # noqa: BLE001 -- a broken sidecar is named, not ignored
        raise ModelFileError(f"{side}: unreadable model config beside {Path(path).name} ({err})") from None
    return data if isinstance(data, dict) else {}


def describe_keys(keys: list[str], n: int = 5) -> str:
    """The first ``n`` keys, for messages."""
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")
