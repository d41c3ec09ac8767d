"""PartialFCHead inside a real Lightning ``Trainer``: 2-process DDP (gloo, CPU) fit, checkpoint,
resume at world 2, then resume at world 1 (re-shard); centres, optimizer rows, the margin's
running statistic (CurricularFace ``t``) and the sampling counter all come back exactly.

The two ranks are started the way ``torchrun`` starts them (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``
in the environment, ``strategy="ddp"``), so Lightning launches nothing itself.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import lightning as L
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from facemargin.distributed import exclude_from_ddp
from facemargin.heads import PartialFCHead
from facemargin.heads.sharding import FULL_STATE_PREFIX

D, C, WORLD = 8, 12, 2
MOM = FULL_STATE_PREFIX + "momentum_buffer"


class TinyFace(L.LightningModule):
    """Linear backbone + sampled Partial FC head, wired through the head hooks exactly as
    docs/multi_gpu.md says."""

    def __init__(self, out_dir: str, tag: str) -> None:
        super().__init__()
        self.backbone = nn.Linear(6, D)
        self.head = PartialFCHead(D, C, margin="curricularface", sample_rate=0.5, seed=21)
        self.out_dir, self.tag = Path(out_dir), tag

    def setup(self, stage: str) -> None:
        self.head.setup_distributed()
        exclude_from_ddp(self, [f"head.{n}" for n in self.head.ddp_ignored_parameters()])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.head.output(self.backbone(x), y)
        self.log_dict({f"train/{k}": v for k, v in out.logs.items()})
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.head.attach_optimizer(opt)
        return opt

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.head.on_save_checkpoint(checkpoint, "head.", self.trainer.optimizers)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.head.on_load_checkpoint(checkpoint, "head.")

    def _snapshot(self, when: str) -> None:
        opt = self.trainer.optimizers[0]
        state = opt.state.get(self.head.weight_active, {})
        record = {
            "global_step": self.trainer.global_step,
            "shard": self.head.weight.detach().clone(),
            "start": self.head.start,
            "momentum": state[MOM].clone() if MOM in state else None,
            "backbone": self.backbone.weight.detach().clone(),
            "t": self.head.margin.t.clone(),
            "sample_step": int(self.head.sample_step),
        }
        ddp = self.trainer.strategy.model
        if isinstance(ddp, nn.parallel.DistributedDataParallel):
            record["ignored"] = sorted(ddp.parameters_to_ignore)
            record["head_in_reducer"] = any(
                p is self.head.weight_active for p in ddp._module_parameters
            )
            record["flag_ignored"] = bool(getattr(self.head.weight_active, "_ddp_ignored", False))
        torch.save(record, self.out_dir / f"{self.tag}_{when}_rank{self.global_rank}.pt")

    def on_train_start(self) -> None:
        self._snapshot("start")

    def on_train_end(self) -> None:
        self._snapshot("end")


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g)
    y = torch.tensor([0, 1, 6, 7])[torch.randint(0, 4, (32,), generator=g)]  # <= 2 positives per shard
    return DataLoader(TensorDataset(x, y), batch_size=2, shuffle=False, drop_last=True)


def trainer(devices: int, max_steps: int, root: Path) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
    )


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0",
    )
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    root = Path(out)
    t = trainer(WORLD, 3, root)
    t.fit(TinyFace(out, "fit"), loader())
    t.save_checkpoint(root / "step3.ckpt")  # every rank calls; rank 0 writes
    t2 = trainer(WORLD, 5, root)
    t2.fit(TinyFace(out, "resume2"), loader(), ckpt_path=root / "step3.ckpt")
    if torch.distributed.is_initialized():  # gloo's threads stopped before exit (else a rare SIGABRT at teardown)
        torch.distributed.destroy_process_group()


def load(out: Path, name: str) -> dict:
    return torch.load(out / f"{name}.pt", weights_only=False)


def test_lightning_ddp_fit_checkpoint_resume(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)

    # (a) DDP left the shards alone: excluded from the reducer, different per rank
    fit = [load(tmp_path, f"fit_end_rank{r}") for r in range(WORLD)]
    for rec in fit:
        assert rec["global_step"] == 3
        assert rec["ignored"] == ["head.weight", "head.weight_active"]
        assert not rec["head_in_reducer"] and rec["flag_ignored"]
        assert rec["momentum"] is not None and rec["momentum"].shape == (C // WORLD, D)
        assert rec["sample_step"] == 3 and rec["t"].item() != 0.0
    assert fit[0]["start"] == 0 and fit[1]["start"] == C // WORLD
    assert torch.equal(fit[0]["t"], fit[1]["t"])  # the running statistic is the same on every rank
    assert not torch.equal(fit[0]["shard"], fit[1]["shard"])
    assert torch.equal(fit[0]["backbone"], fit[1]["backbone"])  # the backbone is still synced

    # (b) the checkpoint holds all centres and their momentum rows
    ckpt = torch.load(tmp_path / "step3.ckpt", weights_only=False)
    full = torch.cat([rec["shard"] for rec in fit])
    full_mom = torch.cat([rec["momentum"] for rec in fit])
    assert torch.equal(ckpt["state_dict"]["head.weight"], full)
    assert "head.weight_active" not in ckpt["state_dict"]
    pid = ckpt["partial_fc"]["head.weight"]["optimizer_states"][0]["param_id"]
    assert torch.equal(ckpt["optimizer_states"][0]["state"][pid][MOM], full_mom)

    # (c) resume at world 2: step continues, every shard and its optimizer rows restored
    for r in range(WORLD):
        start = load(tmp_path, f"resume2_start_rank{r}")
        end = load(tmp_path, f"resume2_end_rank{r}")
        assert start["global_step"] == 3 and end["global_step"] == 5
        assert torch.equal(start["shard"], fit[r]["shard"])
        assert torch.equal(start["momentum"], fit[r]["momentum"])
        assert torch.equal(start["t"], fit[r]["t"]) and start["sample_step"] == 3 and end["sample_step"] == 5
        assert not torch.equal(end["shard"], start["shard"])

    # (c') resume in one process: re-shard 2 -> 1
    one = trainer(1, 5, tmp_path)
    one.fit(TinyFace(str(tmp_path), "resume1"), loader(), ckpt_path=tmp_path / "step3.ckpt")
    start = load(tmp_path, "resume1_start_rank0")
    end = load(tmp_path, "resume1_end_rank0")
    assert start["global_step"] == 3 and end["global_step"] == 5
    assert torch.equal(start["shard"], full) and torch.equal(start["momentum"], full_mom)
    assert torch.equal(start["backbone"], fit[0]["backbone"])
    assert torch.equal(start["t"], fit[0]["t"]) and start["sample_step"] == 3
    assert torch.isfinite(end["shard"]).all() and not torch.equal(end["shard"], full)
