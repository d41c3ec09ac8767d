"""Verification images of an insightface ``.bin`` (training data: :mod:`facemargin.data.loader`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from .decode import CorruptImageError, decode_image, normalize_uint8, to_uint8_chw

__all__ = ["VerificationDataset"]

Output = Literal["float", "uint8"]


def _check_output(value: str) -> str:
    if value not in ("float", "uint8"):
        raise ValueError(f"output must be 'float' or 'uint8', got {value!r}")
    return value


def _convert(img: np.ndarray, flip: bool, output: str) -> torch.Tensor:
    chw = to_uint8_chw(img, flip)
    return chw if output == "uint8" else normalize_uint8(chw)


# --------------------------------------------------------------------------- verification
class VerificationDataset(Dataset):
    """Images of an insightface verification ``.bin``: ``(image float[3,H,W], index int64)``.

    Images stay encoded in memory and are decoded on access (``output="uint8"``: unnormalised
    uint8, normalised later on the device). Attributes: ``issame``
    (``bool [N]``, pairs are images ``2i, 2i+1``), ``name`` (file stem), ``path``.
    """

    def __init__(self, bin_path: str | os.PathLike, output: Output = "float") -> None:
        from .verification import load_bin

        self.output = _check_output(output)
        self.path = Path(bin_path)
        self.name = self.path.stem
        images, issame = load_bin(self.path)
        self.images: list[bytes] = list(images)
        self.issame = np.asarray(issame, dtype=bool)
        if len(self.images) != 2 * self.issame.size:
            raise ValueError(
                f"{self.path}: {len(self.images)} images for {self.issame.size} pairs (expected {2 * self.issame.size})"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        try:
            img = decode_image(self.images[index])
        except CorruptImageError as exc:
            raise CorruptImageError(f"{self.path} (image {index}): corrupt image: {exc}") from exc
        return _convert(img, False, self.output), torch.tensor(index, dtype=torch.long)
