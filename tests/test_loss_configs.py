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
