"""The README's "From your own photos" walkthrough, each command as written (tiny overrides added):
detect -> pack -> train (on the pack, and on the photos directly) -> evaluate -> export -> compare,
on a folder of real photos from registry packages and an LFW-like ``.bin`` made of their faces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from raw_photos import identity_folder, lfw_like_bin, scaled
from test_detect_cli import readme_section, run

from facemargin.detect.samples import packaged_photo

TESTS = Path(__file__).resolve().parent
#: appended to every training command: the demo backbone, a few steps, no logger or progress bar
TINY_TRAIN = ["trainer.max_epochs=1", "data.batch_size=4", "data.num_workers=0", "logger=none", "~callbacks.progress_bar",
              "val_num_workers=0", "val_batch_size=8"]


@pytest.mark.slow
def test_readme_from_your_own_photos_runs(tmp_path) -> None:
    commands, _ = readme_section("## From your own photos")
    work = tmp_path / "work"
    identity_folder(work / "photos")  # 10 photos, one without a face (grace_hopper/coffee.png)
    hopper = packaged_photo("grace_hopper")
    Image.fromarray(scaled(hopper, 0.5)).save(work / "a.jpg", quality=90)
    Image.fromarray(scaled(np.ascontiguousarray(hopper[30:560, 20:500]), 0.45)).save(work / "b.jpg", quality=85)
    data = tmp_path / "data"
    lfw_like_bin(data / "ms1m-retinaface-t1" / "lfw.bin", work / "photos")
    env = {"FACEMARGIN_DATA": str(data), "FACEMARGIN_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": f"{TESTS.parent / 'src'}"}
    outputs = []
    for argv in commands:
        module, args = argv[2], argv[3:]
        if module == "facemargin.train":
            args = args + TINY_TRAIN
        outputs.append(run(module, *args, cwd=work, env=env).stdout)

    assert len((work / "landmarks.txt").read_text().splitlines()) == 9  # every photo but the coffee cup
    assert (work / "landmarks.noface.txt").read_text().split() == ["grace_hopper/coffee.png"]
    assert (work / "faces" / "property").read_text() == "3,112,112"  # pack --detect: 9 faces of 3 people
    assert (work / "faces" / "no_face.txt").read_text() == "grace_hopper/coffee.png\n"
    assert "no face in 1" in outputs[1]
    for run_dir in ("runs/mine", "runs/direct"):
        metrics = json.loads((work / run_dir / "metrics.json").read_text())
        assert metrics["global_step"] == 9 // 4 and 0.0 <= metrics["val/acc"] <= 1.0  # scored on lfw.bin
    assert "coffee.png" in (work / "runs" / "direct" / "faces" / "noface.txt").read_text()
    (evaluated,) = (work / "outputs" / "evaluate").glob("*/*/eval.json")
    assert 0.0 <= json.loads(evaluated.read_text())["sets"]["lfw"]["acc"] <= 1.0
    assert (work / "model.onnx").is_file()
    lines = outputs[-1].splitlines()
    assert lines[0].startswith("a.jpg: 1 face: box ") and lines[1].startswith("b.jpg: 1 face: box ")
    assert "chosen by validation on lfw" in lines[-1]
    assert lines[-1].endswith(("same person", "different people"))
