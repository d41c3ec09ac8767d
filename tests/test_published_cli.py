"""End to end: an insightface ``backbone.pth`` and an AdaFace ``.ckpt`` through evaluate, embed, export
(the exported file re-evaluates equal) and ``train init_weights=`` (a few fine-tuning steps on the
demo set); and the README's "Start from a published model" commands on stand-in files.

The files are written in each peer's key layout (``published_layouts``); the figures are compared
with those of the peer's own forward (reference functions there) on the same images.
"""

from __future__ import annotations

import json
import os
import warnings
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch

import published_layouts as pl
from facemargin.backbones import build_embedder
from facemargin.data.formats.image import decode_image
from facemargin.data.loading.normalize import to_uint8_chw
from facemargin.data.tools.synthetic import render_identity
from facemargin.errors import UserError
from facemargin.evaluation import BinPairsEvaluator
from facemargin.evaluation.embedder import Embedder, load_embedder
from facemargin.evaluation.runner import run_evaluator
from test_published import IR18, adaface_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_KW = ["+backbone.kwargs.widths=[8,16,32,64]", "+backbone.kwargs.stem_width=8", "backbone.embedding_size=16"]


def run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-5000:]}"
    return proc


class Case:
    """A published file, the options that name its architecture, and the peer's own forward."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        if name == "insightface":
            self.sd = pl.insightface_iresnet(IR18)
            self.path, self.options, self.bgr, self.backbone = root / "backbone.pth", ["backbone=iresnet18"], False, "iresnet18"
            torch.save(self.sd, self.path)
        else:
            self.sd = pl.adaface_ir(IR18)
            self.path, self.options, self.bgr, self.backbone = root / "adaface_ir18_casia.ckpt", [], True, "adaface_ir18"
            torch.save(adaface_checkpoint(self.sd), self.path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The peer's network on its normalised input (AdaFace: unit x norm = its un-normalised output)."""
        if self.name == "insightface":
            return pl.insightface_iresnet_forward(self.sd, x, IR18)
        unit, norm = pl.adaface_forward(self.sd, x, IR18)
        return unit * norm

    def reference(self) -> Embedder:
        return Embedder(self.forward, {"channel_order": "BGR" if self.bgr else "RGB"}, source=f"reference {self.name}")


