"""The wheel carries the Hydra configs, so a plain `pip install` user gets `python -m facemargin.train`."""

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
    assert "facemargin/train.py" in names and "facemargin/data/recordio.py" in names
