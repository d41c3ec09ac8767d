"""A weights file's container recognised from its keys: whose format, which tensors are the backbone.

============================  ================================================================  ==========
format                        recognised by                                                     input
============================  ================================================================  ==========
``facemargin``                ``checkpoint["facemargin"]`` (the record) + ``state_dict``        the record's
``adaface``                   Lightning ``state_dict`` with ``model.`` + the ``adaface_ir``     BGR
                              layout (``head.kernel`` beside it); or that layout unprefixed
``cvlface``                   the ``adaface_ir`` or ``iresnet`` layout under ``net.``           ``color_space`` of
                              (``model.net.`` from the Hugging Face wrapper)                    ``<name>.yaml``, else RGB
``insightface``               the ``iresnet`` / ``mobilefacenet`` / ``face_vit`` layout         RGB
                              unprefixed (or ``module.``), or ``state_dict_backbone`` of an
                              arcface_torch training checkpoint
``lightning``                 another Lightning ``state_dict`` holding a known layout           unknown
============================  ================================================================  ==========
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .files import ModelFileError, describe_keys, read_safetensors, read_torch, sidecar_config, sniff
from .layouts import Arch, find_layout, infer_arch, mbf_names

__all__ = ["ADAFACE_ARCHS", "Weights", "read_weights"]

log = logging.getLogger(__name__)

#: AdaFace ``hyper_parameters["arch"]`` -> facemargin backbone
ADAFACE_ARCHS = {"ir_18": "adaface_ir18", "ir_34": "adaface_ir34", "ir_50": "adaface_ir50", "ir_101": "adaface_ir101"}


@dataclass
class Weights:
    """The backbone tensors of a file, in facemargin's names, and what the file says about them."""

    path: Path
    format: str
    #: backbone tensors, facemargin names (insightface MobileFaceNet renamed)
    tensors: dict[str, Any]
    #: facemargin name -> the name in the file (for messages)
    file_names: dict[str, str]
    layout: str | None
    #: the wrapper prefix the backbone's keys had in the file (``model.``, ``net.``, ...)
    prefix: str = ""
    #: the channel order the format's weights take (None: the file does not say)
    channel_order: str | None = None
    #: the order assumed when the file does not say (names the suggested backbone, never refuses one)
    assumed_order: str | None = None
    #: an architecture named inside the file (AdaFace's ``arch``, a facemargin record's backbone)
    named: str | None = None
    #: keys beside the backbone (a margin head's ``head.kernel`` ...)
    ignored: list[str] = field(default_factory=list)
    #: a facemargin checkpoint's record
    record: dict[str, Any] | None = None
    #: the whole object the file held (a checkpoint's head, optimizer ... for ``init_weights``)
    raw: Any = None

    def arch(self) -> Arch | None:
        """The architecture the tensors' names and shapes say (``None``: no known layout)."""
        if self.layout is None:
            return None
        return infer_arch(self.layout, self.tensors, self.channel_order or self.assumed_order)


def _tensors_only(d: Mapping[str, Any]) -> bool:
    import torch

    return bool(d) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in d.items())


def _split(sd: Mapping[str, Any]) -> tuple[str, str | None, dict[str, Any], list[str]]:
    """``(prefix, layout, backbone tensors without the prefix, other keys)``."""
    keys = [k for k in sd if isinstance(k, str)]
    found = find_layout(keys)
    if found is None:
        return "", None, dict(sd), []
    prefix, layout = found
    inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return prefix, layout, inner, [k for k in keys if not k.startswith(prefix)]


def _weights(path: Path, fmt: str, sd: Mapping[str, Any], **extra: Any) -> Weights:
    prefix, layout, inner, ignored = _split(sd)
    names = {k: prefix + k for k in inner}
    if layout == "insightface_mbf":
        renamed = {mbf_names(k): k for k in inner}
        inner = {new: inner[old] for new, old in renamed.items()}
        names = {new: prefix + old for new, old in renamed.items()}
        layout = "mobilefacenet"
    return Weights(path, fmt, inner, names, layout, prefix, ignored=ignored, **extra)


