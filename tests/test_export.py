"""Export parity: ONNX Runtime and TorchScript against the PyTorch checkpoint, and the same verification."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from facemargin.checkpoint import load_module
from facemargin.data.formats.image import decode_image
from facemargin.data.formats.verification import load_bin
from facemargin.data.loading.normalize import normalize_uint8, to_uint8_chw
from facemargin.evaluation import BinPairsEvaluator
from facemargin.evaluation.embedder import Embedder, load_embedder
from facemargin.evaluation.runner import run_evaluator
from facemargin.export import export_checkpoint, export_model

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(demo_checkpoint, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exported")
    return {
        "onnx": export_checkpoint(demo_checkpoint, out / "demo.onnx", "onnx"),
        "torchscript": export_checkpoint(demo_checkpoint, out / "demo.pt", "torchscript"),
        "onnx_flip": export_checkpoint(demo_checkpoint, out / "demo_flip.onnx", "onnx", flip_fused=True),
        "torchscript_flip": export_checkpoint(demo_checkpoint, out / "demo_flip.pt", "torchscript", flip_fused=True),
    }


def _inputs(demo_checkpoint: Path) -> dict[str, torch.Tensor]:
    """Random normalised inputs and real demo faces (normalised), 7 of each."""
    images, _ = load_bin(demo_checkpoint.parent / "demo_val.bin")
    faces = torch.stack([to_uint8_chw(decode_image(images[i])) for i in range(7)])
    return {"random": torch.randn(7, 3, 112, 112, generator=torch.Generator().manual_seed(0)),
            "faces": normalize_uint8(faces)}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "onnx_flip", "torchscript_flip"])
def test_exported_embeddings_equal_pytorch(demo_checkpoint, exported, fmt) -> None:
    backbone = load_module(demo_checkpoint).backbone
    model = load_embedder(exported[fmt])
    assert model.flip_fused == fmt.endswith("_flip")
    for kind, x in _inputs(demo_checkpoint).items():
        for batch in (1, 7):
            xb = x[:batch]
            with torch.no_grad():
                want = backbone(xb)
                if model.flip_fused:
                    want = want + backbone(torch.flip(xb, dims=[3]))
                got = model.net(xb)
            assert got.shape == (batch, 64)
            diff = np.abs(_unit(got.numpy()) - _unit(want.numpy())).max()
            assert diff < 1e-4, (fmt, kind, batch, diff)


def test_metadata_travels_inside_the_files(demo_checkpoint, exported) -> None:
    record = torch.load(demo_checkpoint, map_location="cpu", weights_only=True)["facemargin"]
    import onnx

    props = {p.key: p.value for p in onnx.load(str(exported["onnx"])).metadata_props}
    onnx_meta = json.loads(props["facemargin"])
    ts_meta = load_embedder(exported["torchscript"]).metadata
    for meta in (onnx_meta, ts_meta):
        assert meta["channel_order"] == "RGB" and meta["mean"] == [0.5] * 3 and meta["std"] == [0.5] * 3  # InputSpec.to_dict()
        assert meta["alignment"] == "arcface_5pt" and meta["output_description"] == "embedding, not L2-normalised"
        assert meta["input_size"] == 112 and meta["embedding_size"] == 64 and meta["flip_fused"] is False
        assert meta["margin"] == record["config"]["head"]["margin"] and meta["margin"]["name"] == "expface"
        assert meta["config"] == record["config"] and meta["verification"] == record["verification"]
        assert set(meta["verification"]["demo_val"]) == {"threshold_cosine", "acc"}  # the unit in the key ...
        assert meta["threshold_unit"].startswith("cosine similarity of the L2-normalised embeddings")  # ... and said
    assert load_embedder(exported["onnx_flip"]).metadata["flip_fused"] is True


def test_exported_model_verifies_the_demo_bin_like_the_checkpoint(demo_checkpoint, exported) -> None:
    record = torch.load(demo_checkpoint, map_location="cpu", weights_only=True)["facemargin"]
    results = {}
    for name, path in [("ckpt", demo_checkpoint), *((k, exported[k]) for k in ("onnx", "torchscript_flip"))]:
        evaluator = BinPairsEvaluator(demo_checkpoint.parent / "demo_val.bin")
        results[name], _ = run_evaluator(load_embedder(path), evaluator, batch_size=64, num_workers=0, progress=False)
    acc = results["ckpt"]["acc"]
    assert acc == pytest.approx(record["verification"]["demo_val"]["acc"], abs=1e-6)  # what training's validation saw
    for name, figures in results.items():
        assert figures["acc"] == acc and figures["threshold_cosine"] == pytest.approx(results["ckpt"]["threshold_cosine"]), name
        if not name.endswith("_flip"):  # a flip-fused file only knows the summed view
            assert figures["xnorm"] == pytest.approx(results["ckpt"]["xnorm"], rel=1e-4), name


def test_export_of_a_plain_module_and_bad_format(tmp_path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 16))
    path = export_model(net, tmp_path / "plain.onnx", "onnx")
    model = load_embedder(path)
    assert model.metadata["input_size"] == 112 and model.metadata["channel_order"] == "RGB"
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        np.testing.assert_allclose(model.net(x).numpy(), net(x).numpy(), atol=1e-5)
    images = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8)
    ref = Embedder.from_module(net).embed(images)
    np.testing.assert_allclose(model.embed(images), ref, atol=1e-5)
    with pytest.raises(ValueError, match=r"format must be one of \['onnx', 'torchscript'\], got 'tflite'"):
        export_model(net, tmp_path / "x.tflite", "tflite")
    assert not list(tmp_path.glob(".*tmp"))  # nothing half-written left behind
