"""Build a facemargin backbone from a published weights file, or load such a file into one.

``backbone=NAME`` names the architecture where the file does not (AdaFace's checkpoint and a
facemargin checkpoint name theirs; an insightface ``backbone.pth`` and a CVLface ``model.pt`` do
not, and then the depth the keys show names it). Sizes a name does not fix (embedding size, input
size, widths) are read from the tensors. A file that does not fit the named architecture raises
one :class:`~facemargin.errors.UserError` naming the first tensor that does not fit (its name, the
file's shape, the model's shape) and the architecture the file's keys and shapes suggest.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from .files import ModelFileError
from ..input_spec import input_spec_of
from .layouts import family_of
from .weights import Weights, read_weights

__all__ = ["check_fit", "load_timm_weights", "load_weights_into", "open_backbone"]

log = logging.getLogger(__name__)


def _shape(t: Any) -> list[int]:
    return list(t.shape)


def first_misfit(model_sd: Mapping[str, Any], w: Weights) -> str | None:
    """The first tensor that does not fit, in words; ``None`` when every tensor fits."""
    file_sd = w.tensors
    for key, value in model_sd.items():
        if key not in file_sd:
            if key.endswith("num_batches_tracked"):
                continue  # older torch versions did not save it
            return f"the model's tensor {key} {_shape(value)} is not in the file"
        if tuple(file_sd[key].shape) != tuple(value.shape):
            return f"tensor {w.file_names.get(key, key)} is {_shape(file_sd[key])} in the file, {_shape(value)} in the model"
    extra = [k for k in file_sd if k not in model_sd]
    if extra:
        return f"the file's tensor {w.file_names.get(extra[0], extra[0])} {_shape(file_sd[extra[0]])} has no place in the model"
    return None


def _suggestion(w: Weights) -> str:
    arch = w.arch()
    if arch is None:
        return "its keys match no layout facemargin knows (insightface IResNet / MobileFaceNet / ViT, AdaFace or CVLface IR)"
    if arch.name:
        return f"its keys and shapes say {arch.describe()}: pass backbone={arch.name}"
    return f"its keys and shapes say {arch.describe()}"


def check_fit(model: nn.Module, w: Weights, name: str) -> None:
    """Raise one clear :class:`UserError` unless every tensor of ``w`` fits ``model`` and its input convention."""
    misfit = first_misfit(model.state_dict(), w)
    if misfit:
        raise ModelFileError(f"{w.path}: backbone={name} does not fit this {w.format} file: {misfit}; {_suggestion(w)}")
    order = input_spec_of(model).channel_order
    if w.channel_order and w.channel_order != order:
        arch = w.arch()
        better = f"; pass backbone={arch.name}" if arch is not None and arch.name and arch.name != name else ""
        raise ModelFileError(f"{w.path}: the {w.format} weights take {w.channel_order} input, backbone={name} feeds "
                        f"{order}{better}")


def load_weights_into(model: nn.Module, path: str | os.PathLike, name: str, w: Weights | None = None) -> Weights:
    """Load the backbone weights of ``path`` (any format :func:`read_weights` knows) into ``model`` exactly.

    ``name`` is the model's backbone name, used in messages. Returns what was read.
    """
    import torch

    w = w if w is not None else read_weights(path)
    check_fit(model, w, name)
    own = model.state_dict()
    full = {k: w.tensors.get(k, own[k]) for k in own}  # a missing num_batches_tracked keeps the model's
    with torch.no_grad():
        model.load_state_dict(full, strict=True)
    if w.ignored:
        log.info("%s: loaded the %s backbone; left out %d other tensors (%s...)", path, w.format, len(w.ignored), w.ignored[0])
    return w


def _kwargs_for(name: str, w: Weights) -> dict[str, Any]:
    """The sizes to build ``name`` with: all the file says when the families match, else its embedding and input size."""
    arch = w.arch()
    if arch is None:
        return {}
    if family_of(name) == arch.family:
        return dict(arch.kwargs)
    return {k: arch.kwargs[k] for k in ("embedding_size", "input_size") if k in arch.kwargs}


def open_backbone(
    path: str | os.PathLike, backbone: str | None = None, w: Weights | None = None
) -> tuple[nn.Module, Weights, str]:
    """``(backbone in eval mode with the file's weights, what was read, its backbone name)``.

    ``w``: the file already read by :func:`~facemargin.published.weights.read_weights`.
    """
    from ..backbones import FACE_BACKBONES, build_embedder

    w = w if w is not None else read_weights(path)
    if w.layout is None and w.format != "facemargin":
        raise ModelFileError(f"{w.path}: {_suggestion(w)}; file keys: {', '.join(list(w.tensors)[:4])}")
    arch = w.arch()
    name = backbone or w.named or (arch.name if arch else None)
    if name is None:
        raise ModelFileError(f"{w.path}: {arch.describe() if arch else 'an unknown network'}: name a backbone with backbone=NAME",
                        hint=f"face backbones: {', '.join(FACE_BACKBONES)}")
    if name not in FACE_BACKBONES:
        raise ModelFileError(f"backbone={name}: not a face backbone facemargin can load {w.format} weights into; "
                        f"{_suggestion(w)}", hint=f"face backbones: {', '.join(FACE_BACKBONES)}")
    kwargs = _kwargs_for(name, w)
    model = build_embedder(name, **kwargs)
    load_weights_into(model, path, name, w)
    return model.eval(), w, name


def _timm_state_dict(path: Path) -> dict[str, Any]:
    """The state dict of a timm weights file: a training checkpoint's ``state_dict_ema`` / ``model_ema`` /
    ``state_dict`` / ``model`` entry unwrapped, a ``module.`` prefix dropped; read without running code."""
    from .files import read_safetensors, read_torch, sniff

    if not path.is_file():
        raise FileNotFoundError(2, "backbone.pretrained_file not found", str(path))
    kind = sniff(path)
    if kind not in ("torch", "safetensors"):
        raise ModelFileError(f"backbone.pretrained_file={path}: an {kind} file; timm weights are a .pth/.bin/.safetensors state dict")
    obj = read_safetensors(path)[0] if kind == "safetensors" else read_torch(path)
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ModelFileError(f"backbone.pretrained_file={path}: no state dict inside")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_timm_weights(name: str, path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, num_classes=0, **kwargs)`` with the weights of the local file ``path``.

    timm applies the model's own filter (e.g. a ViT's position embeddings resampled to the input
    size) and drops the classifier; every other tensor of the model must come from the file, and
    every tensor of the file must have a place in the model, else one error names the first that
    does not.
    """
    import timm

    path = Path(path).expanduser()
    sd = _timm_state_dict(path)
    sd_keys = list(sd)
    file_keys = set(sd_keys)
    overlay = {"state_dict": sd, "source": ""}  # timm's highest-priority weight source: no download
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as err:  # torch's load_state_dict: "Error(s) in loading state_dict ..."
        detail = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))
        raise ModelFileError(f"backbone.pretrained_file={path} does not fit timm model {name!r}: {detail}") from None
    classifier = timm.get_pretrained_cfg_value(name, "classifier") or "head"
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    own = list(model.state_dict())  # in the model's order: the first misfit is the one named
    missing = [k for k in own if k not in file_keys and not k.endswith("num_batches_tracked")]
    extra = [k for k in sd_keys if k not in set(own) and not k.startswith(tuple(f"{c}." for c in classifiers))]
    if missing or extra:
        what = f"the model's tensor {missing[0]} is not in the file" if missing else f"the file's tensor {extra[0]} has no place in the model"
        raise ModelFileError(f"backbone.pretrained_file={path} does not fit timm model {name!r}: {what}",
                             hint="pass the weights of that very architecture (backbone.name=)")
    return model
