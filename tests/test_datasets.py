"""VerificationDataset on real .bin files through real DataLoaders (workers 0 and 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import simplejpeg
import torch
from conftest import FACE as SIZE
from conftest import face_image
from torch.utils.data import DataLoader

from facemargin.data.datasets import VerificationDataset
from facemargin.data.decode import CorruptImageError
from facemargin.data.verification import write_bin


def label_of(image: torch.Tensor) -> tuple[int, bool]:
    """Recover ``(label % 20, flipped)`` from a normalised tensor made from :func:`face_image`."""
    x = (image + 1) * 127.5
    left, right = float(x[:, :, 1:6].mean()), float(x[:, :, -6:-1].mean())
    return round((max(left, right) - 20) / 10), right > left


# --------------------------------------------------------------------------- verification
def test_verification_dataset(tmp_path: Path) -> None:
    imgs = [simplejpeg.encode_jpeg(face_image(i), quality=95) for i in range(8)]
    path = write_bin(tmp_path / "lfw.bin", imgs, [True, False, True, False])
    ds = VerificationDataset(path)
    assert ds.name == "lfw" and len(ds) == 8
    assert ds.issame.dtype == bool and ds.issame.tolist() == [True, False, True, False]
    for workers in (0, 2):
        seen = []
        for images, idx in DataLoader(ds, batch_size=3, num_workers=workers):
            assert idx.dtype == torch.long and images.shape[1:] == (3, SIZE, SIZE)
            seen += [(int(i), label_of(im)[0]) for i, im in zip(idx, images)]
        assert seen == [(i, i) for i in range(8)]


def test_verification_dataset_corrupt_image_named(tmp_path: Path) -> None:
    imgs = [simplejpeg.encode_jpeg(face_image(i), quality=95) for i in range(2)]
    path = write_bin(tmp_path / "agedb_30.bin", [imgs[0], b"\xff\xd8\xffjunk"], [True])
    ds = VerificationDataset(path)
    with pytest.raises(CorruptImageError, match=r"agedb_30\.bin \(image 1\)"):
        ds[1]
