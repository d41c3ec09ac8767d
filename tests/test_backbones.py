"""Face backbones in timm's registry, build_embedder, EmbeddingNeck and conf/backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import facemargin.backbones as fb
from facemargin.backbones import EmbeddingNeck, IResNet, MobileFaceNet, build_embedder

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "backbone"
DEPTHS = ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200"]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registered_in_timm() -> None:
    assert set(timm.list_models("iresnet*")) == {*DEPTHS, "iresnet_demo"}
    assert set(timm.list_models("mobilefacenet*")) == {"mobilefacenet", "mobilefacenet_large"}
    assert not timm.list_pretrained("iresnet*")  # no weights are advertised
    peers = {f"{who}_ir{d}" for who in ("adaface", "cvlface") for d in (18, 34, 50, 101)} | {f"face_vit_{s}" for s in "tsblh"}
    assert set(fb.FACE_BACKBONES) == {*DEPTHS, "iresnet_demo", "mobilefacenet", "mobilefacenet_large", *peers}
    assert set(timm.list_models("adaface_ir*")) | set(timm.list_models("face_vit_*")) <= peers


@pytest.mark.parametrize("name", DEPTHS)
def test_iresnet_depths_embed_112(name: str) -> None:
    model = timm.create_model(name).eval()
    assert isinstance(model, IResNet)
    assert model.num_features == 512 and model.num_classes == 0
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 112, 112)
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    assert not cfg.get("url")
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512)
    assert torch.isfinite(out).all()


def test_iresnet_stage_layout() -> None:
    depth_blocks = {"iresnet18": 8, "iresnet34": 16, "iresnet50": 24, "iresnet100": 49, "iresnet200": 98}
    for name, blocks in depth_blocks.items():
        model = timm.create_model(name)
        stages = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
        assert sum(stages) == blocks
        assert [getattr(model, f"layer{i}")[0].conv2.out_channels for i in range(1, 5)] == [64, 128, 256, 512]
        assert model.fc.in_features == 512 * 7 * 7 and model.fc.out_features == 512


@pytest.mark.parametrize(
    "name, published, exact",
    [("iresnet50", 43.6e6, 43_590_848), ("iresnet100", 65.2e6, 65_156_160)],
)
def test_iresnet_param_counts_match_insightface(name: str, published: float, exact: int) -> None:
    count = n_params(timm.create_model(name))
    assert abs(count - published) / published < 0.01
    assert count == exact


def test_timm_classifier_conventions() -> None:
    model = timm.create_model("iresnet_demo", num_classes=10).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 512)
        assert model.forward_features(x).shape == (2, 128, 7, 7)
        assert isinstance(model.get_classifier(), nn.Linear)
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), nn.Identity)
        assert model(x).shape == (2, 512)
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("iresnet18", pretrained=True)


def test_iresnet_embedding_bn_scale_frozen_like_insightface() -> None:
    model = timm.create_model("iresnet18")
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(512))


def test_iresnet_features_only() -> None:
    model = timm.create_model("iresnet18", features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 32, 32))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]


def test_grad_checkpointing_same_output() -> None:
    model = timm.create_model("iresnet_demo", img_size=32).eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_mobilefacenet() -> None:
    model = timm.create_model("mobilefacenet").eval()
    assert isinstance(model, MobileFaceNet) and model.num_features == 512
    assert n_params(model) == 2_059_520
    with torch.no_grad():
        assert model(torch.randn(2, 3, 112, 112)).shape == (2, 512)
        assert model.forward_features(torch.randn(2, 3, 112, 112)).shape == (2, 512, 7, 7)
    small = timm.create_model("mobilefacenet", embedding_size=128, num_classes=5).eval()
    with torch.no_grad():
        assert small.forward_head(small.forward_features(torch.randn(2, 3, 112, 112)), pre_logits=True).shape == (
            2,
            128,
        )
        assert small(torch.randn(2, 3, 112, 112)).shape == (2, 5)


def test_embedding_neck() -> None:
    neck = EmbeddingNeck(64, embedding_size=32, dropout=0.2)
    assert [type(m) for m in neck.children()] == [nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.BatchNorm1d]
    assert neck.dropout.p == 0.2
    assert neck(torch.randn(4, 64)).shape == (4, 32)


@pytest.mark.parametrize("name, in_features", [("resnet18", 512), ("vit_tiny_patch16_224", 192)])
def test_build_embedder_generic_timm_at_112(name: str, in_features: int) -> None:
    model = build_embedder(name, embedding_size=512, input_size=112).eval()
    assert isinstance(model, fb.TimmEmbedder)
    assert model.embedding_size == 512 and model.input_size == 112
    assert model.neck.in_features == in_features
    with torch.no_grad():
        assert model(torch.randn(2, 3, 112, 112)).shape == (2, 512)


def test_build_embedder_face_backbone_passthrough() -> None:
    model = build_embedder("iresnet_demo", embedding_size=256, dropout=0.1).eval()
    assert isinstance(model, IResNet)  # no extra neck
    assert model.embedding_size == 256 and model.input_size == 112
    assert model.dropout.p == 0.1
    with torch.no_grad():
        assert model(torch.randn(2, 3, 112, 112)).shape == (2, 256)


def test_build_embedder_hydra_style_kwargs() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": "resnet18", "embedding_size": 128, "dropout": 0.0, "kwargs": {"drop_rate": 0.3}})
    model = build_embedder(**cfg)
    assert model.backbone.drop_rate == 0.3
    assert model.embedding_size == 128


def test_build_embedder_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError) as err:
        build_embedder("not_a_backbone")
    msg = str(err.value)
    for name in [*DEPTHS, "mobilefacenet"]:
        assert name in msg
    assert "timm.list_models()" in msg


def test_backbone_configs_are_flat_and_build() -> None:
    from omegaconf import OmegaConf

    files = sorted(CONF_DIR.glob("*.yaml"))
    expected = {f"iresnet{d}" for d in (18, 34, 50, 100, 200)} | {
        "mobilefacenet",
        "mobilefacenet_large",
        "resnet18",
        "convnext_atto",
        "vit_tiny",
        "demo",
        *(f"adaface_ir{d}" for d in (18, 34, 50, 101)),
        *(f"cvlface_ir{d}" for d in (18, 34, 50, 101)),
        *(f"face_vit_{s}" for s in "tsblh"),
    }
    assert {f.stem for f in files} == expected
    for f in files:
        cfg = OmegaConf.load(f)
        assert set(cfg.keys()) == {"_target_", "name", "embedding_size", "dropout", "kwargs", "pretrained_file"}, f.name
        assert cfg.pretrained_file is None, f.name
        assert f.stem == "demo" or f.stem == cfg.name or f.stem == "vit_tiny", f.name  # backbone=NAME names the model
        assert cfg._target_ == "facemargin.backbones.build_embedder", f.name
        assert cfg.embedding_size == 512
        assert timm.is_model(cfg.name), f.name
    from hydra.utils import instantiate

    demo = instantiate(OmegaConf.load(CONF_DIR / "demo.yaml")).eval()
    with torch.no_grad():
        assert demo(torch.randn(2, 3, 112, 112)).shape == (2, 512)


@pytest.mark.parametrize("depth, iresnet", [(18, "iresnet18"), (50, "iresnet50"), (101, "iresnet100")])
def test_adaface_ir_is_iresnet_less_two_pieces(depth: int, iresnet: str) -> None:
    """AdaFace's IR-N has insightface's iresnet blocks, but the stage-1 entry unit (64 -> 64, stride 2)
    takes a parameter-free max-pool shortcut (insightface: 1x1 conv 64x64 + BN 2x64) and the
    embedding BatchNorm1d has no affine parameters (insightface: 2 x 512)."""
    with torch.device("meta"):
        ada = timm.create_model(f"adaface_ir{depth}", num_classes=0)
        ins = timm.create_model(iresnet, num_classes=0)
    assert n_params(ins) - n_params(ada) == 64 * 64 + 2 * 64 + 2 * 512
    assert isinstance(ada.body[0].shortcut_layer, nn.MaxPool2d) and ada.input_spec.channel_order == "BGR"
    assert timm.create_model(f"cvlface_ir{depth}", num_classes=0).input_spec.channel_order == "RGB" if depth == 18 else True
