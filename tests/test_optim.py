"""Learning-rate schedules against hand-computed factors; optimizer choices."""

from __future__ import annotations

import math

import pytest
import torch

from facemargin.optim import build_optimizer, build_scheduler, lr_factor


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
    opt = build_optimizer([p], "sgd", lr=0.1)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=4)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    state = sched.state_dict()
    opt2 = build_optimizer([p], "sgd", lr=0.1)
    sched2 = build_scheduler(opt2, total_steps=20, warmup_steps=4)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_optimizer_defaults_and_bad_names():
    p = torch.nn.Parameter(torch.zeros(1))
    sgd = build_optimizer([p])
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 5e-4 and sgd.defaults["lr"] == 0.1
    assert isinstance(build_optimizer([p], "adamw", lr=1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match="valid: sgd, adamw"):
        build_optimizer([p], "adam")
    with pytest.raises(ValueError, match="valid: poly, cosine, constant"):
        build_scheduler(sgd, 10, name="step")
