"""Every ``conf/loss`` YAML composes, cites its paper and instantiates to its margin with the
paper's defaults; ``loss.m=...`` and ``loss.dynamic=...`` overrides reach the margin."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from facemargin.margins import AdaFace, BaseMargin, CurricularFace, MagFace, Margin, SphereFaceR, available_margins
from facemargin.train import config_dir

CONF = config_dir()


def loss_node(*overrides: str):
    """The loss node for a real set (the demo set changes s: conf/data_tuning/demo.yaml)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["data=recordio", "data.root=/sets/x", *overrides]).loss


@pytest.fixture(scope="module")
def margins() -> dict[str, BaseMargin]:
    """Every loss YAML, composed and instantiated once."""
    return {name: instantiate(loss_node(f"loss={name}")) for name in available_margins()}


def test_one_yaml_per_margin():
    assert sorted(p.stem for p in (CONF / "loss").glob("*.yaml")) == sorted(available_margins())


@pytest.mark.parametrize("name", available_margins())
def test_yaml_cites_a_paper_and_builds_the_margin(name, margins):
    text = (CONF / "loss" / f"{name}.yaml").read_text()
    assert any(year in text.split("_target_")[0] for year in ("2017", "2018", "2019", "2020", "2021", "2022", "2025"))
    assert isinstance(margins[name], BaseMargin) and margins[name].name == name
    assert getattr(margins[name], "dynamic", None) is None


@pytest.mark.parametrize(
    ("name", "cls", "expected"),
    [
        ("curricularface", CurricularFace, {"s": 64.0, "m": 0.5, "momentum": 0.01}),
        ("adaface", AdaFace, {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01}),
        ("magface", MagFace, {"s": 64.0, "l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8, "lambda_g": 35.0, "easy_margin": True}),
        ("sphereface_r", SphereFaceR, {"s": 60.0, "m": 1.4}),
    ],
)
def test_adaptive_paper_defaults(name, cls, expected, margins):
    margin = margins[name]
    assert type(margin) is cls
    assert {"s": margin.s, **margin.params} == expected
    assert {"s": cls().s, **cls().params} == expected  # the class defaults agree with the YAML


@pytest.mark.parametrize("name", ["expface", "cosface", "arcface", "sphereface"])
@pytest.mark.parametrize("mode", ["balanced", "plain"])
def test_dynamic_override(name, mode):
    margin = instantiate(loss_node(f"loss={name}", f"loss.dynamic={mode}"))
    assert isinstance(margin, Margin) and margin.dynamic == mode


@pytest.mark.parametrize(("name", "m"), [("expface", 0.3), ("curricularface", 0.3), ("sphereface_r", 1.2)])
def test_margin_sweep_override(name, m):
    assert instantiate(loss_node(f"loss={name}", f"loss.m={m}")).params["m"] == m


def test_out_of_range_override_names_the_parameter():
    with pytest.raises(Exception, match=r"'expface': m must lie in \(0, 1\]"):
        instantiate(loss_node("loss=expface", "loss.m=1.3"))


def test_expface_ms1mv3_r50_experiment_composes_and_instantiates():
    """The ExpFace authors' recipe: iresnet50, SGD 0.02/0.9/5e-4, batch 256, 20 epochs, cosine
    per step without warm-up, clip 5, Partial FC sample rate 0.3, expface m = 0.7, s = 64. Every
    part is instantiated as the train entry point does, but the iresnet50 itself (a 43 M-parameter
    build, covered by tests/test_backbones.py)."""
    import torch
    from hydra.utils import instantiate

    from facemargin.heads import PartialFCHead

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=expface_ms1mv3_r50", "output_dir=unused"])
    assert cfg.backbone._target_ == "facemargin.backbones.build_embedder" and cfg.backbone.name == "iresnet50"
    assert cfg.data.batch_size == 256 and cfg.data.root.endswith("ms1m-retinaface-t1")
    assert (cfg.trainer.max_epochs, cfg.trainer.gradient_clip_val, cfg.trainer.devices) == (20, 5.0, 1)
    head = instantiate(cfg.head, _partial_=True)(embedding_size=512, num_classes=1000)
    assert isinstance(head, PartialFCHead) and head.sample_rate == 0.3 and head.num_sample == 300
    assert head.margin.name == "expface" and head.margin.params == {"m": 0.7} and head.margin.s == 64.0
    assert list(head.grad_clip_parameters()) == []  # clipping reaches the backbone only
    opt = instantiate(cfg.optimizer)(head.parameters())
    assert type(opt) is torch.optim.SGD
    assert {k: opt.defaults[k] for k in ("lr", "momentum", "weight_decay")} == {"lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4}
    sched = instantiate(cfg.scheduler)(opt, total_steps=100, steps_per_epoch=5)
    assert sched.get_last_lr() == [0.02]  # no warm-up: the full lr at step 0
    for _ in range(50):
        opt.step(), sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.01)  # cosine, per step: half-way, half the lr
    trainer = instantiate(cfg.trainer, accelerator="cpu", precision="32-true", logger=False)
    assert trainer.max_epochs == 20 and trainer.gradient_clip_val == 5.0 and trainer.gradient_clip_algorithm == "norm"
