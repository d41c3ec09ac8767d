"""Published models in: each peer's key layout loads and embeds as the peer's own network does.

The state dicts and reference forwards come from ``published_layouts`` (written from insightface's,
AdaFace's and CVLface's architecture descriptions, not from facemargin's modules). Embeddings must
agree to 1e-5 of their scale.
"""

from __future__ import annotations

import argparse
import collections
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import published_layouts as pl
from facemargin.backbones import build_embedder
from facemargin.errors import UserError
from facemargin.evaluation.embedder import load_embedder
from facemargin.published import read_weights
from facemargin.published.files import ModelFileError

IR18 = (2, 2, 2, 2)
TINY = dict(widths=(8, 16, 32, 64), stem_width=8)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (3, 3, 112, 112), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """``|got - want| <= tol * max |want|`` elementwise (float32 noise of the same computation)."""
    scale = float(want.abs().max())
    assert scale > 0
    err = float((got.float() - want.float()).abs().max())
    assert err <= tol * scale, f"max |diff| {err:.3g} > {tol} x {scale:.3g}"


def raw_embedding(embedder, images: torch.Tensor) -> torch.Tensor:
    return embedder.embed_views(images, flip=False)[0]


# ------------------------------------------------------------------------------------------ insightface
@pytest.mark.parametrize("wrap", ["plain", "ddp", "training_checkpoint"])
def test_insightface_iresnet_backbone_pth(tmp_path, images, wrap) -> None:
    sd = pl.insightface_iresnet(IR18)
    obj = {"plain": sd, "ddp": {f"module.{k}": v for k, v in sd.items()},
           "training_checkpoint": {"epoch": 3, "global_step": 9, "state_dict_backbone": sd, "state_dict_softmax_fc": {}}}[wrap]
    path = tmp_path / "backbone.pth"
    torch.save(obj, path)
    model = load_embedder(path)  # the depth names the architecture: iresnet18
    assert model.format == "insightface" and model.metadata["backbone"] == "iresnet18"
    assert model.spec.channel_order == "RGB" and model.spec.mean == (0.5,) * 3 and model.input_size == 112
    want = pl.insightface_iresnet_forward(sd, pl.normalise(images), IR18)
    close(raw_embedding(model, images), want)
    # a facemargin iresnet18 given the same tensors embeds the same
    own = build_embedder("iresnet18", embedding_size=16, **TINY).eval()
    own.load_state_dict(sd)
    with torch.no_grad():
        close(own(pl.normalise(images)), want)
    assert load_embedder(path, backbone="iresnet18").metadata["backbone"] == "iresnet18"


def test_insightface_mobilefacenet_renamed_to_facemargin(tmp_path, images) -> None:
    sd = pl.insightface_mbf(scale=1)
    assert "layers.3.layers.0.layers.1.layers.0.weight" in sd and "features.layers.2.weight" in sd
    path = tmp_path / "mbf.pth"
    torch.save(sd, path)
    model = load_embedder(path, backbone="mobilefacenet")
    assert model.format == "insightface" and model.spec.channel_order == "RGB"
    close(raw_embedding(model, images), pl.insightface_mbf_forward(sd, pl.normalise(images)))
    assert load_embedder(path).metadata["backbone"] == "mobilefacenet"  # named by its blocks (1, 4, 6, 2)
    large = tmp_path / "mbf_large.pth"
    torch.save(pl.insightface_mbf(blocks=(2, 8, 12, 4), scale=1), large)
    arch = read_weights(large).arch()
    assert (arch.name, arch.kwargs["scale"]) == ("mobilefacenet_large", 1)


def test_insightface_vit(tmp_path, images) -> None:
    sd = pl.insightface_vit(dim=16, depth=12)
    path = tmp_path / "vit.pth"
    torch.save(sd, path)
    with pytest.raises(ModelFileError, match=r"a face ViT \(insightface layout\) with width 16 and 12 blocks \(no facemargin "
                                             r"backbone has this depth\): name a backbone with backbone=NAME"):
        load_embedder(path)
    model = load_embedder(path, backbone="face_vit_t")  # insightface vit_t's depth and heads, width from the file
    close(raw_embedding(model, images), pl.insightface_vit_forward(sd, pl.normalise(images), heads=8))


