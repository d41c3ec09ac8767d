"""FolderSource: identity folders and list files, the same samples as a packed RecordIO set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import simplejpeg

from facemargin.data.sources.base import SourceError
from facemargin.data.sources.folder import FolderSource
from facemargin.data.sources.recordio import FaceRecordSet
from facemargin.data.tools.pack import pack_images


def _jpeg(seed: int, size: int = 16) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return simplejpeg.encode_jpeg(img, quality=90, colorspace="RGB")


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    for c, name in enumerate(["zoe", "adam", "mia"]):
        for j in range(c + 2):
            path = tmp_path / "imgs" / name / f"{j}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_jpeg(10 * c + j))
    return tmp_path / "imgs"


def test_folder_matches_the_packed_set(tree: Path, tmp_path: Path) -> None:
    folder = FolderSource(tree)
    pack_images(tree, tmp_path / "rec", progress=False)
    rec = FaceRecordSet(tmp_path / "rec")
    assert len(folder) == len(rec) == 9 and folder.num_classes == rec.num_classes == 3
    assert folder.image_size == rec.image_size == (16, 16)
    assert folder.labels().tolist() == rec.labels().tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]  # adam, mia, zoe
    for i in range(9):
        assert folder.parse(i, folder.read_raw(i)) == rec.parse(i, rec.read_raw(i))
    assert folder.where(0) == str(tree / "adam" / "0.jpg")


def test_list_file(tree: Path, tmp_path: Path) -> None:
    lst = tmp_path / "train.txt"
    lst.write_text(f"# path label\nimgs/zoe/1.jpg 4\n\n{tree / 'adam' / '0.jpg'}\t0\nimgs/mia/2.jpg 2\n")
    src = FolderSource(lst, num_classes=5)  # more classes than images: only when said
    assert len(src) == 3 and src.num_classes == 5 and src.labels().tolist() == [4, 0, 2]
    assert src.parse(0, src.read_raw(0)) == (4, (tree / "zoe" / "1.jpg").read_bytes())
    lst.write_text(f"# path label\nimgs/zoe/1.jpg 1\n\n{tree / 'adam' / '0.jpg'}\t0\nimgs/mia/2.jpg 2\n")
    assert FolderSource(lst).num_classes == 3
    lst.write_text("imgs/zoe/1.jpg 0\nimgs/mia/2.jpg two\n")
    with pytest.raises(SourceError, match=r"train\.txt: line 2: label 'two' is not a non-negative integer"):
        FolderSource(lst)
    lst.write_text("imgs/zoe/1.jpg 4\n")
    with pytest.raises(SourceError, match=r"train\.txt: line 1: label 4 is outside \[0, 3\)"):
        FolderSource(lst, num_classes=3)
    with pytest.raises(FileNotFoundError, match="image folder or list file not found"):
        FolderSource(tmp_path / "missing")
