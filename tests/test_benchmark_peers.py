"""The peer benchmarks never skip a peer silently and take every peer path from the caller.

``benchmarks/data_throughput.py`` and ``benchmarks/pack_throughput.py`` are run as a stranger
would run them, without MXNet: the rows that need it are named with the reason, the exit status
is 1 unless ``--allow-missing-peers``, and the rows that need no peer still print their figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench(script: str, *args: str, peer: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FACEMARGIN_MXNET_PYTHON"}
    env["OMP_NUM_THREADS"] = "1"
    if peer is not None:
        env["FACEMARGIN_MXNET_PYTHON"] = peer
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """Six identities of four 48x48 JPEG 'faces' each, in identity folders."""
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    for ident in range(6):
        (root / f"id{ident}").mkdir()
        for j in range(4):
            img = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
            (root / f"id{ident}" / f"{j}.jpg").write_bytes(simplejpeg.encode_jpeg(img, quality=90, colorspace="RGB"))
    return root


def test_data_throughput_names_a_missing_peer_and_fails(faces):
    res = bench("data_throughput.py", "--faces", str(faces), "--records", "256", "--repeats", "1",
                "--rows", "fm-map,mx-iter-1,mx-python-float")
    assert res.returncode == 1, res.stderr[-2000:]
    assert "rows NOT run" in res.stderr
    for row in ("mx-iter-1", "mx-python-float"):
        assert f"  {row}: no MXNet peer given (--mxnet-python or $FACEMARGIN_MXNET_PYTHON)" in res.stderr
    assert "setup_mxnet_peer.sh" in res.stderr
    # the rows without a peer still ran, on the folder's faces (48x48, cycled to 256 images)
    assert "| fm-map |" in res.stdout
    assert f"256 images, 48x48" in res.stdout and str(faces) in res.stdout


def test_data_throughput_allow_missing_peers_and_a_wrong_path(faces, tmp_path):
    res = bench("data_throughput.py", "--faces", str(faces), "--records", "256", "--repeats", "1",
                "--rows", "fm-map,mx-iter-2", "--allow-missing-peers")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "  mx-iter-2: no MXNet peer given" in res.stderr
    nowhere = str(tmp_path / "no" / "python")
    res = bench("data_throughput.py", "--faces", str(faces), "--records", "256", "--repeats", "1",
                "--rows", "mx-iter-1", peer=nowhere)  # from the environment variable
    assert res.returncode == 1
    assert f"--mxnet-python {nowhere}: no such file" in res.stderr


def test_data_throughput_refuses_faces_of_two_sizes(faces, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jpg").write_bytes((faces / "id0" / "0.jpg").read_bytes())
    (mixed / "b.jpg").write_bytes(simplejpeg.encode_jpeg(np.zeros((64, 48, 3), np.uint8), colorspace="RGB"))
    res = bench("data_throughput.py", "--faces", str(mixed), "--records", "128", "--repeats", "1", "--rows", "fm-map")
    assert res.returncode != 0
    assert "b.jpg is (64, 48) (h, w)" in res.stderr and "one size" in res.stderr


def test_pack_throughput_names_a_missing_peer_and_fails(faces):
    args = ("--faces", str(faces), "--images", "48", "--photo-count", "12", "--repeats", "1", "--workers", "0")
    res = bench("pack_throughput.py", *args)
    assert res.returncode == 1, res.stderr[-2000:]
    for row in ("im2rec --pass-through", "im2rec --resize 112"):
        assert f"  {row}: no MXNet peer given" in res.stderr
    assert "| fm pack |" in res.stdout and "| fm pack --resize 112 |" in res.stdout
    assert "| fm pack --verify decode |" in res.stdout and "| fm pack --resize 112 --resize-quality full |" in res.stdout
    assert bench("pack_throughput.py", *args, "--allow-missing-peers").returncode == 0


def test_setup_mxnet_peer_script_needs_a_directory():
    """The installer takes its target from the caller (no default path) and says how to use it."""
    script = BENCH / "setup_mxnet_peer.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert res.returncode == 2
    assert "setup_mxnet_peer.sh DIR" in res.stdout and "FACEMARGIN_MXNET_PYTHON" in res.stdout
