"""Decoded uint8 RGB images -> the network's input: ``uint8 [3, H, W]`` tensors, normalised on the device.

The tensor conversion keeps the image uint8 until the very last step (flip and the HWC->CHW
permute are done on uint8; one fused conversion to float32 at the end). torch is imported only
inside the functions that make tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["CHANNEL_ORDER", "MEAN", "STD", "normalization_metadata", "normalize_uint8", "to_uint8_chw", "to_tensor"]

#: Channel order of every decoded image and every tensor this package feeds a model.
CHANNEL_ORDER = "RGB"
#: Normalisation ``(x / 255 - MEAN) / STD`` (same scalar for all channels).
MEAN = 0.5
STD = 0.5


def normalization_metadata() -> dict[str, object]:
    """What a checkpoint / exported model must record to reproduce the input pipeline."""
    return {"channel_order": CHANNEL_ORDER, "mean": [MEAN] * 3, "std": [STD] * 3, "scale": 255.0}


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` tensor (any shape) -> float32 ``(x / 255 - MEAN) / STD``."""
    import torch

    # (x/255 - 0.5)/0.5 == x/127.5 - 1; 127.5 is exact in float32, so 0 -> -1 and 255 -> 1 exactly
    return images.to(torch.float32).div_(255.0 * STD).sub_(MEAN / STD)


def to_uint8_chw(img: np.ndarray, flip: bool = False) -> torch.Tensor:
    """``uint8 [H, W, 3]`` RGB -> ``uint8 [3, H, W]`` tensor (mirrored when ``flip``); not normalised.

    Shipping uint8 batches and calling :func:`normalize_uint8` on the device moves 4x fewer bytes
    through DataLoader workers and the host-to-device copy.
    """
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] image, got {img.dtype} {img.shape}")
    import torch

    if flip:
        img = img[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def to_tensor(img: np.ndarray, flip: bool = False) -> torch.Tensor:
    """``uint8 [H, W, 3]`` RGB -> normalised ``float32 [3, H, W]``; ``flip`` mirrors horizontally.

    Flip and the layout change are done on uint8; the float conversion is the last step.
    """
    return normalize_uint8(to_uint8_chw(img, flip))
