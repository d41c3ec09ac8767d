"""The training recipes (``conf/experiment``): each composes into the settings its comment describes
and cites the published IJB-C figure its recipe reached (or says there is none)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from facemargin.train import config_dir

EXPERIMENTS = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))
ZOO = "github.com/deepinsight/insightface/blob/master/recognition/arcface_torch/README.md"

#: name -> (backbone, data root folder, Partial FC sample rate, optimizer, lr, epochs, published IJB-C TAR@FAR=1e-4)
WEBFACE = {
    "webface4m_r50": ("iresnet50", "WebFace4M", 1.0, "SGD", 0.1, 20, None),
    "webface4m_r100": ("iresnet100", "WebFace4M", 1.0, "SGD", 0.1, 20, "97.19"),
    "webface12m_r100": ("iresnet100", "WebFace12M", 0.2, "SGD", 0.1, 20, "97.60"),
    "webface42m_r50": ("iresnet50", "WebFace42M", 0.3, "SGD", 0.4, 20, "97.48"),
    "webface42m_r100": ("iresnet100", "WebFace42M", 0.2, "SGD", 0.1, 20, "97.70"),
    "webface42m_r200": ("iresnet200", "WebFace42M", 0.3, "SGD", 0.4, 20, "97.97"),
    "webface42m_vit_t": ("face_vit_t", "WebFace42M", 0.3, "AdamW", 1e-3, 40, "97.31"),
    "webface42m_vit_s": ("face_vit_s", "WebFace42M", 0.3, "AdamW", 1e-3, 40, "97.73"),
    "webface42m_vit_b": ("face_vit_b", "WebFace42M", 0.3, "AdamW", 1e-3, 40, "97.90"),
    "webface42m_vit_l": ("face_vit_l", "WebFace42M", 0.3, "AdamW", 1e-3, 40, "98.00"),
}


def compose_experiment(name: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", "output_dir=unused"])


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_recipe_composes_and_cites_its_ijbc_figure(name: str) -> None:
    cfg = compose_experiment(name)
    assert cfg.backbone.name and cfg.data.root and cfg.loss.name
    text = (Path(config_dir()) / "experiment" / f"{name}.yaml").read_text()
    cited = re.findall(r"^# Published IJB-C TAR@FAR=1e-4: (\S+)", text, re.M)
    assert len(cited) == 1, name
    if cited[0] != "none":
        assert ZOO in text, name


@pytest.mark.parametrize("name", sorted(WEBFACE))
def test_webface_recipes_are_insightfaces(name: str) -> None:
    backbone, folder, rate, optimizer, lr, epochs, ijbc = WEBFACE[name]
    cfg = compose_experiment(name)
    assert cfg.backbone.name == backbone and cfg.data.root.endswith(f"/{folder}")
    assert (cfg.loss.name, cfg.loss.m, cfg.loss.s) == ("cosface", 0.4, 64.0)  # margin_list (1.0, 0.0, 0.4)
    assert cfg.head._target_ == "facemargin.heads.PartialFCHead" and cfg.head.sample_rate == rate
    assert cfg.optimizer._target_ == f"torch.optim.{optimizer}" and cfg.optimizer.lr == lr
    assert cfg.trainer.max_epochs == epochs and cfg.scheduler.name == "poly"
    text = (Path(config_dir()) / "experiment" / f"{name}.yaml").read_text()
    assert (f"TAR@FAR=1e-4: {ijbc} %" if ijbc else "TAR@FAR=1e-4: none") in text
    if backbone.startswith("face_vit"):  # insightface's WebFace42M ViTs: stochastic depth 0.05
        assert cfg.backbone.kwargs.drop_path_rate == 0.05
