"""Learning-rate schedules against hand-computed factors; optimizer choices."""

from __future__ import annotations

import math

import pytest
import torch

from facemargin.optim import build_scheduler, lr_factor


def test_poly_and_cosine_by_hand():
    # warm-up 10 of 110 steps: step 4 -> 5/10; then (1 - p)^2 with p = (step - 10) / 100
    assert lr_factor(4, 110, 10, "poly") == pytest.approx(0.5)
    assert lr_factor(10, 110, 10, "poly") == pytest.approx(1.0)
    assert lr_factor(60, 110, 10, "poly") == pytest.approx(0.25)
    assert lr_factor(110, 110, 10, "poly") == pytest.approx(0.0)
    assert lr_factor(60, 110, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(35, 110, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_factor(110, 110, 10, "cosine", min_factor=0.1) == pytest.approx(0.1)


def test_scheduler_steps_per_optimizer_step_and_resumes():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=4)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    state = sched.state_dict()
    opt2 = torch.optim.SGD([p], lr=0.1)
    sched2 = build_scheduler(opt2, total_steps=20, warmup_steps=4)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_warmup_in_epochs_and_bad_names():
    p = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(sgd, total_steps=30, warmup_epochs=0.5, steps_per_epoch=10)  # 5 warm-up steps
    lrs = []
    for _ in range(7):
        lrs.append(sgd.param_groups[0]["lr"])
        sgd.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, (1 - 1 / 25) ** 2])  # decay from step 5
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_scheduler(sgd, 10, warmup_epochs=1)
    with pytest.raises(ValueError, match="valid: poly, cosine, constant"):
        build_scheduler(sgd, 10, name="step")
