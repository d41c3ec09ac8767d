"""Per-step learning-rate schedules: linear warm-up, then polynomial or cosine decay.

Optimizers are plain ``torch.optim`` classes in the configs (``conf/optimizer``, Hydra ``_partial_``);
the schedule is :func:`build_scheduler`, a ``_partial_`` that the LightningModule completes with the
run's ``total_steps`` and ``steps_per_epoch``.
"""

from __future__ import annotations

import math
import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["SCHEDULES", "build_scheduler", "lr_factor"]

SCHEDULES = ("poly", "cosine", "constant")


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
    warmup_epochs: float = 0.0,
    steps_per_epoch: int | None = None,
) -> LambdaLR:
    """A per-step ``LambdaLR`` following :func:`lr_factor` (its state_dict resumes exactly).

    ``warmup_epochs`` (with ``steps_per_epoch``) sets the warm-up in epochs instead of ``warmup_steps``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive; got {total_steps}")
    if warmup_epochs:
        if not steps_per_epoch:
            raise ValueError("warmup_epochs needs steps_per_epoch (the LightningModule passes it)")
        warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    lr_factor(0, total_steps, warmup_steps, name, power, min_factor)  # validate the name early
    return LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, name, power, min_factor)
    )
