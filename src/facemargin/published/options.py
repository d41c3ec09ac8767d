"""The model options every command shares: ``backbone=NAME`` and ``input.size/channel_order/mean/std=``.

``evaluate``, ``export`` (Hydra: ``backbone=``, ``input.mean=0.5``), ``embed`` and ``compare``
(``key=value``: the same names) pass them to :func:`facemargin.evaluation.embedder.load_embedder`;
``train`` names its backbone with the config group ``backbone=`` and starts from a file with
``init_weights=`` or ``backbone.pretrained_file=``. Stdlib only (entry points parse options before
torch is imported).
"""

from __future__ import annotations

from typing import Any, Mapping

from ..cli import Option
from .files import ModelFileError

__all__ = ["INPUT_KEYS", "MODEL_OPTIONS", "config_model_options", "input_overrides", "model_options"]

INPUT_KEYS = ("size", "channel_order", "mean", "std")

#: ``key=value`` options of the entry points that take a model (``embed``, ``compare``)
MODEL_OPTIONS: dict[str, Option] = {
    "backbone": Option("", "architecture of a published weights file that does not name it (iresnet50, "
                           "mobilefacenet, adaface_ir101, cvlface_ir50, face_vit_b ...); default: read from its keys"),
    "input.size": Option("", "foreign ONNX model: input side in pixels (default: the graph's)"),
    "input.channel_order": Option("", "foreign ONNX model: RGB or BGR (insightface's model zoo: RGB)"),
    "input.mean": Option("", "foreign ONNX model: mean of (x / 255 - mean) / std, 1 or 3 numbers (insightface: 0.5)"),
    "input.std": Option("", "foreign ONNX model: std of (x / 255 - mean) / std, 1 or 3 numbers (insightface: 0.5)"),
}


def model_options(args: Mapping[str, Any]) -> dict[str, Any]:
    """``{"backbone": ..., "input": {...}}`` for ``load_embedder`` from parsed ``key=value`` options."""
    inp = {k: args.get(f"input.{k}") for k in INPUT_KEYS}
    return {"backbone": args.get("backbone") or None, "input": {k: v for k, v in inp.items() if v not in (None, "")} or None}


def config_model_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The same from a Hydra config (``evaluate``, ``export``): ``backbone=NAME`` selects
    ``conf/backbone/NAME.yaml``, whose ``name`` is taken; ``input`` is the ``input.*`` node."""
    node = cfg.get("backbone")
    name = node.get("name") if hasattr(node, "get") else node
    inp = cfg.get("input")
    return {"backbone": str(name) if name else None, "input": dict(inp) if inp else None}


def _numbers(value: Any, key: str) -> tuple[float, float, float]:
    if isinstance(value, str):
        parts = [p for p in value.strip("[]() ").replace(",", " ").split() if p]
    elif isinstance(value, (int, float)):
        parts = [value]
    else:
        parts = list(value)
    try:
        vals = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise ModelFileError(f"input.{key}={value!r}: expected 1 or 3 numbers") from None
    if len(vals) not in (1, 3):
        raise ModelFileError(f"input.{key}={value!r}: expected 1 or 3 numbers, got {len(vals)}")
    vals = vals * 3 if len(vals) == 1 else vals
    if any(v > 1.0 for v in vals) or (key == "std" and any(v <= 0 for v in vals)):
        raise ModelFileError(f"input.{key}={value!r}: on the [0, 1] scale of (x / 255 - mean) / std "
                        "(insightface's (x - 127.5) / 127.5 is input.mean=0.5 input.std=0.5)")
    return vals[0], vals[1], vals[2]


def input_overrides(input: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validated ``input.*`` options as :class:`~facemargin.input_spec.InputSpec` fields (given ones only)."""
    out: dict[str, Any] = {}
    for key, value in dict(input or {}).items():
        if value is None or value == "":
            continue
        if key not in INPUT_KEYS:
            raise ModelFileError(f"unknown option input.{key}; input options: {', '.join('input.' + k for k in INPUT_KEYS)}")
        if key == "size":
            try:
                out["size"] = int(value)
            except (TypeError, ValueError):
                raise ModelFileError(f"input.size={value!r}: expected a number of pixels") from None
        elif key == "channel_order":
            order = str(value).upper()
            if order not in ("RGB", "BGR"):
                raise ModelFileError(f"input.channel_order={value!r}: RGB or BGR")
            out["channel_order"] = order
        else:
            out[key] = _numbers(value, key)
    return out
