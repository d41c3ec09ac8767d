"""A training batch's last CPU-free step: HWC -> CHW and the horizontal flips, on the batch's device.

DataLoader workers decode every JPEG straight into its row of a ``uint8 [B, H, W, 3]`` batch
(libjpeg-turbo's own layout: no copy) and ship it unflipped, with the flip decisions as
``bool [B]`` (``hash_uniform(seed, epoch, sample index) < flip_p`` of the final indices, a
substituted damaged sample's included): :class:`HWCImages`. :func:`to_training_layout` then makes
the ``uint8 [B, 3, H, W]`` RGB batch every later step takes (augmentation, normalisation):

* on an accelerator, one ``torch.where`` over the permuted batch (the transfer hook
  ``FaceRecordDataModule.on_after_batch_transfer`` runs it after the host-to-device copy);
* on the CPU, numpy's strided copy per image (about 3x cheaper there than torch's permute +
  flip + where), the same pixels.

:func:`to_training_batch` does it for a whole ``(images, labels, sample_index)`` batch and lets any
other batch through; ``data.decode=gpu`` flips its decoded batch with the same :func:`flip_rows`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = ["HWCImages", "flip_rows", "to_training_layout", "to_training_batch"]


class HWCImages(NamedTuple):
    """A batch's images as the workers ship them: ``pixels`` uint8 ``[B, H, W, 3]`` RGB unflipped, ``flip`` bool ``[B]``."""

    pixels: torch.Tensor
    flip: torch.Tensor


def flip_rows(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """``images [B, 3, H, W]`` with the rows where ``flip [B]`` is true mirrored horizontally (on their device)."""
    mask = flip.to(images.device, non_blocking=True).view(-1, 1, 1, 1)
    return torch.where(mask, images.flip(-1), images)


def to_training_layout(images: HWCImages) -> torch.Tensor:
    """``HWCImages`` -> contiguous ``uint8 [B, 3, H, W]`` RGB, flipped where ``images.flip`` says, on the pixels' device."""
    pixels, flip = images
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[3] != 3 or flip.shape != pixels.shape[:1]:
        raise ValueError(f"to_training_layout: expected uint8 [B, H, W, 3] and flip [B], got {pixels.dtype} "
                         f"{tuple(pixels.shape)} and {tuple(flip.shape)}")
    b, h, w, _ = pixels.shape
    if pixels.device.type == "cpu":
        out = np.empty((b, 3, h, w), dtype=np.uint8)
        src, mirror = pixels.numpy(), flip.cpu().numpy()
        for j in range(b):
            np.copyto(out[j], (src[j, :, ::-1] if mirror[j] else src[j]).transpose(2, 0, 1))
        return torch.from_numpy(out)
    x = pixels.permute(0, 3, 1, 2)
    out_t = torch.empty((b, 3, h, w), dtype=torch.uint8, device=pixels.device)
    mask = flip.to(pixels.device, non_blocking=True).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(-1), x, out=out_t)


def to_training_batch(batch: Any) -> Any:
    """``(HWCImages, labels, sample_index)`` -> ``(uint8 [B, 3, H, W], labels, sample_index)``; other batches as given."""
    if isinstance(batch, (list, tuple)) and len(batch) == 3 and isinstance(batch[0], HWCImages):
        return (to_training_layout(batch[0]), batch[1], batch[2])
    return batch