def test_face_vit_masks_tokens_in_training_only() -> None:
    net = build_embedder("face_vit_t", embedding_size=8, kwargs={"embed_dim": 16, "depth": 1}).train()
    torch.manual_seed(0)
    x = torch.randn(4, 3, 112, 112)
    tokens = net.forward_features(x)
    masked = (tokens == net.mask_token.detach()).all(-1).sum(1)
    assert masked.tolist() == [144 - int(144 * 0.9)] * 4  # 10 % of each face's tokens replaced
    assert not (net.eval().forward_features(x) == net.mask_token.detach()).all(-1).any()


# ------------------------------------------------------------------------------------------ AdaFace
def adaface_checkpoint(sd: dict, arch: str = "ir_18", classes: int = 10) -> dict:
    """A Lightning checkpoint as AdaFace's train_val.Trainer saves it (PL 1.8): model.* and head.*."""
    return {
        "epoch": 25, "global_step": 1000, "pytorch-lightning_version": "1.8.6",
        "state_dict": {**{f"model.{k}": v for k, v in sd.items()},
                       "head.kernel": torch.randn(16, classes), "head.t": torch.zeros(1),
                       "head.batch_mean": torch.ones(1) * 20, "head.batch_std": torch.ones(1) * 100},
        "hparams_name": "kwargs",
        "hyper_parameters": {"arch": arch, "head": "adaface", "m": 0.4, "h": 0.333, "s": 64.0, "lr": 0.1},
        "lr_schedulers": [{"milestones": collections.Counter({12: 1, 20: 1, 24: 1}), "gamma": 0.1, "_last_lr": [0.001]}],
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.001, "momentum": 0.9, "params": [0, 1]}]}],
        "callbacks": {"ModelCheckpoint{'monitor': 'val_acc', 'mode': 'max'}": {"best_model_score": torch.tensor(0.97)}},
    }


@pytest.fixture(scope="module")
def adaface_sd() -> dict:
    sd = pl.adaface_ir(IR18)
    # the stage-1 entry unit keeps its width (8 -> 8) and strides: AdaFace's max-pool shortcut, no tensors
    assert "body.0.shortcut_layer.0.weight" not in sd and "body.2.shortcut_layer.0.weight" in sd
    return sd


def test_adaface_ckpt_bgr_and_maxpool_shortcut(tmp_path, images, adaface_sd) -> None:
    path = tmp_path / "adaface_ir18_webface4m.ckpt"
    torch.save(adaface_checkpoint(adaface_sd), path)
    model = load_embedder(path)  # the arch comes from hyper_parameters
    assert model.format == "adaface" and model.metadata["backbone"] == "adaface_ir18"
    assert model.spec.channel_order == "BGR"
    unit, norm = pl.adaface_forward(adaface_sd, pl.normalise(images, bgr=True), IR18)
    got = raw_embedding(model, images)
    close(got, unit * norm)  # facemargin's un-normalised embedding = AdaFace's unit embedding x norm
    close(F.normalize(got, dim=1), unit)
    close(got.norm(dim=1, keepdim=True), norm)
    # RGB fed to the same net would differ: the channel order matters for this check to mean anything
    assert float((pl.adaface_forward(adaface_sd, pl.normalise(images), IR18)[0] - unit).abs().max()) > 1e-3
    own = build_embedder("adaface_ir18", embedding_size=16, **TINY).eval()
    own.load_state_dict(adaface_sd)
    with torch.no_grad():
        close(own(pl.normalise(images, bgr=True)), unit * norm)


def test_adaface_unsupported_arch_is_named(tmp_path, adaface_sd) -> None:
    path = tmp_path / "irse.ckpt"
    torch.save(adaface_checkpoint(adaface_sd, arch="ir_se_50"), path)
    with pytest.raises(ModelFileError, match="AdaFace arch 'ir_se_50' is not supported"):
        load_embedder(path)