@pytest.fixture(scope="module", params=["insightface", "adaface"])
def case(request, tmp_path_factory) -> Case:
    return Case(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def aligned_faces(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("aligned")
    for k in range(2):
        for i, img in enumerate(render_identity(k, 2, seed=11, split=1)):
            (root / f"p{k}_{i}.jpg").write_bytes(simplejpeg.encode_jpeg(img, quality=95))
    return root


@pytest.mark.slow
def test_evaluate_embed_export_of_a_published_file(case, demo_checkpoint, aligned_faces, tmp_path) -> None:
    demo_bin = demo_checkpoint.parent / "demo_val.bin"
    want, _ = run_evaluator(case.reference(), BinPairsEvaluator(demo_bin, far_targets=[0.1]), num_workers=0, progress=False)

    # evaluate: the same figures as the peer's own network
    args = [f"ckpt_path={case.path}", *case.options, "eval=[bin]", f"eval.bin.path={demo_bin}", "eval.bin.far_targets=[1e-1]",
            "cache=false", "num_workers=0", "progress=false"]
    run("facemargin.evaluate", *args, f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    got = json.loads((tmp_path / "eval" / "eval.json").read_text())["sets"]["demo_val"]
    for key in ("acc", "threshold_cosine", "tar@far=1e-1", "xnorm"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key

    # embed (its main, in this process: evaluate above ran the same options through a real command line)
    from facemargin.embed import main as embed_main
    from facemargin.export import export_checkpoint

    out = tmp_path / "e.npy"
    embed_main([str(case.path), str(aligned_faces), *case.options, f"out={out}", "progress=false", "device=cpu"])
    names = (tmp_path / "e.txt").read_text().split()
    x = torch.stack([to_uint8_chw(decode_image((aligned_faces / n).read_bytes())) for n in names])
    emb = case.reference().embed_views(x)[0]  # the peer's network, image + flip
    np.testing.assert_allclose(np.load(out), torch.nn.functional.normalize(emb, dim=1).numpy(), atol=1e-5)

    # compare: a published file has no stored threshold, a given one decides
    from facemargin.compare import compare

    a, b = aligned_faces / names[0], aligned_faces / names[1]
    backbone = case.options[0].split("=", 1)[1] if case.options else None
    result = compare(str(case.path), str(a), str(b), threshold=0.3, device="cpu", backbone=backbone)
    unit = torch.nn.functional.normalize(emb, dim=1)
    assert result["cosine"] == pytest.approx(float(unit[0] @ unit[1]), abs=1e-5) and result["threshold_from"] == "given"

    # export: the file keeps the convention, and scores the same (the README test runs the command line)
    onnx_path = export_checkpoint(case.path, tmp_path / "model.onnx", backbone=backbone)
    exported = load_embedder(onnx_path)
    assert exported.spec.channel_order == ("BGR" if case.bgr else "RGB") and exported.metadata["backbone"] == case.backbone
    again, _ = run_evaluator(exported, BinPairsEvaluator(demo_bin, far_targets=[0.1]), num_workers=0, progress=False)
    for key in ("acc", "threshold_cosine", "tar@far=1e-1"):
        assert again[key] == pytest.approx(want[key], rel=1e-4), key


@pytest.mark.slow
def test_fine_tune_from_a_published_file(case, demo_env, tmp_path) -> None:
    from conftest import compose_run, one_torch_thread
    from facemargin.train import build

    out = tmp_path / "run"
    cfg = compose_run(out, f"backbone={case.backbone}", f"init_weights={case.path}", *TINY_KW,
                      "+data.demo_options.num_identities=8", "+data.demo_options.images_per_identity=4",
                      "+data.demo_options.num_val_identities=4", "+data.demo_options.num_val_pairs=20",
                      "data.batch_size=8", "data.num_workers=0", "val_num_workers=0", "trainer.max_steps=3",
                      "trainer.max_epochs=1", "logger=none", "~callbacks.progress_bar", "~callbacks.checkpoint")
    with one_torch_thread():
        trainer, model, dm = build(cfg)
        # the backbone starts from the file (AdaFace's head.kernel left out: the head is new)
        assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in case.sd.items())
        assert model.input_spec.channel_order == ("BGR" if case.bgr else "RGB")
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3
    assert not all(torch.equal(model.backbone.state_dict()[k], v) for k, v in case.sd.items())  # it trained
    ckpt = tmp_path / "tuned.ckpt"
    trainer.save_checkpoint(ckpt)
    record = torch.load(ckpt, map_location="cpu", weights_only=True)["facemargin"]
    assert record["channel_order"] == ("BGR" if case.bgr else "RGB") and record["config"]["backbone"]["pretrained_file"] is None
    tuned = load_embedder(ckpt)
    x = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8)
    model.eval()
    with torch.no_grad():
        pl_close = model(x)  # the module normalises with the backbone's convention
    assert torch.allclose(tuned.embed_views(x, flip=False)[0], pl_close, atol=1e-5)


# ------------------------------------------------------------------------------------------ README
@pytest.mark.slow
def test_readme_start_from_a_published_model(tmp_path, demo_env) -> None:
    """The README's commands, on a stand-in for insightface's r100 (its layout and depth, tiny widths),
    a stand-in IJB-C and a folder of aligned faces; the training line gets a few steps only."""
    from test_ijb import make_ijb

    section = (REPO / "README.md").read_text().split("## Start from a published model", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [c for c in block.replace("\\\n", " ").splitlines() if c.startswith("python -m facemargin.")]
    assert [c.split()[2] for c in commands] == ["facemargin.evaluate", "facemargin.train", "facemargin.embed",
                                                "facemargin.export", "facemargin.evaluate", "facemargin.evaluate"]
    # stand-ins: insightface's r100 and AdaFace's IR-101 at their depths with tiny widths, a foreign ONNX r50
    torch.save(pl.insightface_iresnet((3, 13, 30, 3)), tmp_path / "backbone.pth")
    torch.save(adaface_checkpoint(pl.adaface_ir((3, 13, 30, 3)), arch="ir_101"), tmp_path / "adaface_ir101_webface12m.ckpt")
    r50 = build_embedder("iresnet50", embedding_size=16, widths=(8, 16, 32, 64), stem_width=8).eval()
    r50.load_state_dict(pl.insightface_iresnet((3, 4, 14, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(r50, (torch.zeros(1, 3, 112, 112),), str(tmp_path / "w600k_r50.onnx"), dynamo=False,
                          input_names=["input.1"], dynamic_axes={"input.1": {0: "None"}})
    make_ijb(tmp_path / "IJB_release" / "IJBC")
    for k in range(4):
        (tmp_path / "my_faces" / f"person_{k}").mkdir(parents=True)
        for i, img in enumerate(render_identity(k, 4, seed=5)):
            (tmp_path / "my_faces" / f"person_{k}" / f"{i}.jpg").write_bytes(simplejpeg.encode_jpeg(img, quality=95))
    test_only = {
        "facemargin.evaluate": ["num_workers=0", "progress=false", "cache=false"],
        "facemargin.train": [*TINY_KW, "data.batch_size=8", "data.num_workers=0", "trainer.max_steps=2", "trainer.max_epochs=1",
                             "logger=none", "~callbacks.progress_bar"],
        "facemargin.embed": ["progress=false", "device=cpu"],
        "facemargin.export": [],
    }
    env_data = {"FACEMARGIN_DATA": str(tmp_path)}
    os.environ.update(env_data)
    try:
        for command in commands:
            argv = shlex.split(command)[2:]
            module = argv[0]
            out = run(module, *argv[1:], *test_only[module], cwd=tmp_path).stdout
            if "ijbc" in command:
                assert re.search(r"^ijbc\s+.*\d\.\d{4}", out, re.M), out  # a row of figures (nulls explained below it)
    finally:
        for k in env_data:
            os.environ.pop(k)
    assert np.load(tmp_path / "embeddings.npy").shape == (16, 16)
    assert load_embedder(tmp_path / "r100.onnx").metadata["backbone"] == "iresnet100"
    # the error the README shows, on insightface's r50 at its real widths
    torch.save(build_embedder("iresnet50").state_dict(), tmp_path / "r50.pth")
    with pytest.raises(UserError) as err:
        load_embedder(tmp_path / "r50.pth", backbone="iresnet100")
    message = str(err.value).split(": ", 1)[1]
    assert " ".join(message.split()) in " ".join(section.replace("`", "").split()), message
