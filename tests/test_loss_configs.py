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
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides)).loss


def test_one_yaml_per_margin():
    assert sorted(p.stem for p in (CONF / "loss").glob("*.yaml")) == sorted(available_margins())


@pytest.mark.parametrize("name", available_margins())
def test_yaml_cites_a_paper_and_builds_the_margin(name):
    text = (CONF / "loss" / f"{name}.yaml").read_text()
    assert any(year in text.split("_target_")[0] for year in ("2017", "2018", "2019", "2020", "2021", "2022", "2025"))
    margin = instantiate(loss_node(f"loss={name}"))
    assert isinstance(margin, BaseMargin) and margin.name == name


@pytest.mark.parametrize(
    ("name", "cls", "expected"),
    [
        ("curricularface", CurricularFace, {"s": 64.0, "m": 0.5, "momentum": 0.01}),
        ("adaface", AdaFace, {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01}),
        ("magface", MagFace, {"s": 64.0, "l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8, "lambda_g": 35.0, "easy_margin": True}),
        ("sphereface_r", SphereFaceR, {"s": 60.0, "m": 1.4}),
    ],
)
def test_adaptive_paper_defaults(name, cls, expected):
    margin = instantiate(loss_node(f"loss={name}"))
    assert type(margin) is cls
    assert {"s": margin.s, **margin.params} == expected
    assert {"s": cls().s, **cls().params} == expected  # the class defaults agree with the YAML


@pytest.mark.parametrize("name", ["expface", "cosface", "arcface", "sphereface"])
@pytest.mark.parametrize("mode", ["balanced", "plain"])
def test_dynamic_override(name, mode):
    margin = instantiate(loss_node(f"loss={name}", f"loss.dynamic={mode}"))
    assert isinstance(margin, Margin) and margin.dynamic == mode
    assert instantiate(loss_node(f"loss={name}")).dynamic is None


@pytest.mark.parametrize("name", ["expface", "cosface", "arcface", "sphereface", "curricularface", "adaface", "sphereface_r"])
def test_margin_sweep_override(name):
    assert instantiate(loss_node(f"loss={name}", "loss.m=1.2" if "sphere" in name else "loss.m=0.3")).params["m"] in (0.3, 1.2)


def test_out_of_range_override_names_the_parameter():
    with pytest.raises(Exception, match=r"'expface': m must lie in \(0, 1\]"):
        instantiate(loss_node("loss=expface", "loss.m=1.3"))


def test_expface_ms1mv3_r50_experiment_composes_and_instantiates():
    """The ExpFace authors' recipe: iresnet50, SGD 0.02/0.9/5e-4, batch 256, 20 epochs, cosine
    per step without warm-up, clip 5, Partial FC sample rate 0.3, expface m = 0.7, s = 64."""
    import torch
    from hydra.utils import instantiate

    from facemargin.heads import PartialFCHead
    from facemargin.optim import lr_factor
    from facemargin.train import build_model

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=expface_ms1mv3_r50", "output_dir=unused"])
    assert cfg.backbone.name == "iresnet50" and cfg.data.batch_size == 256
    assert (cfg.trainer.max_epochs, cfg.trainer.gradient_clip_val, cfg.trainer.devices) == (20, 5.0, 1)
    model = build_model(cfg, num_classes=1000)
    head = model.head
    assert isinstance(head, PartialFCHead) and head.sample_rate == 0.3 and head.num_sample == 300
    assert head.margin.name == "expface" and head.margin.params == {"m": 0.7} and head.margin.s == 64.0
    assert list(head.grad_clip_parameters()) == []  # clipping reaches the backbone only
    opt = model.optimizer_factory(model.parameters())
    assert type(opt) is torch.optim.SGD
    assert {k: opt.defaults[k] for k in ("lr", "momentum", "weight_decay")} == {"lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4}
    sched = model.scheduler_factory(opt, total_steps=100, steps_per_epoch=5)
    assert sched.get_last_lr() == [0.02]  # no warm-up: full lr at step 0
    for _ in range(50):
        opt.step(), sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.01)  # cosine: half-way, half the lr
    assert lr_factor(100, 100, name="cosine") == 0.0
    assert instantiate(cfg.loss).params == {"m": 0.7}
