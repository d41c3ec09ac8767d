"""Every loss trains through the train entry point (``facemargin.train.build`` on a Hydra-composed
config) on 2 CPU processes started the way torchrun starts them: with the default head and with
``head=partial_fc``, ``loss.dynamic=balanced`` included; so do the head's other axes
(``loss=expface head.objective=uniface``, ``head.subcenters=3``); an adaptive loss resumes with
every buffer restored exactly; a user's own head class (``head._target_=custom_head.MyHead``)
trains with no facemargin change. One spawn for all of it; the parent asserts on what the ranks
recorded.
"""

from __future__ import annotations

import math
import os
import socket
import traceback
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir

from facemargin.data.tools.synthetic import ensure_demo_dataset
from facemargin.margins import available_margins
from facemargin.train import build, config_dir

pytestmark = pytest.mark.slow

WORLD = 2
DEMO = {"num_identities": 32, "images_per_identity": 4, "num_val_identities": 10, "num_val_pairs": 20}
COMMON = [
    "trainer.accelerator=cpu", f"trainer.devices={WORLD}", "trainer.strategy=ddp", "trainer.max_epochs=1",
    "trainer.limit_train_batches=2", "trainer.limit_val_batches=0", "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false", "backbone.embedding_size=64", "data.num_workers=0", "data.batch_size=4",
    *[f"+data.demo_options.{k}={v}" for k, v in DEMO.items()], "logger=none",
]
LOSSES = [[f"loss={n}"] for n in available_margins()] + [
    [f"loss={n}", "loss.dynamic=balanced"] for n in ("expface", "cosface", "arcface", "sphereface")
]
HEADS = ["head=default", "head=partial_fc"]
#: the head's subcenters and objective axes: overrides, extra logged keys, centre rows per class
AXES = [
    (["loss=expface", "head.objective=uniface"], {"train/uce", "train/uniface_b"}, 1),
    (["head.subcenters=3"], {"train/ce"}, 3),
]
#: what each loss adds to train/loss, train/ce in the logs
EXTRA_LOGS = {"curricularface": {"train/t"}, "adaface": {"train/batch_mean", "train/batch_std"},
              "magface": {"train/magface_g"}, "dynamic": {"train/m"}}
RESUME = ["loss=adaface", "head=partial_fc", "head.sample_rate=0.75"]


def compose_cfg(out: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=[*COMMON, f"output_dir={out}", *overrides])


def head_state(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """Every buffer of the head (margin statistics, sampling counters, sampled centres)."""
    return {n: b.detach().clone() for n, b in module.head.named_buffers()}


class Record(pl.Callback):
    """What a rank saw: global step, the logged keys and values, the head's buffers."""

    def __init__(self) -> None:
        self.start: dict = {}
        self.end: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {"step": trainer.global_step, "buffers": head_state(pl_module)}

    def on_train_end(self, trainer, pl_module) -> None:
        self.end = {
            "step": trainer.global_step,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
            "buffers": head_state(pl_module),
            "head": type(pl_module.head).__name__,
            "calls": getattr(pl_module.head, "calls", None),
            "weight_rows": getattr(pl_module.head, "weight", torch.empty(0)).shape[0],
        }


def fit(out: Path, overrides: list[str], ckpt_path: str | None = None, save: Path | None = None) -> Record:
    cfg = compose_cfg(out, overrides + ["callbacks=none"])
    trainer, model, dm = build(cfg)
    rec = Record()
    trainer.callbacks.append(rec)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)  # every rank: the head consolidates its shards
    return rec