# ------------------------------------------------------------------------------------------ CVLface
@pytest.mark.parametrize("container", ["pt_with_yaml", "hf_safetensors", "bgr_yaml", "no_yaml"])
def test_cvlface_ir(tmp_path, images, adaface_sd, container, caplog) -> None:
    from safetensors.torch import save_file

    if container == "hf_safetensors":  # the Hugging Face wrapper: model.net.*, its config in pretrained_model/
        path = tmp_path / "model.safetensors"
        save_file({f"model.net.{k}": v.contiguous() for k, v in adaface_sd.items()}, str(path))
        (tmp_path / "pretrained_model").mkdir()
        (tmp_path / "pretrained_model" / "model.yaml").write_text("color_space: 'RGB'\nname: 'ir18'\n")
    elif container == "no_yaml":
        path = tmp_path / "weights.pt"
        torch.save({f"net.{k}": v for k, v in adaface_sd.items()}, path)
    else:
        path = tmp_path / "model.pt"
        torch.save({f"net.{k}": v for k, v in adaface_sd.items()}, path)
        order = "BGR" if container == "bgr_yaml" else "RGB"
        path.with_suffix(".yaml").write_text(f"input_size: [3, 112, 112]\ncolor_space: '{order}'\nname: 'ir18'\noutput_dim: 16\n")
    model = load_embedder(path)
    assert ("without their model.yaml: taking RGB" in caplog.text) == (container == "no_yaml")
    bgr = container == "bgr_yaml"
    assert model.format == "cvlface" and model.spec.channel_order == ("BGR" if bgr else "RGB")
    assert model.metadata["backbone"] == ("adaface_ir18" if bgr else "cvlface_ir18")
    unit, norm = pl.adaface_forward(adaface_sd, pl.normalise(images, bgr=bgr), IR18)
    close(raw_embedding(model, images), unit * norm)
    if container == "no_yaml":  # the file does not say: BGR may be named
        assert load_embedder(path, backbone="adaface_ir18").spec.channel_order == "BGR"


def test_cvlface_insightface_layout(tmp_path, images) -> None:
    sd = pl.insightface_iresnet(IR18)
    path = tmp_path / "model.pt"
    torch.save({f"net.{k}": v for k, v in sd.items()}, path)
    model = load_embedder(path)
    assert (model.format, model.metadata["backbone"], model.spec.channel_order) == ("cvlface", "iresnet18", "RGB")
    close(raw_embedding(model, images), pl.insightface_iresnet_forward(sd, pl.normalise(images), IR18))


# ------------------------------------------------------------------------------------------ errors
def test_wrong_backbone_names_the_first_misfit_and_the_suggestion(tmp_path, adaface_sd) -> None:
    path = tmp_path / "backbone.pth"
    torch.save(pl.insightface_iresnet(IR18), path)
    with pytest.raises(UserError) as err:
        load_embedder(path, backbone="iresnet50")
    assert str(err.value) == (
        f"{path}: backbone=iresnet50 does not fit this insightface file: the model's tensor layer1.2.bn1.weight [8] "
        "is not in the file; its keys and shapes say an IResNet (insightface layout) with stages (2, 2, 2, 2) = "
        "iresnet18: pass backbone=iresnet18")
    with pytest.raises(ModelFileError, match=r"backbone=adaface_ir18 does not fit this insightface file: the model's tensor "
                                             r"input_layer\.0\.weight \[64, 3, 3, 3\] is not in the file; .* pass backbone=iresnet18"):
        load_embedder(path, backbone="adaface_ir18")
    # a configured backbone of other widths: the file's shape and the model's are both named
    from facemargin.published import load_weights_into

    with pytest.raises(ModelFileError, match=r"tensor conv1\.weight is \[8, 3, 3, 3\] in the file, \[64, 3, 3, 3\] in the model"):
        load_weights_into(build_embedder("iresnet18", embedding_size=16), path, "iresnet18")
    # the right layout, the wrong input convention: AdaFace weights in an RGB net
    ada = tmp_path / "ada.ckpt"
    torch.save(adaface_checkpoint(adaface_sd), ada)
    with pytest.raises(ModelFileError, match="the adaface weights take BGR input, backbone=cvlface_ir18 feeds RGB; pass backbone=adaface_ir18"):
        load_embedder(ada, backbone="cvlface_ir18")


