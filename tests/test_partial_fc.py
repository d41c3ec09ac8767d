"""PartialFCHead with real 2-process gloo collectives on CPU.

One spawned process group (module-scoped fixture) runs every distributed scenario and writes
its numbers to disk; the tests below assert on them. The single-process references (a
``MarginHead`` holding every centre, on the concatenated global batch) are computed in the parent
before the spawn. "Equal" means ``max|a - b| <= 1e-5 * (1 + max|b|)``.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from facemargin.distributed import exclude_from_ddp
from facemargin.heads import MarginHead, PartialFCHead
from facemargin.heads.sharding import FULL_STATE_PREFIX, consolidate, init_rows, shard_bounds

WORLD = 2
D = 8
C = 11  # uneven shards: 5 and 6
TOL = 1e-5
STEPS = 3

#: every loss, the dynamic options included: (label, margin, parameters)
LOSSES: list[tuple[str, str, dict]] = [
    ("softmax", "softmax", {}),
    ("sphereface", "sphereface", {}),
    ("cosface", "cosface", {}),
    ("arcface", "arcface", {}),
    ("arcface/fallback/exact", "arcface", {"fallback": True, "grad": "exact"}),
    ("combined", "combined", {"m1": 0.9, "m2": 0.4, "m3": 0.15}),
    ("expface", "expface", {}),
    ("expface/exact", "expface", {"grad": "exact"}),
    *[(f"{n}/{d}", n, {"dynamic": d}) for n in ("expface", "cosface", "arcface", "sphereface") for d in ("balanced", "plain")],
    ("curricularface", "curricularface", {}),
    ("adaface", "adaface", {}),
    ("magface", "magface", {}),
    ("sphereface_r", "sphereface_r", {}),
]
# each rank gets 4 rows; both ranks have 3 labelled rows (row-split MarginHead compares averages)
LABELS = torch.tensor([[0, 4, -1, 10, 3, 7, -1, 1], [6, 9, 5, -1, 2, -1, 8, 8], [1, 1, 2, -1, -1, 10, 4, 0]])


def batch(step: int) -> torch.Tensor:
    """The global batch of ``step``: norms spread over MagFace's and AdaFace's ranges."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, D, generator=g)
    return x * torch.tensor([0.5, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 3.0]).unsqueeze(1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).abs().max() / (1.0 + b.abs().max()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def buffers(head: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in head.margin.named_buffers()}


def train_head(head: nn.Module, rows: slice, average_grads: bool = False) -> list[dict]:
    """``STEPS`` SGD steps of ``head`` on rows ``rows`` of each global batch; per-step records."""
    opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
    records = []
    for step in range(STEPS):
        x = batch(step)[rows].clone().requires_grad_()
        opt.zero_grad()
        out = head.output(x, LABELS[step][rows])
        out.loss.backward()
        if average_grads:  # what DDP does for a replicated head
            dist.all_reduce(head.weight.grad)
            head.weight.grad /= WORLD
        records.append({
            "loss": out.loss.detach(), "xgrad": x.grad.clone(), "wgrad": head.weight.grad.clone(),
            "buffers": buffers(head), "logs": {k: v.clone() for k, v in out.logs.items()},
        })
        opt.step()
    return records


def reference_runs() -> dict[str, list[dict]]:
    """Single process, every centre, the global batch: the numbers the sharded runs must give."""
    out = {}
    for label, margin, params in LOSSES:
        head = MarginHead(D, C, margin=margin, **params)
        with torch.no_grad():
            head.weight.copy_(init_rows(0, C, C, D, seed=5))
        out[label] = train_head(head, slice(None))
    return out


# ----------------------------------------------------------------------------- scenarios
def scenario_every_loss(rank: int, tmp: Path) -> dict:
    """Partial FC (sharded centres) and a row-split MarginHead (DDP layout) vs the reference."""
    ref = torch.load(tmp / "reference.pt", weights_only=False)
    out: dict = {}
    mine = slice(rank * 4, (rank + 1) * 4)
    for label, margin, params in LOSSES:
        head = PartialFCHead(D, C, margin=margin, seed=5, **params)
        assert head.weight.shape[0] == (5 if rank == 0 else 6)
        for step, (got, want) in enumerate(zip(train_head(head, mine), ref[label])):
            key = f"{label}/step{step}"
            out[f"pfc/loss/{key}"] = rel_err(got["loss"], want["loss"])
            # ddp_grad_scale=True: world x dL/dx, so DDP's mean gives the single-process grad
            out[f"pfc/xgrad/{key}"] = rel_err(got["xgrad"] / WORLD, want["xgrad"][mine])
            out[f"pfc/wgrad/{key}"] = rel_err(got["wgrad"], want["wgrad"][head.start:head.stop])
            for name, value in want["buffers"].items():
                out[f"pfc/buffer/{name}/{key}"] = rel_err(got["buffers"][name], value)
            for name, value in want["logs"].items():
                out[f"pfc/log/{name}/{key}"] = rel_err(got["logs"][name], value)
        # a MarginHead per rank holding its own rows and every centre, gradients averaged (DDP)
        row_head = MarginHead(D, C, margin=margin, **params)
        row_head.setup_distributed()
        with torch.no_grad():
            row_head.weight.copy_(init_rows(0, C, C, D, seed=5))
        for step, (got, want) in enumerate(zip(train_head(row_head, mine, average_grads=True), ref[label])):
            key = f"{label}/step{step}"
            mean_loss = got["loss"].clone()
            dist.all_reduce(mean_loss)
            out[f"rows/loss/{key}"] = rel_err(mean_loss / WORLD, want["loss"])
            out[f"rows/xgrad/{key}"] = rel_err(got["xgrad"] / WORLD, want["xgrad"][mine])
            out[f"rows/wgrad/{key}"] = rel_err(got["wgrad"], want["wgrad"])
            for name, value in want["buffers"].items():
                out[f"rows/buffer/{name}/{key}"] = rel_err(got["buffers"][name], value)
    return out


def scenario_uneven_and_bf16(rank: int) -> dict:
    out = {}
    x_glob, y_glob = batch(0), LABELS[0]
    # unscaled embedding gradient + unequal batch sizes (3 and 5 rows)
    head = PartialFCHead(D, C, margin="expface", seed=5, ddp_grad_scale=False)
    ref = MarginHead(D, C, margin="expface")
    with torch.no_grad():
        ref.weight.copy_(init_rows(0, C, C, D, seed=5))
    xr = x_glob.clone().requires_grad_()
    ref.loss(xr, y_glob).backward()
    lo, hi = (0, 3) if rank == 0 else (3, 8)
    x = x_glob[lo:hi].clone().requires_grad_()
    loss = head.loss(x, y_glob[lo:hi])
    loss.backward()
    out["unscaled_uneven/loss"] = rel_err(loss, ref.loss(x_glob, y_glob))
    out["unscaled_uneven/xgrad"] = rel_err(x.grad, xr.grad[lo:hi])
    out["unscaled_uneven/wgrad"] = rel_err(head.weight.grad, ref.weight.grad[head.start:head.stop])
    # bf16 autocast: embeddings arrive in bf16, the loss is still float32 math
    head = PartialFCHead(D, C, margin="arcface", seed=5)
    xb = x_glob.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head.loss(xb[rank * 4:(rank + 1) * 4], y_glob[rank * 4:(rank + 1) * 4])
    out["bf16/dtype_is_float32"] = loss.dtype == torch.float32
    ref = MarginHead(D, C, margin="arcface")
    with torch.no_grad():
        ref.weight.copy_(init_rows(0, C, C, D, seed=5))
    out["bf16/loss"] = rel_err(loss, ref.loss(xb.float(), y_glob))
    # a global batch without labels: 0 on every rank, zero gradient
    x = x_glob[rank * 4:(rank + 1) * 4].clone().requires_grad_()
    loss = PartialFCHead(D, C, margin="magface", seed=5).loss(x, torch.full((4,), -1))
    loss.backward()
    out["unlabelled_zero"] = loss.item() == 0.0 and not x.grad.any()
    return out


class Pair(nn.Module):
    """Backbone + two heads (plain and sampled) with running statistics, for names, prefixes
    and checkpoints."""

    def __init__(self, c: int = 12) -> None:
        super().__init__()
        self.backbone = nn.Linear(6, D)
        self.head = PartialFCHead(D, c, margin="curricularface", seed=11)
        self.sampled = PartialFCHead(D, c, margin="adaface", sample_rate=0.5, seed=12)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        e = self.backbone(x)
        return self.head.loss(e, y) + self.sampled.loss(e, y)

    def heads(self) -> list[tuple[str, PartialFCHead]]:
        return [("head.", self.head), ("sampled.", self.sampled)]

    def setup(self) -> list[str]:
        for _, h in self.heads():
            h.setup_distributed()
        return exclude_from_ddp(self, [p + n for p, h in self.heads() for n in h.ddp_ignored_parameters()])

    def save(self, ckpt: dict, opts: list, all_ranks: bool = False) -> None:
        for prefix, h in self.heads():
            consolidate(h, ckpt, prefix, opts, all_ranks=all_ranks)

    def load(self, ckpt: dict) -> None:
        for prefix, h in self.heads():
            h.on_load_checkpoint(ckpt, prefix)
        self.load_state_dict(ckpt["state_dict"])


def pair_reference(c: int, seed: int, margin: str) -> MarginHead:
    ref = MarginHead(D, c, margin=margin)
    with torch.no_grad():
        ref.weight.copy_(init_rows(0, c, c, D, seed))
    return ref


def state_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if not n.endswith(".weight")}


