"""Optimizers and per-step learning-rate schedules (linear warm-up, then polynomial or cosine decay)."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_scheduler", "lr_factor"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "cosine", "constant")


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    name: str = "sgd",
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """SGD (insightface's defaults: lr 0.1, momentum 0.9, wd 5e-4) or AdamW."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def lr_factor(
    step: int, total_steps: int, warmup_steps: int = 0, name: str = "poly", power: float = 2.0, min_factor: float = 0.0
) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    Warm-up rises linearly from ``1/warmup_steps`` to 1; then ``poly`` decays as
    ``(1 - progress)**power`` (insightface's PolyScheduler uses power 2) and ``cosine`` as
    ``0.5 * (1 + cos(pi * progress))``, both down to ``min_factor`` at ``total_steps``.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    if name == "poly":
        shape = (1.0 - progress) ** power
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_factor + (1.0 - min_factor) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    name: str = "poly",
    warmup_steps: int = 0,
    power: float = 2.0,
    min_factor: float = 0.0,
) -> LambdaLR:
    """A per-step ``LambdaLR`` following :func:`lr_factor` (its state_dict resumes exactly)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive; got {total_steps}")
    lr_factor(0, total_steps, warmup_steps, name, power, min_factor)  # validate the name early
    return LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, name, power, min_factor)
    )
