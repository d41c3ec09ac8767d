"""``facemargin.clean``: Sub-center ArcFace's cleaning of a noisy set, end to end on real files.

A tiny K=3 model whose sub-centres are placed by hand (one near each class's mean embedding, at a
known index) is saved as a checkpoint; the cleaner (``conf/clean.yaml`` composed by Hydra) must
keep exactly the samples a numpy reference of insightface's ``drop.py`` keeps, write a RecordIO
subset index over the same ``train.rec`` that the DataModule reads, and a ``k1.ckpt`` that a new
training run starts from (``init_weights``). Folder sources get a list file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from facemargin.checkpoint import load_module
from facemargin.clean import clean, write_cleaned_set
from facemargin.data.formats.image import decode_face
from facemargin.data.loading.normalize import normalize_uint8, to_uint8_chw
from facemargin.data.module import FaceRecordDataModule
from facemargin.data.sources.folder import FolderSource
from facemargin.data.sources.recordio import FaceRecordSet
from facemargin.data.tools.synthetic import ensure_demo_dataset
from facemargin.module import RECORD_KEY
from facemargin.train import build, build_model, config_dir

K = 3
DEMO = {"num_identities": 8, "images_per_identity": 6, "num_val_identities": 4, "num_val_pairs": 10}
DEMO_OVERRIDES = [f"+data.demo_options.{k}={v}" for k, v in DEMO.items()]
TINY = ["backbone.embedding_size=32", "backbone.kwargs.widths=[8,16,32]", "backbone.kwargs.stem_width=8"]


def compose_with(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(name, overrides=overrides)


def reference_keep(x: np.ndarray, w: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """insightface drop.py, per class: nearest sub-centre counts, dominant = most counts, keep cos > cos(threshold)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    w = (w / np.linalg.norm(w, axis=1, keepdims=True)).reshape(-1, K, w.shape[1])
    keep, dominant = np.zeros(len(x), bool), np.zeros(len(w), np.int64)
    for c in range(len(w)):
        idx = np.flatnonzero(labels == c)
        dominant[c] = np.argmax(np.bincount(np.argmax(x[idx] @ w[c].T, axis=1), minlength=K))
        keep[idx] = x[idx] @ w[c, dominant[c]] > np.cos(np.radians(threshold))
    return keep, dominant