def train_pair(model: Pair, steps: int, gen_seed: int, rank: int, world: int) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.sampled.attach_optimizer(opt)
    g = torch.Generator().manual_seed(gen_seed)
    for _ in range(steps):
        x = torch.randn(4 * WORLD, 6, generator=g)
        y = torch.tensor([0, 1, 6, 7])[torch.randint(0, 4, (4 * WORLD,), generator=g)]
        per = x.shape[0] // world
        opt.zero_grad()
        model(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]).backward()
        opt.step()
    return opt


def scenario_ddp_backbone(rank: int) -> dict:
    """DDP-averaged backbone gradient == single-process gradient; DDP leaves the shards alone."""
    out = {}
    torch.manual_seed(3)  # same backbone init on both ranks
    model = Pair(c=12)
    ref_backbone = nn.Linear(6, D)
    ref_backbone.load_state_dict(model.backbone.state_dict())
    ref_head, ref_sampled = pair_reference(12, 11, "curricularface"), pair_reference(12, 12, "adaface")
    w_before = model.head.weight.detach().clone()
    out["ignore_names"] = sorted(model.setup())
    ddp = nn.parallel.DistributedDataParallel(model)
    out["shard_kept_after_ddp_init"] = torch.equal(model.head.weight, w_before)
    out["shards_not_in_reducer"] = all(
        p is not model.head.weight and p is not model.sampled.weight_active for p in ddp._module_parameters
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g)
    y = torch.tensor([0, 5, 6, 11, 3, 3, 9, -1])
    model.eval()  # sampled head: full shard, exact loss; no statistics update
    ref_head.eval(), ref_sampled.eval()
    loss = ddp(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])
    loss.backward()
    e = ref_backbone(x)
    ref_loss = ref_head.loss(e, y) + ref_sampled.loss(e, y)
    ref_loss.backward()
    out["loss"] = rel_err(loss, ref_loss)
    out["backbone_weight_grad"] = rel_err(model.backbone.weight.grad, ref_backbone.weight.grad)
    out["backbone_bias_grad"] = rel_err(model.backbone.bias.grad, ref_backbone.bias.grad)
    out["head_grad"] = rel_err(model.head.weight.grad, ref_head.weight.grad[model.head.start:model.head.stop])
    mine = model.head.weight.detach().clone()
    other = [torch.empty_like(mine) for _ in range(WORLD)]
    dist.all_gather(other, mine)
    out["shards_differ"] = not torch.equal(other[0], other[1])
    return out