class _Target:
    pwned = False


class _Payload:
    """Unpickling this would run ``setattr(_Target, "pwned", True)``."""

    def __reduce__(self):
        return (setattr, (_Target, "pwned", True))


def test_a_pickle_that_needs_code_is_refused(tmp_path) -> None:
    sd = pl.insightface_iresnet(IR18)
    for i, extra in enumerate([argparse.Namespace(arch="ir_18"), _Payload()]):
        path = tmp_path / f"model{i}.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "hparams": extra}, path)
        with pytest.raises(ModelFileError, match=r"needs code to unpickle \((argparse\.Namespace|setattr)\); "
                                                 r"facemargin loads weights only") as err:
            load_embedder(path)
        assert "torch.save(torch.load(PATH, weights_only=False)" in err.value.hint
    assert _Target.pwned is False


def test_unknown_files_are_named(tmp_path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("not a model\n")
    with pytest.raises(ModelFileError, match="not a model file facemargin reads"):
        load_embedder(text)
    weird = tmp_path / "weird.pth"
    torch.save({"foo.weight": torch.zeros(3)}, weird)
    with pytest.raises(ModelFileError, match="its keys match no layout facemargin knows"):
        load_embedder(weird)
    with pytest.raises(ModelFileError, match=r"input\.\* options complete a foreign ONNX model"):
        load_embedder(weird, input={"channel_order": "BGR"})


# ------------------------------------------------------------------------------------------ foreign ONNX
@pytest.fixture(scope="module")
def insightface_onnx(tmp_path_factory) -> tuple[Path, Path, dict]:
    """insightface's r18 layout exported as insightface's model zoo does: input "input.1", no metadata."""
    pytest.importorskip("onnxruntime")
    sd = pl.insightface_iresnet(IR18, seed=4)
    net = build_embedder("iresnet18", embedding_size=16, **TINY).eval()
    net.load_state_dict(sd)
    out = tmp_path_factory.mktemp("onnx")
    paths = out / "w600k_r18.onnx", out / "fixed_batch.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 112, 112),), str(paths[0]), dynamo=False, input_names=["input.1"],
                          output_names=["fc1"], dynamic_axes={"input.1": {0: "None"}, "fc1": {0: "None"}})
        torch.onnx.export(net, (torch.zeros(1, 3, 112, 112),), str(paths[1]), dynamo=False, input_names=["data"])
    return paths[0], paths[1], sd


def test_foreign_onnx_asks_for_its_input_convention(insightface_onnx, images) -> None:
    dynamic, fixed, sd = insightface_onnx
    with pytest.raises(ModelFileError, match=r"foreign ONNX model .* pass input\.channel_order=\.\.\. input\.mean=\.\.\. "
                                             r"input\.std=\.\.\.") as err:
        load_embedder(dynamic)
    assert "input.channel_order=RGB input.mean=0.5 input.std=0.5" in err.value.hint
    want = pl.insightface_iresnet_forward(sd, pl.normalise(images), IR18)
    for path in (dynamic, fixed):  # a graph with batch size 1 runs image by image
        model = load_embedder(path, input={"channel_order": "RGB", "mean": "0.5", "std": "0.5,0.5,0.5"})
        assert model.format == "onnx" and model.input_size == 112 and model.metadata["embedding_size"] == 16
        close(raw_embedding(model, images), want)
    with pytest.raises(ModelFileError, match=r"input\.size=96 but the graph's input 'input\.1' is 112x112"):
        load_embedder(dynamic, input={"channel_order": "RGB", "mean": 0.5, "std": 0.5, "size": 96})
    with pytest.raises(ModelFileError, match=r"input\.mean=127\.5.*input\.mean=0\.5 input\.std=0\.5"):
        load_embedder(dynamic, input={"channel_order": "RGB", "mean": 127.5, "std": 127.5})
    bgr = load_embedder(dynamic, input={"channel_order": "BGR", "mean": 0.5, "std": 0.5})
    assert bgr.key != model.key  # the embedding cache tells the two conventions apart


