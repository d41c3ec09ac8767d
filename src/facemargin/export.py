"""Export a trained embedder: ``python -m facemargin.export ckpt_path=... format=onnx|torchscript out=...``.

``ckpt_path`` is a facemargin checkpoint or a published weights file (insightface ``backbone.pth``
with ``backbone=iresnet100``, AdaFace ``.ckpt``, CVLface ``model.pt``: :mod:`facemargin.published`).

Only the backbone (with its embedding neck) is exported: normalised float images
``[B, 3, H, W]`` -> embeddings ``[B, D]`` (not L2-normalised), with a dynamic batch axis. The file
carries what a user of the model must know (:data:`~facemargin.evaluation.embedder.METADATA_KEY`,
JSON): ``channel_order`` (RGB), ``mean``/``std`` of ``(x / 255 - mean) / std``, ``input_size``,
``embedding_size``, ``flip_fused``, the ``margin`` and the training ``config``, and the
``verification`` thresholds validation chose (``threshold_cosine`` per set, ``threshold_unit``
says what it is; ``verification_notes`` why a set stored none). In ONNX it is a
``metadata_props`` entry; in TorchScript the extra file ``facemargin.json``.

``flip_fused=true`` exports ``f(x) + f(flip(x))`` as one graph (one batched forward of both views),
the embedding insightface's protocol uses. Every exported file runs in
``python -m facemargin.evaluate``, ``facemargin.embed`` and ``facemargin.compare``.
"""

from __future__ import annotations

from .hydra_entry import answer_help, hydra_main

answer_help(__name__, "facemargin.export", "export", __doc__)  # --help: answered before torch is imported

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UserError

__all__ = ["FORMATS", "FlipFused", "checkpoint_export_metadata", "export_checkpoint", "export_model"]

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


class FlipFused(nn.Module):
    """``net(x) + net(flip(x))`` with both views in one batch."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        both = self.net(torch.cat([x, torch.flip(x, dims=[3])]))
        n = x.shape[0]
        return both[:n] + both[n:]


def _export_onnx(net: nn.Module, example: Tensor, out: Path, metadata: str, opset: int) -> None:
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'facemargin[onnx]'") from None
    from .evaluation.embedder import METADATA_KEY

    with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated but needs no onnxscript
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (example,), str(out), dynamo=False, opset_version=opset,
            input_names=["images"], output_names=["embeddings"],
            dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
        )
    model = onnx.load(str(out))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata
    model.producer_name = "facemargin"
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def _export_torchscript(net: nn.Module, example: Tensor, out: Path, metadata: str) -> None:
    from .evaluation.embedder import METADATA_KEY

    with warnings.catch_warnings():  # TorchScript is deprecated in recent torch; it still loads everywhere
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example, check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={f"{METADATA_KEY}.json": metadata})


def export_model(
    net: nn.Module,
    out: str | os.PathLike,
    format: str = "onnx",
    metadata: dict[str, Any] | None = None,
    flip_fused: bool = False,
    opset: int = 17,
) -> Path:
    """Write ``net`` (float images -> embeddings) as ONNX or TorchScript with ``metadata`` inside.

    ``metadata`` is completed with facemargin's input pipeline defaults (RGB, mean/std 0.5, input
    size from ``net.input_size`` or 112) and ``flip_fused``. The file appears atomically.
    """
    from .evaluation.embedder import default_metadata

    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    out = Path(out)
    size = int(getattr(net, "input_size", None) or (metadata or {}).get("input_size") or 112)
    meta = {**default_metadata(size, getattr(net, "embedding_size", None)), **(metadata or {}), "flip_fused": bool(flip_fused)}
    net = net.eval().cpu()
    wrapped = FlipFused(net) if flip_fused else net
    example = torch.zeros(2, 3, int(meta["input_size"]), int(meta["input_size"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if format == "onnx":
            _export_onnx(wrapped, example, tmp, json.dumps(meta), opset)
        else:
            _export_torchscript(wrapped, example, tmp, json.dumps(meta))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def checkpoint_export_metadata(record: dict[str, Any], source: str) -> dict[str, Any]:
    """What an exported file records from a module's :meth:`~facemargin.module.FaceRecognitionModule.record`:
    its input convention (``InputSpec.to_dict()``: size, channel order, mean/std, an aligned face in,
    an embedding that is not L2-normalised out), sizes, thresholds (cosine, with their unit), margin and config."""
    from .evaluation.thresholds import THRESHOLD_UNIT, stored_thresholds
    from .input_spec import InputSpec

    keys = ("embedding_size", "num_classes", "config")
    head = record["config"].get("head") or {}
    spec = InputSpec.from_dict(record, source).to_dict()
    thresholds = {  # cosine thresholds (records written before stored squared distances: converted)
        "verification": stored_thresholds(record.get("verification")),
        "verification_notes": dict(record.get("verification_notes") or {}),
        "threshold_unit": THRESHOLD_UNIT,
    }
    return {**spec, **{k: record[k] for k in keys}, **thresholds, "margin": head.get("margin"), "source": Path(source).name}


def export_checkpoint(
    ckpt_path: str | os.PathLike, out: str | os.PathLike | None = None, format: str = "onnx",
    flip_fused: bool = False, opset: int = 17, backbone: str | None = None,
) -> Path:
    """Export the backbone of a training checkpoint, or of a published weights file (insightface
    ``backbone.pth``, AdaFace ``.ckpt``, CVLface ``model.pt``; ``backbone`` names its architecture
    where the file does not), with the model's input convention in the metadata (default ``out``:
    the file's name with ``.onnx`` / ``.pt``)."""
    from .input_spec import input_spec_of
    from .published import open_backbone, read_weights

    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    ckpt_path = Path(ckpt_path)
    target = Path(out) if out else ckpt_path.with_suffix(FORMATS[format])
    w = read_weights(ckpt_path)
    if w.format == "facemargin":
        from .checkpoint import load_module

        module = load_module(ckpt_path, map_location="cpu", checkpoint=w.raw)
        meta = checkpoint_export_metadata(module.record(), str(ckpt_path))
        return export_model(module.backbone, target, format, meta, flip_fused, opset)
    net, w, name = open_backbone(ckpt_path, backbone, w)
    meta = {**input_spec_of(net).to_dict(), "embedding_size": net.embedding_size, "format": w.format,
            "backbone": name, "verification": {}, "source": ckpt_path.name}
    return export_model(net, target, format, meta, flip_fused, opset)


def _run(cfg: Any) -> None:
    if cfg.format not in FORMATS:
        raise UserError(f"format={cfg.format}: expected one of {', '.join(FORMATS)}")
    if not Path(str(cfg.ckpt_path)).is_file():
        raise UserError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint",
                        hint="a checkpoint written by python -m facemargin.train (e.g. RUN/checkpoints/last.ckpt) "
                             "or a published weights file with backbone=NAME")
    if cfg.format == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise UserError("format=onnx needs the onnx package", hint="pip install 'facemargin[onnx]'") from None
    from .published.options import config_model_options

    backbone = config_model_options(cfg)["backbone"]
    path = export_checkpoint(cfg.ckpt_path, cfg.out, cfg.format, cfg.flip_fused, cfg.opset, backbone)
    print(f"exported {cfg.format} model ({'flip-fused, ' if cfg.flip_fused else ''}batch axis dynamic): {path}")


def main() -> None:
    """``python -m facemargin.export``: a user's mistake is one line and exit status 2."""
    hydra_main("facemargin.export", "export", __doc__, _run)


if __name__ == "__main__":
    main()
