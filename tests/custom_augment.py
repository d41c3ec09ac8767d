"""A user's own augmentation, written without facemargin and drawing from the global torch RNG like most
user code: ``data.augment={_target_:custom_augment.BrightnessJitter}`` must resume exactly."""

from __future__ import annotations

import torch


class BrightnessJitter:
    """Adds one random brightness offset in ``[-max_delta, max_delta]`` to each uint8 image."""

    def __init__(self, max_delta: int = 40) -> None:
        self.max_delta = max_delta

    def __call__(self, images: torch.Tensor, sample_index: torch.Tensor, epoch: int) -> torch.Tensor:
        delta = torch.randint(-self.max_delta, self.max_delta + 1, (images.shape[0], 1, 1, 1), device=images.device)
        return (images.to(torch.int16) + delta).clamp(0, 255).to(torch.uint8)
