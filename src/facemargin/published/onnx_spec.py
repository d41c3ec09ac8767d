"""The input convention of a foreign ONNX recognition model (e.g. insightface's model zoo ``w600k_r50.onnx``).

Such a file carries its input's name and shape in the graph, not its channel order or
normalisation: those come from ``input.channel_order=``, ``input.mean=``, ``input.std=`` (and
``input.size=`` where the graph's side is dynamic). Nothing is guessed: a missing one is asked for,
with insightface's values (RGB, ``(x - 127.5) / 127.5`` = mean 0.5, std 0.5) in the hint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .files import ModelFileError
from ..input_spec import InputSpec

__all__ = ["foreign_onnx_spec"]

INSIGHTFACE_HINT = ("insightface's model-zoo ONNX files take input.channel_order=RGB input.mean=0.5 input.std=0.5; "
                    "read your model's documentation for others")


def _dim(d: Any) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def foreign_onnx_spec(inputs: list[Any], outputs: list[Any], path: Path, given: Mapping[str, Any]) -> tuple[InputSpec, int | None, int | None]:
    """``(input spec, fixed batch size or None, embedding size or None)`` from the graph and ``given`` options.

    ``inputs`` / ``outputs``: onnxruntime's ``NodeArg`` lists (``name``, ``shape``).
    """
    if len(inputs) != 1:
        raise ModelFileError(f"{path}: a recognition model has one input, this graph has {len(inputs)}: "
                        f"{', '.join(i.name for i in inputs)}")
    shape = list(inputs[0].shape)
    if len(shape) != 4 or (_dim(shape[1]) not in (None, 3)):
        raise ModelFileError(f"{path}: input {inputs[0].name!r} has shape {shape}; expected images [batch, 3, size, size]")
    h, w = _dim(shape[2]), _dim(shape[3])
    if h is not None and w is not None and h != w:
        raise ModelFileError(f"{path}: input {inputs[0].name!r} is {h}x{w}; only square faces are supported")
    size = given.get("size") or h
    if h is not None and given.get("size") and given["size"] != h:
        raise ModelFileError(f"{path}: input.size={given['size']} but the graph's input {inputs[0].name!r} is {h}x{w}")
    missing = [k for k in ("channel_order", "mean", "std") if k not in given] + ([] if size else ["size"])
    if missing:
        raise ModelFileError(f"{path}: a foreign ONNX model (no facemargin metadata) does not say its input convention: "
                        f"pass {' '.join(f'input.{k}=...' for k in missing)}", hint=INSIGHTFACE_HINT)
    out_shape = list(outputs[0].shape) if outputs else []
    if len(out_shape) != 2:
        raise ModelFileError(f"{path}: output {outputs[0].name if outputs else '?'!r} has shape {out_shape}; expected embeddings [batch, D]")
    spec = InputSpec(size=int(size), channel_order=given["channel_order"], mean=given["mean"], std=given["std"])
    return spec, _dim(shape[0]), _dim(out_shape[1])