@pytest.fixture(scope="module")
def noisy_model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A K=3 checkpoint on a tiny demo set: class c's sub-centre ``c % K`` sits near its mean embedding."""
    tmp = tmp_path_factory.mktemp("clean")
    cache = tmp / "cache"
    root = Path(ensure_demo_dataset(cache, **DEMO))
    cfg = compose_with("config", [*TINY, "head.subcenters=3", f"data.demo_cache_dir={cache}", *DEMO_OVERRIDES])
    torch.manual_seed(0)
    module = build_model(cfg, num_classes=DEMO["num_identities"]).eval()
    rec = FaceRecordSet(root)
    labels = rec.labels().copy()
    images = torch.stack([to_uint8_chw(decode_face(rec.parse(i, rec.read_raw(i))[1], rec.image_size)) for i in range(len(rec))])
    with torch.no_grad():
        x = module.backbone(normalize_uint8(images)).double().numpy()
    g = np.random.default_rng(1)
    w = g.normal(size=(DEMO["num_identities"] * K, x.shape[1]))
    for c in range(DEMO["num_identities"]):
        mean = x[labels == c].mean(0)
        w[c * K + c % K] = mean / np.linalg.norm(mean) * 3.0
    with torch.no_grad():
        module.head.weight.copy_(torch.from_numpy(w))
    ckpt = tmp / "k3.ckpt"
    torch.save({"state_dict": module.state_dict(), RECORD_KEY: module.record()}, ckpt)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    means = (w / np.linalg.norm(w, axis=1, keepdims=True)).reshape(-1, K, w.shape[1])[labels, labels % K]
    angles = np.sort(np.degrees(np.arccos(np.clip((xn * means).sum(1), -1, 1))))
    threshold = float((angles[len(angles) * 6 // 10] + angles[len(angles) * 6 // 10 + 1]) / 2)  # ~40 % dropped
    return {"tmp": tmp, "cache": cache, "root": root, "ckpt": ckpt, "x": x, "w": w, "labels": labels,
            "threshold": threshold, "module": module}


@pytest.fixture(scope="module")
def cleaned(noisy_model: dict) -> dict:
    out = noisy_model["tmp"] / "out"
    cfg = compose_with("clean", [f"ckpt_path={noisy_model['ckpt']}", f"out={out}", f"threshold={noisy_model['threshold']}",
                                 f"data.demo_cache_dir={noisy_model['cache']}", *DEMO_OVERRIDES, "num_workers=0",
                                 "progress=false"])
    return {"summary": clean(cfg), "out": out}


def test_cleaner_keeps_what_insightface_drop_keeps(noisy_model, cleaned) -> None:
    keep, dominant = reference_keep(noisy_model["x"], noisy_model["w"], noisy_model["labels"], noisy_model["threshold"])
    assert 0 < (~keep).sum() < len(keep)
    arrays = np.load(cleaned["out"] / "cleaning.npz")
    assert np.array_equal(arrays["keep"], keep) and np.array_equal(arrays["dominant"], dominant)
    assert np.array_equal(dominant, np.arange(DEMO["num_identities"]) % K)  # the placed sub-centres dominate
    s = cleaned["summary"]
    assert json.loads((cleaned["out"] / "clean.json").read_text()) == s
    assert s["samples"] == len(keep) and s["samples_dropped"] == int((~keep).sum())
    assert s["identities"] == DEMO["num_identities"]
    assert s["identities_dropped"] == DEMO["num_identities"] - len(np.unique(noisy_model["labels"][keep]))
    assert s["subcenters"] == K and s["threshold_deg"] == pytest.approx(noisy_model["threshold"])


def test_cleaned_recordio_set_is_a_subset_index_over_the_same_rec(noisy_model, cleaned) -> None:
    out, root = cleaned["out"], noisy_model["root"]
    keep = np.load(out / "cleaning.npz")["keep"]
    assert (out / "train.rec").resolve() == (root / "train.rec").resolve()  # linked, not copied
    dm = FaceRecordDataModule(root=out, val_sets=["demo_val"], num_workers=0)
    original = FaceRecordSet(root)
    sub = dm.source
    assert dm.num_classes == DEMO["num_identities"] and len(sub) == int(keep.sum())
    assert np.array_equal(sub.labels(), noisy_model["labels"][keep])
    for j, i in enumerate(np.flatnonzero(keep)):
        assert sub.parse(j, sub.read_raw(j)) == original.parse(int(i), original.read_raw(int(i)))
    assert [p.name for p in dm.verification_files()] == ["demo_val.bin"]


def test_k1_checkpoint_holds_the_dominant_subcentres_and_starts_a_run(noisy_model, cleaned) -> None:
    out = cleaned["out"]
    k1 = load_module(out / "k1.ckpt")
    w = torch.from_numpy(noisy_model["w"]).float().view(-1, K, 32)
    dominant = torch.arange(DEMO["num_identities"]) % K
    assert k1.head.subcenters == 1 and torch.equal(k1.head.weight, w[torch.arange(len(w)), dominant])
    assert k1.config["head"]["subcenters"] == 1
    assert cleaned["summary"]["train"].endswith(f"data.root={out} data.val_sets=[demo_val] init_weights={out / 'k1.ckpt'}")

    class StartWeights(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    command = cleaned["summary"]["train"].split()  # python -m facemargin.train data=recordio data.root=OUT ...
    assert command[:3] == ["python", "-m", "facemargin.train"]
    cfg = compose_with("config", [*command[3:], *TINY, "data.num_workers=0", "data.batch_size=8",
                                  "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                                  "trainer.limit_val_batches=0", "logger=csv", "callbacks=none",
                                  f"output_dir={noisy_model['tmp'] / 'run'}"])
    trainer, model, dm = build(cfg)
    assert len(dm.source) == cleaned["summary"]["samples_kept"] and dm.num_classes == DEMO["num_identities"]
    start = StartWeights()
    trainer.callbacks.append(start)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 1
    for name, value in k1.state_dict().items():
        assert torch.equal(start.weights[name], value), name


def test_cleaner_refuses_to_overwrite_or_mismatch(noisy_model, cleaned, tmp_path) -> None:
    base = [f"ckpt_path={noisy_model['ckpt']}", f"data.demo_cache_dir={noisy_model['cache']}", "num_workers=0",
            "progress=false"]
    with pytest.raises(FileExistsError, match="already holds train.idx"):
        clean(compose_with("clean", [*base, *DEMO_OVERRIDES, f"out={cleaned['out']}"]))
    with pytest.raises(ValueError, match="training set's own folder"):
        clean(compose_with("clean", [*base, *DEMO_OVERRIDES, f"out={noisy_model['root']}"]))
    other = {**DEMO, "num_identities": 5}
    with pytest.raises(ValueError, match="trained on 8 identities, the set .* has 5"):
        clean(compose_with("clean", [*base, *(f"+data.demo_options.{k}={v}" for k, v in other.items()),
                                     f"out={tmp_path / 'x'}"]))


def test_folder_source_gets_a_list_file_keeping_the_class_count(noisy_model, tmp_path) -> None:
    rec = FaceRecordSet(noisy_model["root"])
    labels = rec.labels()
    lines = []
    for i in range(len(rec)):
        path = tmp_path / "images" / f"id {labels[i]}" / f"{i}.jpg"  # a space in the path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rec.parse(i, rec.read_raw(i))[1])
        lines.append(f"{path.relative_to(tmp_path)} {labels[i]}\n")
    (tmp_path / "all.lst").write_text("".join(lines))
    source = FolderSource(tmp_path / "all.lst")
    keep = (labels != labels.max()) & (np.arange(len(labels)) % 4 != 0)  # the last identity goes entirely
    out = tmp_path / "out"
    out.mkdir()
    overrides = write_cleaned_set(source, keep, out)
    assert overrides == {"data": "folder", "data.root": str(out / "train.lst"), "data.num_classes": DEMO["num_identities"]}
    dm = FaceRecordDataModule(root=out / "train.lst", source="folder", num_classes=DEMO["num_identities"])
    assert dm.num_classes == DEMO["num_identities"] and len(dm.source) == int(keep.sum())
    assert FolderSource(out / "train.lst").num_classes == DEMO["num_identities"] - 1  # why data.num_classes is needed
    assert np.array_equal(dm.source.labels(), labels[keep])
    assert [Path(dm.source.path(j)) for j in range(3)] == [Path(source.path(int(i))).resolve() for i in np.flatnonzero(keep)[:3]]


@pytest.mark.slow
def test_cli_reports_what_it_dropped(noisy_model, cleaned, tmp_path) -> None:
    """``python -m facemargin.clean`` logs the counts of ``clean.json`` and the command that trains on the result."""
    out = tmp_path / "clean"
    proc = subprocess.run(
        [sys.executable, "-m", "facemargin.clean", f"ckpt_path={noisy_model['ckpt']}", f"out={out}",
         f"threshold={noisy_model['threshold']}", f"data.demo_cache_dir={noisy_model['cache']}", *DEMO_OVERRIDES,
         "num_workers=0", "progress=false"], capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"},
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "clean.json").read_text())
    logged = proc.stdout + proc.stderr
    assert f"dropped {s['samples_dropped']} of {s['samples']} samples" in logged
    assert f"and {s['identities_dropped']} of {s['identities']} identities" in logged
    assert s["train"] in logged and s["train"] == cleaned["summary"]["train"].replace(str(cleaned["out"]), str(out))
    assert np.array_equal(np.load(out / "cleaning.npz")["keep"], np.load(cleaned["out"] / "cleaning.npz")["keep"])
