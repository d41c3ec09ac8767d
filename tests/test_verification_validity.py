"""Scores that refuse to lie (issue 18, item 1): a verification figure only where the pairs support it.

insightface's ``small_lfw.bin`` (10 pairs) and a 749-pair ``validation.bin`` hold same-person pairs
only: accuracy and threshold are undefined on them. Here such a set gives null figures with the
reason, stays out of ``val/acc``, cannot choose a checkpoint, stores no threshold, and ``compare``
asks for one instead of deciding with it. Thresholds are cosines; old squared-distance records
are converted on read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from facemargin.data.formats.verification import load_bin, write_bin
from facemargin.evaluation.pairs import PairsEvaluator

SMALL_LFW_WHY = ("10 same-person pairs, 0 different-person pairs: accuracy and threshold are undefined "
                 "(insightface's 10-fold protocol needs a same-person and a different-person pair in every fold)")


def _scored(issame, name: str = "small_lfw", seed: int = 0) -> tuple[dict[str, float], PairsEvaluator, list[str]]:
    """Random embeddings through a PairsEvaluator (its images are never decoded here)."""
    issame = np.asarray(issame, dtype=bool)
    emb = torch.from_numpy(np.random.default_rng(seed).normal(size=(2 * issame.size, 8)))
    ev = PairsEvaluator([b""] * (2 * issame.size), issame, name=name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # two validation epochs: warned once
            ev.update(emb, torch.arange(2 * issame.size))
            scores = {k: float(v) for k, v in ev.compute().items()}
            ev.reset()
    return scores, ev, [str(w.message) for w in caught if "null" in str(w.message)]


@pytest.mark.parametrize("n", [10, 749])
def test_same_person_pairs_only_give_null_accuracy_with_the_reason(n) -> None:
    scores, ev, warned = _scored([True] * n)
    why = SMALL_LFW_WHY.replace("10 same-person", f"{n} same-person")
    for key in ("acc", "acc_std", "threshold_cosine", "tar@far=1e-3", "tar@far=1e-4"):
        assert math.isnan(scores[key]), key
    assert scores["xnorm"] > 0  # the mean norm needs no pair of either kind
    assert {k: ev.notes[k] for k in ("acc", "acc_std", "threshold_cosine")} == dict.fromkeys(
        ("acc", "acc_std", "threshold_cosine"), why)
    assert warned[0] == f"small_lfw: acc, acc_std, threshold_cosine are null: {why}"
    assert len(warned) == 3  # the accuracy note and one per FAR target: each once over two epochs
    assert ev.monitor_undefined() == f"small_lfw: {why}"


def test_a_fold_without_both_kinds_is_named() -> None:
    # 40 pairs, all the same-person pairs first: fold 1 (pairs 1-4) holds no different-person pair
    scores, ev, _ = _scored([True] * 20 + [False] * 20, name="sorted")
    assert math.isnan(scores["acc"]) and math.isnan(scores["threshold_cosine"])
    assert ev.notes["acc"] == (
        "20 same-person pairs, 20 different-person pairs, but fold 1 of 10 (pairs 1-4) has 4 same-person and 0 "
        "different-person pairs: accuracy and threshold are undefined (insightface's 10-fold protocol needs a "
        "same-person and a different-person pair in every fold; the folds are consecutive blocks of the pairs, so "
        "each block must hold both kinds)")
    # the same 40 pairs alternating: every fold holds both kinds, so accuracy is defined
    scores, ev, _ = _scored([True, False] * 20, name="balanced")
    assert 0.0 <= scores["acc"] <= 1.0 and -1.0 <= scores["threshold_cosine"] <= 1.0
    assert "acc" not in ev.notes and ev.monitor_undefined() is None


def test_fewer_pairs_than_folds_are_null_not_a_crash() -> None:
    scores, ev, _ = _scored([True, False, True, False, True], name="five")
    assert all(math.isnan(scores[k]) for k in scores if k != "xnorm")
    assert ev.notes["acc"].endswith("every fold: at least 20 pairs)")
    assert ev.notes["tar@far=1e-3"] == "5 pairs: the 10-fold protocol needs at least 10"


def test_non_finite_embeddings_are_null_with_the_reason() -> None:
    same = np.array([True, False] * 10)
    ev = PairsEvaluator([b""] * 40, same, name="diverged")
    emb = torch.randn(40, 8)
    emb[3] = float("nan")
    ev.update(emb, torch.arange(40))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = ev.compute()
    assert all(torch.isnan(v) for v in scores.values())
    assert ev.notes["acc"] == ev.notes["xnorm"] == "1 of 40 images have non-finite embeddings (NaN or inf)"


# ------------------------------------------------------------------ the threshold record


def test_old_squared_distance_thresholds_are_read_as_cosines() -> None:
    from facemargin.evaluation.embedder import Embedder
    from facemargin.evaluation.thresholds import NoThresholdError, choose_threshold, stored_thresholds

    old = {"lfw": {"threshold": 1.2, "acc": 0.99}, "cfp_fp": {"threshold": 1.5}}  # written before: squared L2
    assert stored_thresholds(old) == {"lfw": {"threshold_cosine": pytest.approx(0.4), "acc": 0.99},
                                      "cfp_fp": {"threshold_cosine": pytest.approx(0.25)}}
    new = {"lfw": {"threshold_cosine": 0.4, "acc": 0.99}}
    assert stored_thresholds(new) == new
    model = Embedder(torch.nn.Identity(), {"verification": old}, source="old.onnx")
    assert model.cosine_threshold() == (pytest.approx(0.4), "lfw")
    assert model.cosine_threshold("cfp_fp") == (pytest.approx(0.25), "cfp_fp")
    assert choose_threshold({"verification": old})[2] == "chosen by validation on lfw (accuracy 0.9900)"
    with pytest.raises(NoThresholdError, match=r"old\.onnx: no threshold for set 'agedb_30'; stored: \['cfp_fp', 'lfw'\]"):
        model.cosine_threshold("agedb_30")


def test_old_checkpoints_convert_on_read_and_exports_say_the_unit(demo_checkpoint, tmp_path) -> None:
    from facemargin.evaluation.embedder import load_embedder
    from facemargin.evaluation.thresholds import THRESHOLD_UNIT
    from facemargin.export import checkpoint_export_metadata

    ckpt = torch.load(demo_checkpoint, map_location="cpu", weights_only=True)
    record = ckpt["facemargin"]
    t = record["verification"]["demo_val"]["threshold_cosine"]
    assert record["threshold_unit"] == THRESHOLD_UNIT and "cosine" in THRESHOLD_UNIT
    meta = checkpoint_export_metadata(record, str(demo_checkpoint))
    assert meta["verification"] == record["verification"] and meta["threshold_unit"] == THRESHOLD_UNIT

    # a checkpoint written before: squared distance under "threshold", no unit, no notes
    legacy = dict(record)
    legacy["verification"] = {"demo_val": {"threshold": 2 * (1 - t), "acc": 0.75}}
    del legacy["threshold_unit"], legacy["verification_notes"]
    old = tmp_path / "old.ckpt"
    torch.save({**ckpt, "facemargin": legacy}, old)
    model = load_embedder(old)
    assert model.cosine_threshold() == (pytest.approx(t), "demo_val")
    assert model.metadata["verification"] == {"demo_val": {"threshold_cosine": pytest.approx(t), "acc": 0.75}}


# ------------------------------------------------------------------ validation inside training


def _tiny_jpegs(n: int, size: int = 16) -> list[bytes]:
    import simplejpeg

    rng = np.random.default_rng(1)
    return [simplejpeg.encode_jpeg(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), quality=90)
            for _ in range(n)]


def test_a_set_without_both_kinds_is_left_out_of_val_acc_and_stores_no_threshold(tmp_path) -> None:
    import lightning.pytorch as pl

    from facemargin.evaluation import BinPairsEvaluator
    from facemargin.heads import MarginHead
    from facemargin.module import FaceRecognitionModule

    images = _tiny_jpegs(40)
    write_bin(tmp_path / "small_lfw.bin", images[:20], [True] * 10)
    write_bin(tmp_path / "balanced.bin", images, [True, False] * 10)
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.Flatten(), torch.nn.LazyLinear(16))
    backbone.input_size = 16
    module = FaceRecognitionModule(backbone, MarginHead(16, 4), val_batch_size=64, val_num_workers=0,
                                   evaluators=[BinPairsEvaluator(tmp_path / "small_lfw.bin"),
                                               BinPairsEvaluator(tmp_path / "balanced.bin")])
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logged = trainer.validate(module, verbose=False)[0]
    assert math.isnan(logged["val/small_lfw/acc"]) and math.isnan(logged["val/small_lfw/threshold_cosine"])
    assert logged["val/acc"] == logged["val/balanced/acc"]  # the mean of the sets that can support one
    assert set(module.verification) == {"balanced"}
    assert module.verification["balanced"]["threshold_cosine"] == pytest.approx(logged["val/balanced/threshold_cosine"])
    assert module.verification_notes == {"small_lfw": f"small_lfw: {SMALL_LFW_WHY}"}
    assert module.record()["verification_notes"] == module.verification_notes


@pytest.fixture(scope="module")
def small_lfw_run(tmp_path_factory, demo_env) -> dict:
    """A RecordIO set whose only validation set is a small_lfw-like .bin (10 same-person pairs)."""
    from conftest import TINY_RUN, train_in_process
    from facemargin.data.tools.synthetic import ensure_demo_dataset

    work = tmp_path_factory.mktemp("small-lfw-run")
    root = ensure_demo_dataset(work / "cache", num_identities=16, images_per_identity=3, num_val_identities=4,
                               num_val_pairs=20, image_size=32)
    images, _ = load_bin(root / "demo_val.bin")
    small = write_bin(work / "small_lfw.bin", images[:20], [True] * 10)
    faces = []
    for i in (0, 1):
        faces.append(work / f"face{i}.jpg")
        faces[-1].write_bytes(images[i])
    run = work / "run"
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("facemargin.train")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        metrics = train_in_process(
            run, *[o for o in TINY_RUN if "demo_options" not in o], "data=recordio", f"data.root={root}",
            f"data.val_sets=[{small}]", "data.num_workers=0", "data.persistent_workers=false", "val_num_workers=0")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return {"run": run, "metrics": metrics, "log": [r.getMessage() for r in records], "faces": faces, "bin": small}


def test_training_with_it_as_the_only_set_keeps_checkpoints_by_training_loss(small_lfw_run) -> None:
    run, metrics, log = small_lfw_run["run"], small_lfw_run["metrics"], small_lfw_run["log"]
    said = [m for m in log if "callbacks.checkpoint keeps" in m]
    assert said == [f"no verification set can choose the best checkpoint: small_lfw: {SMALL_LFW_WHY}: callbacks.checkpoint "
                    "keeps the checkpoint with the lowest train/loss_epoch instead of the highest val/acc"]
    assert "val/acc" not in metrics and math.isnan(metrics["val/small_lfw/acc"])
    assert metrics["best/train/loss_epoch"] == pytest.approx(min(  # the best of the two epochs' losses
        float(r["train/loss_epoch"]) for r in _csv_rows(run) if r.get("train/loss_epoch")))
    (best,) = (run / "checkpoints").glob("epoch*-loss*.ckpt")
    record = torch.load(best, map_location="cpu", weights_only=True)["facemargin"]
    assert record["verification"] == {}  # no threshold from it is stored
    assert record["verification_notes"] == {"small_lfw": f"small_lfw: {SMALL_LFW_WHY}"}


def _csv_rows(run: Path) -> list[dict[str, str]]:
    import csv

    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_compare_after_that_run_uses_no_threshold_from_it(small_lfw_run) -> None:
    from facemargin.compare import compare
    from facemargin.errors import UserError

    last = small_lfw_run["run"] / "checkpoints" / "last.ckpt"
    a, b = (str(p) for p in small_lfw_run["faces"])
    with pytest.raises(UserError) as info:
        compare(str(last), a, b, device="cpu")
    assert str(info.value) == (f"{last}: no verification threshold is stored with this model; no validation set could "
                               f"choose one: small_lfw: {SMALL_LFW_WHY}")
    assert info.value.hint.startswith("pass threshold=<cosine similarity>")
    given = compare(str(last), a, b, threshold=0.3, device="cpu")
    assert given["threshold"] == 0.3 and given["threshold_from"] == "given"


def test_evaluate_prints_null_accuracy_with_the_reason(demo_checkpoint, tmp_path) -> None:
    images, _ = load_bin(demo_checkpoint.parent / "demo_val.bin")
    small = write_bin(tmp_path / "small_lfw.bin", images[:20], [True] * 10)
    proc = subprocess.run(
        [sys.executable, "-m", "facemargin.evaluate", f"ckpt_path={demo_checkpoint}", "eval=[bin]",
         f"eval.bin.path={small}", "cache=false", "num_workers=0", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("set "))  # the table, after the log lines
    header, row = lines[at], lines[at + 2]
    assert header.split() == ["set", "acc", "acc_std", "threshold_cosine", "xnorm", "tar@far=1e-3", "tar@far=1e-4"]
    assert row.split()[:4] == ["small_lfw", "null*", "null*", "null*"]
    assert f"* small_lfw acc, acc_std, threshold_cosine: {SMALL_LFW_WHY}" in proc.stdout
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    figures = result["sets"]["small_lfw"]
    assert figures["acc"] is None and figures["threshold_cosine"] is None and figures["xnorm"] > 0
    assert result["notes"]["small_lfw"]["acc"] == SMALL_LFW_WHY