def _worker(rank: int, port: int, tmp: str, cache: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0", FACEMARGIN_CACHE=cache, WANDB_MODE="offline",
    )
    torch.set_num_threads(1)
    out, results = Path(tmp), {}
    cases = [(loss, head) for loss in LOSSES + [axis for axis, _, _ in AXES] for head in HEADS]
    for loss, head in cases:
        key = " ".join([*loss, head])
        try:
            rec = fit(out / "runs", [*loss, head])
            results[key] = rec.end
        except Exception:
            results[key] = {"error": traceback.format_exc()}
    try:  # resume an adaptive loss (sampled Partial FC): every buffer comes back exactly
        first = fit(out / "first", RESUME, save=out / "first.ckpt")
        resumed = fit(out / "second", [*RESUME, "trainer.max_epochs=2"], ckpt_path=str(out / "first.ckpt"))
        results["resume"] = {"first": first.end, "second_start": resumed.start, "second_end": resumed.end}
    except Exception:
        results["resume"] = {"error": traceback.format_exc()}
    try:  # a user's own head, no facemargin code involved
        rec = fit(out / "custom", ["head._target_=custom_head.MyHead", "~head.margin", "~head.subcenters", "~head.objective",
                                         "+head.scale=8.0"])
        results["custom"] = rec.end
    except Exception:
        results["custom"] = {"error": traceback.format_exc()}
    torch.save(results, out / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("heads_train")
    cache = tmp / "cache"
    ensure_demo_dataset(cache, **DEMO)  # once, before the ranks read it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp), str(cache)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _ok(res: dict, key: str) -> dict:
    assert "error" not in res[key], f"{key}:\n{res[key].get('error')}"
    return res[key]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("loss", LOSSES, ids=" ".join)
def test_every_loss_trains_on_two_processes(ranks, loss, head) -> None:
    key = " ".join([*loss, head])
    name = loss[0].split("=")[1]
    per_rank = [_ok(res, key) for res in ranks]
    want_logs = {"train/loss", "train/ce"} | EXTRA_LOGS.get("dynamic" if len(loss) > 1 else name, set())
    for rec in per_rank:
        assert rec["step"] == 2
        assert want_logs <= set(rec["metrics"]), (key, sorted(rec["metrics"]))
        assert all(torch.isfinite(torch.tensor(rec["metrics"][k])) for k in want_logs), rec["metrics"]
        assert rec["head"] == ("PartialFCHead" if head == "head=partial_fc" else "MarginHead")
    # the centres are sharded under Partial FC (32 identities: 16 + 16), whole otherwise
    assert [r["weight_rows"] for r in per_rank] == ([16, 16] if head == "head=partial_fc" else [32, 32])
    # the margins' running statistics (and the loss) are the same on every rank
    a, b = per_rank
    assert a["buffers"].keys() == b["buffers"].keys()
    assert all(torch.equal(a["buffers"][k], b["buffers"][k]) for k in a["buffers"])
    # the logged statistics too; loss terms are global means under Partial FC, each rank's own
    # rows' means with the data-parallel MarginHead
    shared = want_logs - {"train/loss", "train/ce", "train/magface_g"}
    for k in shared | ({"train/ce", "train/magface_g"} & want_logs if head == "head=partial_fc" else set()):
        assert a["metrics"][k] == pytest.approx(b["metrics"][k], rel=1e-6), k


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("axis", AXES, ids=lambda a: " ".join(a[0]))
def test_subcenters_and_uniface_train_on_two_processes(ranks, axis, head) -> None:
    overrides, logs, per_class = axis
    per_rank = [_ok(res, " ".join([*overrides, head])) for res in ranks]
    for rec in per_rank:
        assert rec["step"] == 2 and {"train/loss"} | logs <= set(rec["metrics"]), sorted(rec["metrics"])
        assert all(torch.isfinite(torch.tensor(rec["metrics"][k])) for k in {"train/loss"} | logs)
    rows = [16 * per_class, 16 * per_class] if head == "head=partial_fc" else [32 * per_class] * 2
    assert [r["weight_rows"] for r in per_rank] == rows
    if "train/uniface_b" in logs:  # UniFace's bias: one value, the same on every rank, trained
        a, b = (r["metrics"]["train/uniface_b"] for r in per_rank)
        assert a == b and a != pytest.approx(math.log(10 * 32), abs=1e-7)


def test_adaptive_loss_resumes_with_every_buffer(ranks) -> None:
    for res in ranks:
        rec = _ok(res, "resume")
        first, start, end = rec["first"], rec["second_start"], rec["second_end"]
        assert first["step"] == 2 and start["step"] == 2 and end["step"] == 4
        assert set(start["buffers"]) == {"sample_seed", "sample_step", "weight", "margin.batch_mean", "margin.batch_std"}
        for name, value in first["buffers"].items():
            assert torch.equal(start["buffers"][name], value), name  # restored exactly
        assert int(start["buffers"]["sample_step"]) == 2 and int(end["buffers"]["sample_step"]) == 4
        assert not torch.equal(end["buffers"]["margin.batch_mean"], start["buffers"]["margin.batch_mean"])


def test_users_own_head_trains_unchanged(ranks) -> None:
    for res in ranks:
        rec = _ok(res, "custom")
        assert rec["head"] == "MyHead" and rec["step"] == 2 and rec["calls"] == 2
        assert set(rec["metrics"]) >= {"train/loss"} and torch.isfinite(torch.tensor(rec["metrics"]["train/loss"]))
