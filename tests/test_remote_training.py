"""A RecordIO set served over HTTP on 127.0.0.1 trains exactly like the same set on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from range_http import RangeServer

from facemargin.data.module import FaceRecordDataModule
from facemargin.data.tools.synthetic import make_demo_dataset
from facemargin.evaluation.pairs import datamodule_evaluators


@pytest.fixture()
def served_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FACEMARGIN_CACHE", str(tmp_path / "cache"))
    root = make_demo_dataset(tmp_path / "www" / "set", num_identities=7, images_per_identity=5,
                             num_val_identities=4, num_val_pairs=20, image_size=24, seed=2)
    with RangeServer(tmp_path / "www") as server:
        yield server, root, server.url + "set"


def epoch(dm: FaceRecordDataModule, number: int) -> list[tuple[torch.Tensor, list[int], list[int]]]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(number)
    return [(x, y.tolist(), i.tolist()) for x, y, i in loader]


@pytest.mark.parametrize("streaming,workers", [(False, 0), (True, 2)])
def test_an_epoch_over_http_equals_the_local_epoch(served_set, streaming, workers):
    server, root, url = served_set
    kw = dict(batch_size=4, streaming=streaming, chunk_size=3, shuffle_buffer=12, seed=5, val_sets=["demo_val"])
    local = FaceRecordDataModule(root, num_workers=0, **kw)
    remote = FaceRecordDataModule(url, num_workers=workers, **kw)
    assert (remote.num_classes, remote.image_size) == (local.num_classes, local.image_size) == (7, (24, 24))
    server.cut_next, server.cut_after = 2, 50  # two replies dropped mid-record on the way: retried
    for number in (0, 1):
        want, got = epoch(local, number), epoch(remote, number)
        assert len(got) == len(want) == 35 // 4
        for (xr, yr, ir), (xl, yl, il) in zip(got, want):
            assert ir == il and yr == yl and torch.equal(xr, xl)
    assert server.cut_next == 0 and any(r and r.startswith("bytes=") for r in server.requests("/set/train.rec"))
    (ev_remote,), (ev_local,) = datamodule_evaluators(remote), datamodule_evaluators(local)  # the .bin, fetched once and cached
    assert ev_remote.name == ev_local.name
    assert ev_remote.dataset().images == ev_local.dataset().images and len(ev_local.dataset()) == 40


def test_retry_settings_come_from_the_config_and_a_dead_server_is_named(served_set):
    server, _, url = served_set
    with pytest.raises(ValueError, match=r"unknown remote option\(s\) \['retries'\]; valid: \['retry'"):
        FaceRecordDataModule(url, remote={"retries": 2})
    dm = FaceRecordDataModule(url, num_workers=0, batch_size=4, remote={"retry": {"attempts": 2, "base_delay": 0.01}})
    assert dm.hparams.remote == {"retry": {"attempts": 2, "base_delay": 0.01}}  # plain: weights_only checkpoints
    assert len(dm.source) == 35  # opened: .idx and property fetched; train.rec is read in the epoch
    server.down = True
    with pytest.raises(OSError, match=rf"^{url}/train.rec: reading \d+ bytes at offset \d+ failed 2 times .* HTTP 503"):
        next(iter(dm.train_dataloader()))


def test_a_remote_folder_source_is_refused(served_set):
    _, _, url = served_set
    with pytest.raises(ValueError, match="must be a packed RecordIO set; data=folder reads local folders"):
        FaceRecordDataModule(url, source="folder")


def test_val_sets_of_a_remote_root_are_read_from_it_unless_local_or_urls(served_set):
    _, root, url = served_set
    local_bin = str(Path(root) / "demo_val.bin")
    dm = FaceRecordDataModule(url, val_sets=["demo_val", "more/lfw.bin", local_bin, "https://elsewhere/x.bin"])
    assert dm.val_paths == [f"{url}/demo_val.bin", f"{url}/more/lfw.bin", Path(local_bin), "https://elsewhere/x.bin"]


@pytest.mark.slow
def test_cli_trains_from_http_with_augmentation_and_device_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`python -m facemargin.train data.root=http://...` end to end: remote set and .bin, AdaFace's
    augmentations, JPEGs shipped to the device decoder (its CPU fallback here)."""
    import json
    import os
    import subprocess
    import sys

    monkeypatch.setenv("FACEMARGIN_CACHE", str(tmp_path / "cache"))
    make_demo_dataset(tmp_path / "www" / "set", num_identities=8, images_per_identity=5, num_val_identities=4,
                      num_val_pairs=20, image_size=112, seed=3)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "WANDB_MODE": "offline"}
    run = tmp_path / "run"
    with RangeServer(tmp_path / "www", lifetime=600) as server:
        proc = subprocess.run(
            [sys.executable, "-m", "facemargin.train", "data=recordio", f"data.root={server.url}set",
             "data.val_sets=[demo_val]", "data.batch_size=8", "data.num_workers=0", "data.streaming=true",
             "data.chunk_size=4", "data.shuffle_buffer=16", "data/augment=adaface", "data.decode=gpu",
             "trainer.max_epochs=1", "~callbacks.progress_bar", "logger=none", f"hydra.run.dir={run}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        served = server.requests("/set/train.rec")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "data.decode=gpu but training runs on cpu: the JPEGs are decoded there" in proc.stdout + proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 40 // 8 and 0.0 <= metrics["val/acc"] <= 1.0
    assert len(served) > 1 and all(r and r.startswith("bytes=") for r in served)  # ranged reads, not a download
