"""A torchvision built for another torch (``import timm`` fails with ``operator torchvision::nms does
not exist``) is named in one line with the pip command that pairs the versions. The real mismatch
cannot be installed here: a stand-in ``torchvision`` package that fails the way the real one does,
with the dist-info of another release, goes first on the path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from facemargin.install_check import expected_torchvision, mismatch_error


def fake_torchvision(root: Path, version: str, error: str) -> Path:
    """``root/torchvision`` raising ``error`` on import, and ``root/torchvision-<version>.dist-info``."""
    (root / "torchvision").mkdir(parents=True)
    (root / "torchvision" / "__init__.py").write_text(f"raise {error}\n")
    info = root / f"torchvision-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torchvision\nVersion: {version}\n")
    return root


def test_the_torchvision_series_of_each_torch():
    assert expected_torchvision("2.14.1+cpu") == "0.29"
    assert expected_torchvision("2.0.0") == "0.15" and expected_torchvision("2.5.1+cu121") == "0.20"
    assert expected_torchvision("3.0.0") is None  # unknown: no claim


def test_mismatch_error_names_both_versions_and_the_fix():
    cause = RuntimeError("operator torchvision::nms does not exist")
    err = mismatch_error(cause, "2.14.1+cpu", "0.30.0")
    assert str(err) == ("torchvision 0.30.0 is not the build for torch 2.14.1+cpu (that is torchvision 0.29.x), so "
                        "importing it fails: operator torchvision::nms does not exist")
    assert err.hint == 'pip install "torch==2.14.1" "torchvision==0.29.*" --index-url https://download.pytorch.org/whl/cpu'
    assert mismatch_error(cause, "2.5.1", "0.21.0").hint == 'pip install "torch==2.5.1" "torchvision==0.20.*"'
    assert mismatch_error(cause, "2.14.1", "0.29.1") is None  # paired: the error is something else


@pytest.mark.parametrize("error", ['RuntimeError("operator torchvision::nms does not exist")',
                                   'ImportError("libc10.so: undefined symbol: _ZN3c10")'])
def test_train_and_import_say_the_mismatch_in_one_line(error, tmp_path):
    import torch

    fake = fake_torchvision(tmp_path / "site", "0.99.0", error)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "offline"}
    base = torch.__version__.partition("+")[0]
    wanted = expected_torchvision(torch.__version__)
    proc = subprocess.run([sys.executable, "-m", "facemargin.train", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-2].startswith(f"facemargin.train: error: torchvision 0.99.0 is not the build for torch "
                                f"{torch.__version__} (that is torchvision {wanted}.x), so importing it fails: ")
    assert lines[-1].startswith(f'hint: pip install "torch=={base}" "torchvision=={wanted}.*"')
    # a library user importing the backbones gets the same one-line error, as an exception
    code = "import facemargin.backbones"
    lib = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert lib.returncode == 1
    assert f"facemargin.errors.UserError: torchvision 0.99.0 is not the build for torch {torch.__version__}" in lib.stderr