def _from_dict(obj: dict[str, Any], path: Path) -> Weights:
    from ..module import RECORD_KEY

    record = obj.get(RECORD_KEY)
    if isinstance(record, dict) and isinstance(obj.get("state_dict"), Mapping):
        from ..input_spec import InputSpec

        sd = {k[len("backbone."):]: v for k, v in obj["state_dict"].items() if k.startswith("backbone.")}
        named = ((record.get("config") or {}).get("backbone") or {}).get("name")
        w = _weights(path, "facemargin", sd, channel_order=InputSpec.from_dict(record, str(path)).channel_order,
                     named=named, record=record)
        w.file_names = {k: f"state_dict.backbone.{v}" for k, v in w.file_names.items()}
        return w
    if isinstance(obj.get("state_dict_backbone"), Mapping):  # arcface_torch's checkpoint_gpu_<rank>.pt
        return _weights(path, "insightface", obj["state_dict_backbone"], channel_order="RGB")
    if isinstance(obj.get("state_dict"), Mapping):  # a Lightning checkpoint
        sd = obj["state_dict"]
        hp = obj.get("hyper_parameters") if isinstance(obj.get("hyper_parameters"), Mapping) else {}
        w = _weights(path, "lightning", sd)
        if w.layout == "adaface_ir" and w.prefix == "model.":
            w.format, w.channel_order = "adaface", "BGR"
            arch = hp.get("arch")
            if isinstance(arch, str):
                if arch not in ADAFACE_ARCHS:
                    raise ModelFileError(f"{path}: AdaFace arch {arch!r} is not supported (facemargin has "
                                    f"{', '.join(ADAFACE_ARCHS)}: the IR nets, not IR-SE or the bottleneck ones)")
                w.named = ADAFACE_ARCHS[arch]
        w.file_names = {k: f"state_dict.{v}" for k, v in w.file_names.items()}
        return w
    if _tensors_only(obj):
        w = _weights(path, "state dict", obj)
        if w.layout is not None and w.prefix.endswith("net."):  # CVLface: BaseModel.net (model.net. in its Hugging Face wrapper)
            side = sidecar_config(path)
            if "color_space" not in side:
                log.warning("%s: CVLface weights without their model.yaml: taking RGB input (CVLface's default); "
                            "name an adaface_ir* backbone if the model was trained on BGR", path)
            w.format = "cvlface"
            w.channel_order = str(side["color_space"]).upper() if "color_space" in side else None
            w.assumed_order = "RGB"
        elif w.layout == "adaface_ir":
            w.format, w.channel_order = "adaface", "BGR"
        elif w.layout is not None:
            w.format, w.channel_order = "insightface", "RGB"
        return w
    keys = [str(k) for k in obj]
    raise ModelFileError(f"{path}: no model weights recognised: a dict with keys {describe_keys(keys)} (expected a state "
                    "dict, a Lightning/facemargin checkpoint with 'state_dict', or arcface_torch's 'state_dict_backbone')")


def read_weights(path: str | os.PathLike) -> Weights:
    """The backbone tensors of a PyTorch or safetensors file, their format and layout (see the module doc)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(2, "model file not found", str(path))
    kind = sniff(path)
    if kind in ("onnx", "torchscript"):
        raise ModelFileError(f"{path}: an {'ONNX' if kind == 'onnx' else 'TorchScript'} file holds a runnable model, "
                        "not weights facemargin can load into a backbone; pass the PyTorch weights (.pth / .ckpt)")
    if kind == "safetensors":
        obj = read_safetensors(path)[0]
    else:
        obj = read_torch(path)
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path}: holds a {type(obj).__name__}, not a state dict or checkpoint")
    w = _from_dict(obj, path)
    w.raw = obj
    return w
