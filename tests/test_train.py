"""End to end: the Hydra entry point, a multirun sweep with its summary, exact resume, CPU DDP."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import TINY_RUN, compose_run, last_ckpt, one_torch_thread, train_in_process
from facemargin.callbacks import LastCheckpoint
from facemargin.checkpoint import load_module
from facemargin.heads import MarginHead
from facemargin.module import FaceRecognitionModule
from facemargin.train import build, config_dir

# a short run: 3 training steps an epoch, no progress bar; validation scores the whole demo .bin
QUICK = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "data.num_workers=0", "~callbacks.progress_bar"]


def train(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "facemargin.train", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-6000:]}"
    return proc


def test_default_run_fast_dev_run(demo_env, tmp_path):
    run_dir = tmp_path / "run"
    train(["trainer.fast_dev_run=true", f"hydra.run.dir={run_dir}", "~callbacks.progress_bar"], demo_env, tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 1.0
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_multirun_over_the_margin_writes_a_summary(demo_env, tmp_path):
    sweep = tmp_path / "sweep"
    proc = train(["-m", "loss=expface", "loss.m=0.6,0.8", *QUICK, f"hydra.sweep.dir={sweep}"], demo_env, tmp_path)
    with open(sweep / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(float(r["loss.m"]) for r in rows) == [0.6, 0.8]
    assert all(0.0 <= float(r["val/acc"]) <= 1.0 for r in rows)
    assert len({r["job"] for r in rows}) == 2  # each job in its own folder
    assert (sweep / "summary.png").stat().st_size > 1000
    assert "| job | loss.m |" in (sweep / "summary.md").read_text()
    assert "sweep summary of 2 jobs" in proc.stdout
    # each job says where it writes, how to resume it, and where its results are
    job = sweep / next(r["job"] for r in rows if float(r["loss.m"]) == 0.6)
    assert f"run folder: {job}\n" in proc.stdout
    hint = next(line for line in proc.stdout.splitlines() if "if the run stops, resume with: " in line)
    assert " loss.m=0.6 " in hint and hint.endswith(f"ckpt_path='{job}/checkpoints/last.ckpt'")
    assert f"best checkpoint: {job}/checkpoints/epoch00-acc" in proc.stdout
    assert f"last checkpoint: {job}/checkpoints/last.ckpt (step 3)" in proc.stdout
    assert f"metrics: {job}/metrics.json (val/acc " in proc.stdout


def test_resume_restores_step_optimizer_and_scheduler(demo_env, tmp_path):
    def cfg_for(out: Path, *extra: str):
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(
                "config",
                overrides=[f"output_dir={out}", "trainer.max_epochs=2", "trainer.limit_train_batches=2",
                           "trainer.limit_val_batches=0", "data.num_workers=0", "~callbacks.progress_bar",
                           "callbacks.checkpoint.monitor=null", "logger=none", *extra],
            )

    first_dir = tmp_path / "first"
    trainer, model, dm = build(cfg_for(first_dir))
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4
    ckpt_path = first_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    saved_lr = trainer.optimizers[0].param_groups[0]["lr"]

    class CheckRestored(pl.Callback):
        seen = False

        def on_train_start(self, trainer, pl_module):
            CheckRestored.seen = True
            assert trainer.global_step == 4
            assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4
            assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(saved_lr)
            state = trainer.optimizers[0].state_dict()["state"]
            for idx, buf in saved["optimizer_states"][0]["state"].items():
                torch.testing.assert_close(state[idx]["momentum_buffer"], buf["momentum_buffer"])
            torch.testing.assert_close(pl_module.head.weight.detach(), saved["state_dict"]["head.weight"])

    cfg = cfg_for(tmp_path / "second", "trainer.max_epochs=3", f"ckpt_path={ckpt_path}")
    trainer2, model2, dm2 = build(cfg)
    trainer2.callbacks.append(CheckRestored())
    trainer2.fit(model2, datamodule=dm2, ckpt_path=cfg.ckpt_path)
    assert CheckRestored.seen
    assert trainer2.global_step == 6 and trainer2.current_epoch == 3
    assert saved["facemargin"]["channel_order"] == "RGB"

    # the checkpoint alone rebuilds the model (weights_only record); predict_step gives L2-normalised embeddings
    record = torch.load(ckpt_path, map_location="cpu", weights_only=True)["facemargin"]
    assert record["config"]["backbone"]["_target_"] == "facemargin.backbones.build_embedder"
    assert record["config"]["head"]["margin"]["name"] == "expface"  # the loss group, resolved into the head
    reloaded = load_module(ckpt_path)
    assert not reloaded.training and isinstance(reloaded, FaceRecognitionModule)
    for key, value in saved["state_dict"].items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)
    images = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        emb = reloaded.predict_step((images, torch.zeros(3)), 0)
        want = reloaded(images) + reloaded(torch.flip(images, dims=[3]))
    assert emb.shape == (3, model.embedding_size)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(emb, torch.nn.functional.normalize(want, dim=1))


def test_bf16_mixed_precision_trains_with_float32_margin_math(demo_env, tmp_path):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"output_dir={tmp_path}", "trainer.precision=bf16-mixed", "trainer.max_steps=2",
            "trainer.limit_val_batches=0", "data.num_workers=0", "~callbacks.progress_bar", "logger=none",
            "callbacks.checkpoint.monitor=null",
        ])
    trainer, model, dm = build(cfg)
    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["loss_dtype"] = outputs["loss"].dtype
            seen["finite"] = bool(torch.isfinite(outputs["loss"]))

    trainer.callbacks.append(Spy())
    trainer.fit(model, datamodule=dm)
    assert trainer.precision == "bf16-mixed" and trainer.global_step == 2
    assert seen == {"loss_dtype": torch.float32, "finite": True}


def test_two_process_cpu_ddp_with_partial_fc_then_resume_on_one_process(demo_env, tmp_path):
    """2 gloo ranks, class centres sharded (Partial FC); the checkpoint re-shards 2 -> 1 on resume."""
    run_dir = tmp_path / "ddp"
    train(
        ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "head=partial_fc", *QUICK,
         "logger=none", f"hydra.run.dir={run_dir}"],
        demo_env, tmp_path,
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 3.0
    assert 0.0 <= metrics["val/acc"] <= 1.0
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"]["head.weight"].shape[0] == 200  # every shard of the demo's 200 identities

    resumed = tmp_path / "resumed"
    train(
        ["head=partial_fc", "trainer.max_epochs=2", "trainer.limit_train_batches=3", "data.num_workers=0",
         "~callbacks.progress_bar", "logger=none", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
         f"hydra.run.dir={resumed}"],
        demo_env, tmp_path,
    )
    assert json.loads((resumed / "metrics.json").read_text())["global_step"] == 6.0


def test_last_ckpt_is_the_final_step_when_later_epochs_do_not_improve(demo_env, tmp_path):
    """The best checkpoint is epoch 0's (monitor ``epoch``, mode ``min``: no later epoch improves);
    ``last.ckpt`` still holds the final step, step checkpoints come every N steps, and a resume of the
    finished run into a new folder trains nothing and keeps the best score and path."""
    first = tmp_path / "first"
    overrides = [*TINY_RUN, "data.num_workers=0", "trainer.max_epochs=3", "callbacks.checkpoint.monitor=epoch",
                 "callbacks.checkpoint.mode=min", "callbacks.last.every_n_train_steps=4"]
    trainer, model, dm = build(compose_run(first, *overrides))
    last_cb = next(c for c in trainer.callbacks if isinstance(c, LastCheckpoint))
    saved_before_step = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            saved_before_step.append(last_cb.saved_step)

    trainer.callbacks.append(Spy())
    with one_torch_thread():
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 18
    # every 4 steps (step 12 is an epoch's last: saved after its validation), and every epoch end
    assert sorted({s for s in saved_before_step if s is not None}) == [4, 6, 8, 12, 16]
    assert last_ckpt(first)["global_step"] == 18 and last_ckpt(first)["epoch"] == 2
    assert Path(trainer.checkpoint_callback.best_model_path).name.startswith("epoch00-")

    second = tmp_path / "second"
    metrics = train_in_process(second, *overrides, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    assert metrics["global_step"] == 18.0  # nothing retrained
    assert metrics["best/epoch"] == 0.0  # the best score survives the move to a new folder
    assert not list((second / "checkpoints").glob("epoch*.ckpt"))  # ... and its file stays in the first folder


@pytest.mark.parametrize("limit", ["0", "0.5"])
def test_without_scored_verification_pairs_the_training_loss_is_monitored(demo_env, tmp_path, caplog, limit):
    """No pairs scored (validation off, or limited to part of each set): no "could not find the monitored
    key" warning (an error once validation ran), the training loss chooses the best checkpoint."""
    import warnings

    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO", logger="facemargin.train"):
        warnings.simplefilter("always")
        metrics = train_in_process(tmp_path, *TINY_RUN, "data.num_workers=0", "trainer.max_epochs=1",
                                   f"trainer.limit_val_batches={limit}", "val_batch_size=8")
    assert not [w for w in caught if "could not find the monitored key" in str(w.message)]
    assert f"no verification pairs are scored in this run (trainer.limit_val_batches={limit}" in caplog.text
    assert "callbacks.checkpoint keeps the checkpoint with the lowest train/loss_epoch instead of the highest val/acc" in caplog.text
    assert metrics["best/train/loss_epoch"] == pytest.approx(metrics["train/loss_epoch"])
    (best,) = (tmp_path / "checkpoints").glob("epoch00-loss*.ckpt")
    assert caplog.text.count(f"best checkpoint: {best}") == 1
    assert f"metrics: {tmp_path / 'metrics.json'}" in caplog.text