# ------------------------------------------------------------------------------------------ timm weights
def test_timm_pretrained_file(tmp_path) -> None:
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    pth, st = tmp_path / "resnet18.pth", tmp_path / "model.safetensors"
    torch.save({"state_dict_ema": src.state_dict(), "epoch": 3}, pth)  # a timm training checkpoint
    save_file(src.state_dict(), str(st))
    for path in (pth, st):
        net = build_embedder("resnet18", embedding_size=32, pretrained_file=str(path))
        assert torch.equal(net.backbone.conv1.weight, src.conv1.weight) and torch.equal(net.backbone.layer4[1].bn2.running_var,
                                                                                        src.layer4[1].bn2.running_var)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    net = build_embedder("vit_tiny_patch16_224", embedding_size=32, input_size=112, pretrained_file=str(tmp_path / "vit.pth"))
    assert net.backbone.pos_embed.shape == (1, 1 + 7 * 7, 192)  # resampled by timm's filter for 112 x 112
    assert torch.equal(net.backbone.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    with pytest.raises(ModelFileError, match=r"backbone\.pretrained_file=.*resnet18\.pth does not fit timm model .resnet34.: the model.s tensor layer1\.2\.conv1\.weight is not in the file"):
        build_embedder("resnet34", pretrained_file=str(pth))


def test_face_backbone_pretrained_file_and_init_weights(tmp_path, adaface_sd) -> None:
    from facemargin.checkpoint import init_weights
    from facemargin.module import FaceRecognitionModule

    ckpt = tmp_path / "ada.ckpt"
    torch.save(adaface_checkpoint(adaface_sd), ckpt)
    net = build_embedder("adaface_ir18", embedding_size=16, pretrained_file=str(ckpt), **TINY)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in adaface_sd.items())
    # fine-tuning: the backbone from the file, the head new (AdaFace's head.kernel is left out)
    config = {"backbone": {"_target_": "facemargin.backbones.build_embedder", "name": "adaface_ir18", "embedding_size": 16,
                           "kwargs": dict(TINY)},
              "head": {"_target_": "facemargin.heads.MarginHead", "_partial_": True}}
    module = FaceRecognitionModule.from_config(config, num_classes=7)
    head_before = {k: v.clone() for k, v in module.head.state_dict().items()}
    init_weights(module, ckpt)
    assert all(torch.equal(module.backbone.state_dict()[k], v) for k, v in adaface_sd.items())
    assert all(torch.equal(module.head.state_dict()[k], v) for k, v in head_before.items())
    # the module feeds its backbone what it takes: BGR, in forward and in the data pipeline alike
    assert module.input_spec.channel_order == "BGR" and module.record()["channel_order"] == "BGR"
    module.eval()
    x = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8)
    with torch.no_grad():
        close(module(x), module.backbone(pl.normalise(x, bgr=True)))
    from facemargin.data.module import FaceRecordDataModule

    batch = FaceRecordDataModule.normalize_batch((x, torch.zeros(2)), module.input_spec)
    close(batch[0], pl.normalise(x, bgr=True))


def test_export_of_a_published_file_carries_its_convention(tmp_path, images, adaface_sd) -> None:
    pytest.importorskip("onnxruntime")
    import json

    import onnx

    from facemargin.export import export_checkpoint

    ckpt = tmp_path / "ada.ckpt"
    torch.save(adaface_checkpoint(adaface_sd), ckpt)
    out = export_checkpoint(ckpt, tmp_path / "ada.onnx")
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["facemargin"])
    assert meta["channel_order"] == "BGR" and meta["format"] == "adaface" and meta["backbone"] == "adaface_ir18"
    assert meta["output_description"] == "embedding, not L2-normalised" and "aligned to the 5-point" in meta["input_description"]
    exported = load_embedder(out)
    assert exported.spec.channel_order == "BGR"
    unit, norm = pl.adaface_forward(adaface_sd, pl.normalise(images, bgr=True), IR18)
    close(raw_embedding(exported, images), unit * norm)
