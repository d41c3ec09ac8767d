"""The wheel carries the Hydra configs, so a plain `pip install` user gets `python -m facemargin.train`;
the library's main classes import from the package root without Hydra, lazily."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_config_tree(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("facemargin-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    repo_configs = {f"facemargin/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert repo_configs and repo_configs <= names, sorted(repo_configs - names)[:5]
    assert "facemargin/train.py" in names and "facemargin/data/formats/recordio.py" in names


def test_main_classes_import_from_the_package_root_lazily():
    code = (
        "import sys, facemargin\n"
        "assert not [m for m in ('lightning', 'timm', 'hydra') if m in sys.modules], 'import facemargin is not light'\n"
        "from facemargin import FaceRecognitionModule, FaceRecordDataModule, PartialFCHead\n"
        "import facemargin.data.module, facemargin.heads, facemargin.module\n"
        "assert FaceRecognitionModule is facemargin.module.FaceRecognitionModule\n"
        "assert FaceRecordDataModule is facemargin.data.module.FaceRecordDataModule\n"
        "assert PartialFCHead is facemargin.heads.PartialFCHead\n"
        "assert 'hydra' not in sys.modules, 'library use imports Hydra'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