def scenario_sampling(rank: int) -> dict:
    out: dict = {}
    c, rate = 40, 0.25  # C_local = 20, 5 active rows per rank
    for opt_name in ("sgd", "adamw"):
        head = PartialFCHead(D, c, margin="cosface", sample_rate=rate, seed=9)
        k = head.num_sample
        out["num_sample"] = k
        if opt_name == "sgd":
            opt = torch.optim.SGD([head.weight_active], lr=0.5, momentum=0.9, weight_decay=5e-4)
        else:
            opt = torch.optim.AdamW([head.weight_active], lr=0.05, weight_decay=0.1)
        head.attach_optimizer(opt)
        g = torch.Generator().manual_seed(4)
        ok_pos, ok_unsampled, ok_sampled, ok_state_rows, ok_swapin, ok_loss = [], [], [], [], [], []
        for step in range(4):
            x_glob = torch.randn(8, D, generator=g)
            y_glob = torch.randint(0, c, (8,), generator=g)
            y_glob[step] = -1
            w0 = head.weight.detach().clone()
            st = opt.state.get(head.weight_active, {})
            full0 = {k_: v.clone() for k_, v in st.items() if k_.startswith(FULL_STATE_PREFIX)}
            opt.zero_grad()
            torch.manual_seed(1000 * rank + step)  # the global RNG must not matter
            loss = head.loss(x_glob[rank * 4:(rank + 1) * 4], y_glob[rank * 4:(rank + 1) * 4])
            idx = head._active_index.clone()
            st = opt.state.get(head.weight_active, {})
            ok_swapin.append(all(torch.equal(st[k_[len(FULL_STATE_PREFIX):]], v[idx]) for k_, v in full0.items()))
            pos = y_glob[(y_glob >= head.start) & (y_glob < head.stop)] - head.start
            ok_pos.append(bool(torch.isin(pos, idx).all()))
            # the loss equals a single-process head over the union of the sampled classes
            glob_idx = idx + head.start
            all_idx = [torch.empty_like(glob_idx) for _ in range(WORLD)]
            dist.all_gather(all_idx, glob_idx)
            classes = torch.cat(all_idx)
            sub = MarginHead(D, classes.numel(), margin="cosface")
            with torch.no_grad():
                parts = [torch.empty(n, D) for n in (20, 20)]
                dist.all_gather(parts, w0)
                sub.weight.copy_(torch.cat(parts)[classes])
            remap = torch.full((c,), -1, dtype=torch.long)
            remap[classes] = torch.arange(classes.numel())
            y_sub = torch.where(y_glob >= 0, remap[y_glob.clamp_min(0)], y_glob)
            ok_loss.append(rel_err(loss, sub.loss(x_glob, y_sub)) < TOL)
            loss.backward()
            opt.step()
            mask = torch.zeros(head.num_local, dtype=torch.bool)
            mask[idx] = True
            w1 = head.weight.detach()
            ok_unsampled.append(torch.equal(w1[~mask], w0[~mask]))
            ok_sampled.append(bool((w1[mask] != w0[mask]).any(dim=1).all()))
            st = opt.state[head.weight_active]
            rows_ok = True
            for k_, v in st.items():
                if k_.startswith(FULL_STATE_PREFIX):
                    prev = full0.get(k_, torch.zeros_like(v))
                    rows_ok &= torch.equal(v[~mask], prev[~mask])
                    rows_ok &= torch.equal(v[mask], st[k_[len(FULL_STATE_PREFIX):]])
            ok_state_rows.append(rows_ok and any(k_.startswith(FULL_STATE_PREFIX) for k_ in st))
        out[f"{opt_name}/positives_sampled"] = all(ok_pos)
        out[f"{opt_name}/unsampled_unchanged"] = all(ok_unsampled)
        out[f"{opt_name}/sampled_changed"] = all(ok_sampled)
        out[f"{opt_name}/state_rows"] = all(ok_state_rows)
        out[f"{opt_name}/state_swapped_in"] = all(ok_swapin)
        out[f"{opt_name}/loss_matches_subset"] = all(ok_loss)
    # too many positives for the sample -> clear error on every rank
    head = PartialFCHead(D, c, sample_rate=0.1, seed=9)  # 2 rows per shard
    keep = torch.optim.SGD([head.weight_active], lr=0.1)  # the head only holds a weak reference
    head.attach_optimizer(keep)
    try:
        head.loss(torch.randn(4, D), torch.tensor([0, 1, 2, 3]) + 20 * rank)
        out["too_many_positives_raises"] = False
    except ValueError:
        out["too_many_positives_raises"] = True
    return out


