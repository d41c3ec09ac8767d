"""``model.compile`` and ``model.channels_last``: the same losses as the plain module, step by step,
through the real Lightning Trainer (CPU). Tolerance: relative 1e-4 per step over 4 SGD steps
(NHWC convolutions and inductor's fused kernels sum in another order; float32 rounding only)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
import torch._dynamo
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from facemargin.heads import MarginHead
from facemargin.margins.base import ParameterError
from facemargin.module import FaceRecognitionModule

CONF = Path(__file__).resolve().parents[1] / "conf"
STEPS = 4


class TinyEmbedder(nn.Module):
    """Two convolutions and a linear layer: small enough for inductor to compile in seconds."""

    embedding_size = 16
    input_size = 16

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.PReLU(8),
            nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.PReLU(8),
            nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def train_losses(backbone: nn.Module, size: int, margin: str = "curricularface", **options) -> tuple[list[float], dict]:
    """Per-step training losses of ``STEPS`` SGD steps, and the final state dict."""
    torch.manual_seed(0)
    model = FaceRecognitionModule(
        backbone, MarginHead(backbone.embedding_size, 10, margin=margin),
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9), **options,
    )
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8 * STEPS, 3, size, size), dtype=torch.uint8, generator=g)
    data = TensorDataset(images, torch.randint(0, 10, (8 * STEPS,), generator=g))
    losses = Losses()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[losses], limit_val_batches=0,
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    assert len(losses.values) == STEPS
    return losses.values, model.state_dict()


def assert_same_run(a: tuple[list[float], dict], b: tuple[list[float], dict]) -> None:
    assert a[1].keys() == b[1].keys()  # checkpoints keep their keys
    assert b[0] == pytest.approx(a[0], rel=1e-4)
    assert a[0][0] != a[0][-1]  # the steps did train


def test_channels_last_gives_the_same_losses():
    torch.manual_seed(0)
    plain = train_losses(TinyEmbedder(), 16)
    torch.manual_seed(0)
    backbone = TinyEmbedder()
    nhwc = train_losses(backbone, 16, channels_last=True)
    assert backbone.body[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not TinyEmbedder().body[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_run(plain, nhwc)


@pytest.mark.slow
def test_compile_gives_the_same_losses():
    """Inductor on the CPU (a C++ compiler): the backbone and the head's loss, compiled."""
    torch.manual_seed(0)
    plain = train_losses(TinyEmbedder(), 16, margin="arcface")
    torch.manual_seed(0)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = train_losses(TinyEmbedder(), 16, margin="arcface", compile=True, channels_last=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # dynamo did compile
    assert_same_run(plain, compiled)


def test_options_are_flags_and_come_from_the_model_group():
    with pytest.raises(ParameterError, match="model: compile must be true or false"):
        FaceRecognitionModule(TinyEmbedder(), MarginHead(16, 3), compile="yes")
    from facemargin.train import build_model

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=["model.channels_last=true", "backbone=demo"])
    assert cfg.model == {"compile": False, "channels_last": True, "compile_options": None}
    model = build_model(cfg, num_classes=5)
    assert model.channels_last and not model.use_compile