def test_a_backbone_without_embedding_size_is_measured_by_one_forward():
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.Flatten(), torch.nn.LazyLinear(37))
    backbone.eval()
    model = FaceRecognitionModule(backbone, head=MarginHead, num_classes=5)
    assert model.embedding_size == 37 and model.head.weight.shape == (5, 37)
    assert not backbone.training  # its mode is left as it was
    assert all(p.grad is None for p in backbone.parameters())

    with pytest.raises(ValueError, match=r"must map images \[B, 3, 112, 112\] to embeddings \[B, D\]"):
        FaceRecognitionModule(torch.nn.Conv2d(3, 4, 3), head=MarginHead, num_classes=5)


def test_demo_set_generation_says_where_and_when_it_is_ready(tmp_path, caplog):
    from facemargin.data.tools.synthetic import ensure_demo_dataset

    small = dict(num_identities=3, images_per_identity=2, num_val_identities=2, num_val_pairs=10, image_size=32)
    with caplog.at_level("INFO", logger="facemargin.data.tools.synthetic"):
        root = ensure_demo_dataset(tmp_path, **small)
        assert ensure_demo_dataset(tmp_path, **small) == root  # generated once; the second call is silent
    assert caplog.text.count(f"generating the demo face set once into {root}: 3 identities x 2 images + "
                             "10 verification pairs") == 1
    assert caplog.text.count("demo face set ready in ") == 1 and caplog.text.rstrip().endswith(str(root))


def test_a_missing_checkpoint_is_named_before_anything_is_built(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^ckpt_path=.*nope\.ckpt: no such checkpoint$"):
        train_in_process(tmp_path, f"ckpt_path={tmp_path / 'nope.ckpt'}")