def scenario_reshard(rank: int, tmp: Path) -> dict:
    out = {}
    torch.manual_seed(0)
    model = Pair(c=12)
    model.setup()
    opt = train_pair(model, steps=3, gen_seed=2, rank=rank, world=WORLD)
    ckpt = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}
    live_w = model.head.weight.detach().clone()
    model.save(ckpt, [opt])
    out["live_untouched"] = torch.equal(model.head.weight, live_w) and opt.state[model.head.weight][
        "momentum_buffer"
    ].shape[0] == model.head.num_local
    full_head = model.head.full_weight()
    full_sampled = model.sampled.full_weight()
    bufs = state_buffers(model)
    if rank == 0:
        out["rank0_full"] = torch.equal(ckpt["state_dict"]["head.weight"], full_head) and torch.equal(
            ckpt["state_dict"]["sampled.weight"], full_sampled
        )
        torch.save(ckpt, tmp / "ckpt_world2.pt")
        torch.save({"head": full_head, "sampled": full_sampled, "buffers": bufs}, tmp / "full_world2.pt")
    # every rank's running statistics and sampling counters are the same
    gathered: list = [None] * WORLD
    dist.all_gather_object(gathered, bufs)
    out["buffers_identical_on_ranks"] = all(torch.equal(gathered[0][k], gathered[1][k]) for k in bufs)
    out["buffers_trained"] = bufs["head.margin.t"].item() != 0 and bufs["sampled.sample_step"].item() == 3
    # everyone has the full tensors with all_ranks=True
    ckpt_all = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}
    model.save(ckpt_all, [opt], all_ranks=True)
    out["all_ranks_full"] = torch.equal(ckpt_all["state_dict"]["head.weight"], full_head)
    dist.barrier()
    # same-world resume: a fresh model loads the consolidated checkpoint exactly
    ckpt = torch.load(tmp / "ckpt_world2.pt", weights_only=False)
    fresh = Pair(c=12)
    fresh.setup()
    fresh.load(ckpt)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt2.load_state_dict(ckpt["optimizer_states"][0])
    out["same_world_weights"] = torch.equal(fresh.head.weight, model.head.weight) and torch.equal(
        fresh.sampled.weight, model.sampled.weight
    )
    out["same_world_buffers"] = all(torch.equal(v, bufs[k]) for k, v in state_buffers(fresh).items())
    out["same_world_momentum"] = torch.equal(
        opt2.state[fresh.head.weight]["momentum_buffer"], opt.state[model.head.weight]["momentum_buffer"]
    ) and torch.equal(
        opt2.state[fresh.sampled.weight_active][FULL_STATE_PREFIX + "momentum_buffer"],
        opt.state[model.sampled.weight_active][FULL_STATE_PREFIX + "momentum_buffer"],
    )
    # ... and trains on exactly like the uninterrupted model (same samples, same statistics)
    train_pair(model, steps=2, gen_seed=5, rank=rank, world=WORLD)
    fresh.sampled.attach_optimizer(opt2)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        x = torch.randn(8, 6, generator=g)
        y = torch.tensor([0, 1, 6, 7])[torch.randint(0, 4, (8,), generator=g)]
        opt2.zero_grad()
        fresh(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]).backward()
        opt2.step()
    # (the uninterrupted model continued with a fresh optimizer: compare what resume restores)
    out["resumed_samples_like_uninterrupted"] = torch.equal(fresh.sampled._active_index, model.sampled._active_index)
    # 1 -> 2: a checkpoint written by a single process (prepared by the fixture)
    ref = torch.load(tmp / "ckpt_world1.pt", weights_only=False)
    full = torch.load(tmp / "world1_full.pt", weights_only=False)
    m2 = Pair(c=12)
    m2.setup()
    m2.load(ref)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    o2.load_state_dict(ref["optimizer_states"][0])
    s, e = m2.head.start, m2.head.stop
    out["from_world1_weights"] = torch.equal(m2.head.weight, full["head"][s:e]) and torch.equal(
        m2.sampled.weight, full["sampled"][s:e]
    )
    out["from_world1_buffers"] = all(torch.equal(v, full["buffers"][k]) for k, v in state_buffers(m2).items())
    out["from_world1_momentum"] = torch.equal(
        o2.state[m2.head.weight]["momentum_buffer"], full["head_mom"][s:e]
    ) and torch.equal(
        o2.state[m2.sampled.weight_active][FULL_STATE_PREFIX + "momentum_buffer"], full["sampled_mom"][s:e]
    )
    train_pair(m2, steps=1, gen_seed=5, rank=rank, world=WORLD)
    out["from_world1_trains"] = bool(torch.isfinite(m2.head.weight).all())
    return out


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results: dict = {}
    for name, fn in [
        ("every_loss", lambda: scenario_every_loss(rank, Path(tmp))),
        ("uneven", lambda: scenario_uneven_and_bf16(rank)),
        ("ddp", lambda: scenario_ddp_backbone(rank)),
        ("sampling", lambda: scenario_sampling(rank)),
        ("reshard", lambda: scenario_reshard(rank, Path(tmp))),
    ]:
        try:
            results[name] = fn()
        except Exception:  # recorded, asserted in the main process
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
    torch.save(results, Path(tmp) / f"results_{rank}.pt")
    dist.destroy_process_group()


