"""Every Hydra config group composes; bad names fail listing the valid choices."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from facemargin.margins import Margin
from facemargin.train import config_dir

CONF = config_dir()
GROUPS = ["backbone", "loss", "head", "data", "optimizer", "scheduler", "trainer", "logger", "callbacks", "experiment"]
#: groups whose options are single `_target_` nodes that instantiate without a data set
TARGET_GROUPS = ["backbone", "loss", "optimizer", "scheduler"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_config_dir_is_the_repository_conf():
    assert (CONF / "config.yaml").is_file()
    assert Path(CONF).name == "conf"


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(group):
    names = options(group)
    assert names, f"config group {group!r} is empty"
    for name in names:
        cfg = compose_with(f"{group}={name}")
        OmegaConf.resolve(cfg.hydra)  # interpolations of the hydra node resolve too
        assert cfg.get(group) is not None or group == "experiment"


def test_defaults_are_the_cpu_demo():
    cfg = compose_with()
    assert cfg.loss.name == "expface" and cfg.loss.m == 0.7 and cfg.loss.s == 32.0  # the demo set's scale
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.data.demo is True
    assert cfg.head._target_ == "facemargin.heads.MarginHead"
    assert cfg.trainer.max_epochs == 6 and cfg.scheduler.warmup_epochs == 1


def test_eval_sets_are_chosen_without_a_plus():
    """`eval` is in the defaults list (empty), so `eval=[...]` selects verification sets in training."""
    assert not compose_with().get("eval")
    cfg = compose_with("eval=[lfw,cfp_fp]", "eval_root=/sets")
    assert list(cfg.eval) == ["lfw", "cfp_fp"]
    assert cfg.eval.lfw._target_ == "facemargin.evaluation.BinPairsEvaluator"
    assert cfg.eval.cfp_fp.path == "/sets/cfp_fp.bin"


def test_demo_settings_do_not_leak_into_a_chosen_trainer():
    """Choosing a trainer or an experiment gets its own schedule, not the CPU demo's."""
    assert compose_with("data=ms1mv3", "trainer=gpu").trainer.max_epochs == 20
    cfg = compose_with("experiment=ms1mv3_r100")
    assert cfg.trainer.max_epochs == 20 and cfg.scheduler.warmup_epochs == 0


@pytest.mark.parametrize("loss", ["softmax", "sphereface", "cosface", "arcface", "combined", "expface"])
def test_loss_configs_instantiate_to_margins_with_paper_defaults(loss):
    cfg = compose_with(f"loss={loss}", "data=recordio", "data.root=/sets/x")  # a real set: the papers' s
    margin = instantiate(cfg.loss)
    assert isinstance(margin, Margin) and margin.name == loss
    assert margin.params == Margin(loss).params and margin.s == Margin(loss).s


def test_margin_sweep_override_reaches_the_margin():
    cfg = compose_with("loss=expface", "loss.m=0.5")
    assert instantiate(cfg.loss).params == {"m": 0.5}


@pytest.mark.parametrize("group", ["loss", "backbone"])
def test_unknown_group_option_lists_the_valid_ones(group):
    with pytest.raises(MissingConfigException) as err:
        compose_with(f"{group}=definitely_not_there")
    message = str(err.value)
    for name in options(group)[:3]:
        assert name in message


def test_unknown_margin_name_in_a_config_lists_valid_margins():
    cfg = compose_with("loss.name=arcfase")
    with pytest.raises(Exception, match="valid margins: softmax, sphereface, cosface, arcface, combined, expface"):
        instantiate(cfg.loss)


def test_experiments_set_the_papers_settings():
    cfg = compose_with("experiment=ms1mv3_r100")
    assert cfg.backbone.name == "iresnet100" and cfg.optimizer.lr == 0.1 and cfg.trainer.max_epochs == 20
    cfg = compose_with("experiment=glint360k_r100")
    assert cfg.head._target_ == "facemargin.heads.PartialFCHead" and cfg.backbone.name == "iresnet100"


@pytest.mark.parametrize("group", TARGET_GROUPS)
def test_every_part_is_a_target_node(group):
    """backbone / loss / optimizer / scheduler options are `_target_` nodes (optimizer and scheduler partial)."""
    for name in options(group):
        node = compose_with(f"{group}={name}")[group]
        assert "_target_" in node, f"{group}={name}"
        if group in ("optimizer", "scheduler"):
            assert node._partial_ is True, f"{group}={name}"


def test_the_module_is_built_from_the_config_with_a_head_of_any_class():
    """head._target_ picks the head class; the module builds it with embedding_size and num_classes."""
    from facemargin.heads import MarginHead, PartialFCHead
    from facemargin.train import build_model

    cfg = compose_with("backbone=demo", "loss=cosface")
    model = build_model(cfg, num_classes=7)
    assert type(model.head) is MarginHead and model.head.weight.shape == (7, 512)
    assert model.head.margin.name == "cosface" and model.config["head"]["margin"]["m"] == 0.35
    cfg = compose_with("head=partial_fc", "head.sample_rate=0.5")
    model = build_model(cfg, num_classes=9)
    assert type(model.head) is PartialFCHead and model.head.sample_rate == 0.5
    cfg = compose_with("head._target_=torch.nn.Bilinear", "~head.margin", "~head.subcenters", "~head.objective",
                       "+head.in1_features=3", "+head.in2_features=3", "+head.out_features=2")
    with pytest.raises(TypeError, match="embedding_size"):  # a foreign class gets the documented keywords
        build_model(cfg, num_classes=5)
