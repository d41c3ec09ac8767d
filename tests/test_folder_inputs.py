"""Folder sets and list files are checked when they open (file and line named); unreadable files are skippable."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import simplejpeg

from facemargin.data.loading.loader import BatchReader, PlanSampler, TrainLoader
from facemargin.data.loading.plan import PlanSpec
from facemargin.data.sources.base import UnreadableSampleError
from facemargin.data.sources.folder import FolderSource
from facemargin.data.sources.listing import ListFileError
from facemargin.errors import UserError


def _jpeg(seed: int, size: int = 16) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return simplejpeg.encode_jpeg(img, quality=90)


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    """``imgs/a/0.jpg .. imgs/c/2.jpg``: 3 identities x 3 images of 16 x 16."""
    for c, name in enumerate("abc"):
        for j in range(3):
            path = tmp_path / "imgs" / name / f"{j}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_jpeg(10 * c + j))
    return tmp_path / "imgs"


def _list(tmp_path: Path, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / "train.txt"
    path.write_bytes(text.encode(encoding))
    return path


GOOD = "imgs/a/0.jpg 0\nimgs/b/1.jpg 1\nimgs/c/2.jpg 2\n"


def test_a_utf8_byte_order_mark_is_accepted_and_utf16_refused(images: Path, tmp_path: Path) -> None:
    src = FolderSource(_list(tmp_path, "\ufeff" + GOOD))
    assert src.path(0) == str(images / "a" / "0.jpg") and src.labels().tolist() == [0, 1, 2]
    assert src.parse(0, src.read_raw(0))[1] == (images / "a" / "0.jpg").read_bytes()
    with pytest.raises(ListFileError, match=r"train\.txt: the list is UTF-16 .* save it as UTF-8"):
        FolderSource(_list(tmp_path, "\ufeff" + GOOD, "utf-16"))


def test_paths_may_hold_spaces(images: Path, tmp_path: Path) -> None:
    (images / "a" / "with space 1.jpg").write_bytes(_jpeg(99))
    src = FolderSource(_list(tmp_path, f"imgs/a/with space 1.jpg 0\n{images / 'b' / '0.jpg'}\t1\n"))
    assert src.path(0) == str(images / "a" / "with space 1.jpg") and src.labels().tolist() == [0, 1]


def _loop(tmp_path: Path) -> str:
    os.symlink(tmp_path / "loop.jpg", tmp_path / "loop.jpg")
    return "loop.jpg 0"


def _dangling(tmp_path: Path) -> str:
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "gone.jpg")
    return "gone.jpg 0"


BAD_LINES = {
    "directory": (lambda t: "imgs/a 0", r"line 4: .*imgs/a is a directory, not an image file"),
    "three fields": (lambda t: "imgs/a/1.jpg 0 extra", r"line 4 has 3 fields, expected 'path label': 'imgs/a/1.jpg 0 extra'"),
    "three numbers": (lambda t: "imgs/a/1.jpg 0 5", r"line 4 has 3 fields, expected 'path label': .* \(.*imgs/a/1\.jpg 0 does not exist\)"),
    "im2rec lst": (lambda t: "7\t0\timgs/a/1.jpg", r"line 4 has 3 fields, expected 'path label' \(an im2rec \.lst line"),
    "huge label": (lambda t: "imgs/a/1.jpg 999999999", r"line 4: label 999999999 is not below the 4 images listed"),
    "negative label": (lambda t: "imgs/a/1.jpg -1", r"line 4: label '-1' is not a non-negative integer"),
    "duplicate line": (lambda t: "imgs/b/1.jpg 1", r"line 4 repeats line 2 \(.*imgs/b/1\.jpg\)"),
    "two labels": (lambda t: "./imgs/a/0.jpg 2", r"line 4 lists .*imgs/a/0\.jpg under label 2, line 1 under label 0"),
    "missing file": (lambda t: "imgs/a/9.jpg 0", r"line 4: .*imgs/a/9\.jpg does not exist"),
    "dangling link": (_dangling, r"line 4: .*gone\.jpg is a dangling symbolic link"),
    "link loop": (_loop, r"line 4: .*loop\.jpg: symbolic link loop"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_bad_line_is_refused_at_open_naming_file_and_line(images: Path, tmp_path: Path, case: str) -> None:
    make, message = BAD_LINES[case]
    lst = _list(tmp_path, GOOD + make(tmp_path) + "\n")
    with pytest.raises(ListFileError, match=rf"^{tmp_path}/train\.txt: {message}") as info:
        FolderSource(lst)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_every_problem_is_reported_at_once_and_num_classes_allows_sparse_labels(images: Path, tmp_path: Path) -> None:
    lst = _list(tmp_path, GOOD + "imgs/a 0\nimgs/a/1.jpg x\nimgs/a/0.jpg 0\n")
    with pytest.raises(ListFileError, match=r"line 4: .* is a directory.* \(and 2 more: line 5: label 'x' .*; line 6 repeats line 1"):
        FolderSource(lst)
    lst = _list(tmp_path, "imgs/a/0.jpg 0\nimgs/b/0.jpg 7\n")
    with pytest.raises(ListFileError, match=r"line 2: label 7 is not below the 2 images listed"):
        FolderSource(lst)
    assert FolderSource(lst, num_classes=8).num_classes == 8  # a cleaned subset keeps the model's numbering
    with pytest.raises(ListFileError, match=r"line 2: label 7 is outside \[0, 5\)"):
        FolderSource(lst, num_classes=5)


def test_a_tree_skips_dangling_links_and_link_loops_alike(images: Path, capsys: pytest.CaptureFixture) -> None:
    os.symlink(images / "a" / "nowhere.jpg", images / "a" / "dangling.jpg")
    os.symlink(images / "b" / "loop.jpg", images / "b" / "loop.jpg")
    os.symlink(images / "zz", images / "zz")  # an identity folder that is a link loop
    os.symlink(images / "a" / "0.jpg", images / "c" / "linked.jpg")  # a good link is kept
    src = FolderSource(images)
    assert len(src) == 10 and src.num_classes == 3
    err = capsys.readouterr().err
    assert "skipping 3 symbolic link(s) that lead nowhere" in err
    for name in ("a/dangling.jpg (dangling symbolic link)", "b/loop.jpg (symbolic link loop", "zz (symbolic link loop"):
        assert name in err


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_deleted_after_open_is_an_error_or_a_counted_skip(images: Path, streaming: bool, workers: int) -> None:
    src = FolderSource(images)
    (images / "b" / "1.jpg").unlink()
    victim = src.path(4)
    assert victim.endswith("b/1.jpg")
    spec = PlanSpec(seed=3, streaming=streaming, chunk=2, window=4)

    def epoch(on_corrupt: str) -> tuple[list[int], BatchReader]:
        reader = BatchReader(src, seed=3, on_corrupt=on_corrupt)
        loader = TrainLoader(reader, PlanSampler(src, 3, spec), num_workers=workers)
        return [i for _, _, index in loader for i in index.tolist()], reader

    with pytest.raises(UnreadableSampleError, match=rf"{victim}: cannot be read: file not found"):
        epoch("raise")
    seen, reader = epoch("skip")
    assert len(seen) == 9 and 4 not in seen and reader.num_skipped >= 1