def _world1_checkpoint(tmp: Path) -> None:
    """A checkpoint written by a single process (no process group) for the 1 -> 2 test."""
    torch.manual_seed(0)
    model = Pair(c=12)
    opt = train_pair(model, steps=2, gen_seed=7, rank=0, world=1)
    ckpt = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}
    model.save(ckpt, [opt])
    torch.save(ckpt, tmp / "ckpt_world1.pt")
    torch.save(
        {
            "head": model.head.weight.detach().clone(),
            "sampled": model.sampled.weight.clone(),
            "head_mom": opt.state[model.head.weight]["momentum_buffer"].clone(),
            "sampled_mom": opt.state[model.sampled.weight_active][FULL_STATE_PREFIX + "momentum_buffer"].clone(),
            "buffers": state_buffers(model),
        },
        tmp / "world1_full.pt",
    )


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    tmp = tmp_path_factory.mktemp("pfc")
    torch.save(reference_runs(), tmp / "reference.pt")
    _world1_checkpoint(tmp)
    mp.spawn(_worker, args=(free_port(), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"results_{r}.pt", weights_only=False) for r in range(WORLD)], tmp


def _scenario(dist_results: tuple[list[dict], Path], name: str) -> list[dict]:
    per_rank = [res[name] for res in dist_results[0]]
    for r, res in enumerate(per_rank):
        assert "error" not in res, f"rank {r}:\n{res.get('error')}"
    return per_rank


# ----------------------------------------------------------------------------- tests
def test_shard_bounds() -> None:
    assert [shard_bounds(11, r, 2) for r in range(2)] == [(0, 5), (5, 11)]
    assert [shard_bounds(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert shard_bounds(7, 0, 1) == (0, 7)
    with pytest.raises(ValueError):
        shard_bounds(1, 0, 2)
    with pytest.raises(ValueError):
        shard_bounds(10, 2, 2)


def test_init_does_not_depend_on_sharding() -> None:
    full = init_rows(0, 70000, 70000, 4, seed=3)
    parts = [init_rows(*shard_bounds(70000, r, 3), 70000, 4, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), full)
    assert torch.equal(torch.cat([init_rows(0, 5, 11, 4, 3), init_rows(5, 11, 11, 4, 3)]), init_rows(0, 11, 11, 4, 3))
    assert torch.equal(PartialFCHead(4, 70000, seed=3).weight.detach(), full)


def test_single_process_equals_margin_head() -> None:
    x = torch.randn(6, D, requires_grad=True)
    y = torch.tensor([0, 3, -1, 9, 3, 1])
    head = PartialFCHead(D, 10, margin="expface", grad="exact", seed=1)
    ref = pair_reference(10, 1, "expface")
    ref.margin.grad = "exact"
    xr = x.detach().clone().requires_grad_()
    head(x, y).backward()
    ref.loss(xr, y).backward()
    assert rel_err(x.grad, xr.grad) < TOL
    assert rel_err(head.weight.grad, ref.weight.grad) < TOL
    assert rel_err(head.to_margin_head().weight, ref.weight) == 0.0


def test_hooks_name_the_shards() -> None:
    model = Pair()
    assert model.head.ddp_ignored_parameters() == ["weight"]
    assert model.sampled.ddp_ignored_parameters() == ["weight", "weight_active"]
    assert list(model.head.grad_clip_parameters()) == []
    model._ddp_params_and_buffers_to_ignore = ["backbone.bias"]
    names = model.setup()
    assert names == ["backbone.bias", "head.weight", "sampled.weight", "sampled.weight_active"]
    assert getattr(model.head.weight, "_ddp_ignored", False)
    assert "sampled.weight_active" not in model.state_dict()  # per-step scratch, never saved
    assert {"sampled.sample_seed", "sampled.sample_step", "head.margin.t"} <= set(model.state_dict())


def test_sampled_head_requires_attached_optimizer() -> None:
    head = PartialFCHead(D, 20, sample_rate=0.5)
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        head.loss(torch.randn(2, D), torch.tensor([1, 2]))
    head.eval()
    assert torch.isfinite(head.loss(torch.randn(2, D), torch.tensor([1, 2])))  # eval: full shard


def _sampled_run(seed: int, steps: int, state: dict | None = None) -> tuple[PartialFCHead, list[torch.Tensor], dict]:
    head = PartialFCHead(D, 40, margin="curricularface", sample_rate=0.25, seed=seed)
    opt = torch.optim.SGD([head.weight_active], lr=0.5, momentum=0.9)
    head.attach_optimizer(opt)
    start = 0
    if state is not None:
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    picks = []
    for step in range(start, start + steps):
        torch.manual_seed(12345 + 7 * step + (0 if state is None else 99))  # the global RNG must not matter
        g = torch.Generator().manual_seed(step)
        opt.zero_grad()
        head.loss(torch.randn(4, D, generator=g), torch.randint(0, 40, (4,), generator=g)).backward()
        opt.step()
        picks.append(head._active_index.clone())
    saved = {"head": head.state_dict(), "opt": opt.state_dict(), "step": start + steps}
    return head, picks, saved


def test_sampling_is_a_function_of_seed_step_and_rank() -> None:
    _, picks, _ = _sampled_run(seed=5, steps=4)
    _, again, _ = _sampled_run(seed=5, steps=4)
    assert all(torch.equal(a, b) for a, b in zip(picks, again))
    assert len({tuple(p.tolist()) for p in picks}) == 4  # a new sample every step
    _, other, _ = _sampled_run(seed=6, steps=4)
    assert not all(torch.equal(a, b) for a, b in zip(picks, other))
    # resume after 2 steps (state dict + optimizer state): steps 3 and 4 sample as uninterrupted
    _, _, saved = _sampled_run(seed=5, steps=2)
    resumed, rest, _ = _sampled_run(seed=0, steps=2, state=saved)  # the saved seed wins
    assert resumed.seed == 5 and int(resumed.sample_step) == 4
    assert all(torch.equal(a, b) for a, b in zip(picks[2:], rest))


def test_every_loss_two_ranks_equal_one_process(dist_results) -> None:
    """Partial FC at world 2 == one process with every centre, for every loss, over 3 optimizer
    steps: loss, embedding and centre gradients, running statistics and logged values. The same
    for a data-parallel MarginHead after setup_distributed (each rank its own rows)."""
    for r, res in enumerate(_scenario(dist_results, "every_loss")):
        for label, _, _ in LOSSES:
            assert f"pfc/loss/{label}/step{STEPS - 1}" in res and f"rows/loss/{label}/step{STEPS - 1}" in res
        stats = [k for k in res if "/buffer/" in k]
        assert len(stats) == 2 * STEPS * 3  # t, batch_mean, batch_std, for both layouts
        assert len([k for k in res if k.startswith("pfc/log/m/")]) == 8 * STEPS  # the dynamic m
        bad = {k: v for k, v in res.items() if not v < TOL}
        assert not bad, (r, bad)


def test_uneven_batches_bf16_and_unlabelled(dist_results) -> None:
    for r, res in enumerate(_scenario(dist_results, "uneven")):
        assert res.pop("bf16/dtype_is_float32") is True and res.pop("unlabelled_zero") is True
        for key, value in res.items():
            assert value < TOL, (r, key, value)


def test_ddp_backbone_gradient_and_untouched_shards(dist_results) -> None:
    for r, res in enumerate(_scenario(dist_results, "ddp")):
        assert res["ignore_names"] == ["head.weight", "sampled.weight", "sampled.weight_active"]
        assert res["shard_kept_after_ddp_init"] and res["shards_not_in_reducer"], r
        assert res["shards_differ"]
        assert res["backbone_weight_grad"] < TOL and res["backbone_bias_grad"] < TOL, res
        assert res["head_grad"] < TOL and res["loss"] < TOL, res


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_sampling_updates_only_sampled_rows(dist_results, opt_name: str) -> None:
    for r, res in enumerate(_scenario(dist_results, "sampling")):
        assert res["num_sample"] == 5
        for check in ("positives_sampled", "unsampled_unchanged", "sampled_changed", "state_rows",
                      "state_swapped_in", "loss_matches_subset"):
            assert res[f"{opt_name}/{check}"] is True, (r, check)
        assert res["too_many_positives_raises"] is True


def test_checkpoint_same_world_and_one_to_two(dist_results) -> None:
    res0, res1 = _scenario(dist_results, "reshard")
    assert res0["rank0_full"] is True
    for res in (res0, res1):
        for key in ("live_untouched", "buffers_identical_on_ranks", "buffers_trained", "all_ranks_full",
                    "same_world_weights", "same_world_buffers", "same_world_momentum",
                    "resumed_samples_like_uninterrupted", "from_world1_weights", "from_world1_buffers",
                    "from_world1_momentum", "from_world1_trains"):
            assert res[key] is True, key


def test_checkpoint_two_to_one(dist_results) -> None:
    _scenario(dist_results, "reshard")
    tmp = dist_results[1]
    ckpt = torch.load(tmp / "ckpt_world2.pt", weights_only=False)
    full = torch.load(tmp / "full_world2.pt", weights_only=False)
    assert ckpt["state_dict"]["head.weight"].shape == (12, D)
    model = Pair(c=12)  # world 1: holds all centres
    model.load(ckpt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.sampled.attach_optimizer(opt)
    opt.load_state_dict(ckpt["optimizer_states"][0])
    assert torch.equal(model.head.weight, full["head"])
    assert torch.equal(model.sampled.weight, full["sampled"])
    assert state_buffers(model).keys() == full["buffers"].keys()
    assert all(torch.equal(v, full["buffers"][k]) for k, v in state_buffers(model).items())
    mom = opt.state[model.head.weight]["momentum_buffer"]
    assert mom.shape == (12, D) and mom.abs().sum() > 0
    smom = opt.state[model.sampled.weight_active][FULL_STATE_PREFIX + "momentum_buffer"]
    assert smom.shape == (12, D)
    # resuming trains and keeps unsampled rows of the sampled head fixed
    before = model.sampled.weight.clone()
    model(torch.randn(4, 6), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    changed = (model.sampled.weight != before).any(dim=1)
    assert changed[:4].all() and changed.sum() == model.sampled.num_sample
