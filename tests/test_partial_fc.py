"""PartialFCHead with real 2-process gloo collectives on CPU.

One spawned process group (module-scoped fixture) runs every distributed scenario and writes
its numbers to disk; the tests below assert on them. Reference = ``MarginHead`` holding all
centres, on the concatenated global batch, in one process. "Equal" means
``max|a - b| <= 1e-5 * (1 + max|b|)`` (gradients w.r.t. 0.01-std centres reach ~300).
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

from facemargin.heads import MarginHead
from facemargin.partial_fc import (
    FULL_STATE_PREFIX,
    PartialFCHead,
    _init_rows,
    consolidate_checkpoint,
    ddp_params_to_ignore,
    exclude_sharded_from_ddp,
    shard_bounds,
    shard_checkpoint,
)

WORLD = 2
D = 8
TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / (1.0 + b.abs().max()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference(c: int, seed: int, margin: str, grad: str) -> MarginHead:
    ref = MarginHead(D, c, margin=margin, grad=grad)
    with torch.no_grad():
        ref.weight.copy_(_init_rows(0, c, c, D, seed))
    return ref


class Pair(nn.Module):
    """Backbone + two heads (plain and sampled) to exercise names, prefixes and checkpoints."""

    def __init__(self, c: int = 12) -> None:
        super().__init__()
        self.backbone = nn.Linear(6, D)
        self.head = PartialFCHead(D, c, margin="cosface", seed=11)
        self.sampled = PartialFCHead(D, c, margin="arcface", sample_rate=0.5, seed=12)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        e = self.backbone(x)
        return self.head.loss(e, y) + self.sampled.loss(e, y)


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


# ----------------------------------------------------------------------------- scenarios
def scenario_equivalence(rank: int) -> dict:
    out = {}
    c = 11  # uneven shards: 5 and 6
    g = torch.Generator().manual_seed(0)
    x_glob = torch.randn(8, D, generator=g)
    label_sets = {
        "all": torch.tensor([0, 4, 5, 10, 3, 7, 7, 1]),
        "ignore": torch.tensor([0, -1, 5, 10, -1, 7, 2, -1]),
    }
    for margin in ("expface", "cosface", "arcface"):
        for grad in ("detached", "exact"):
            for lname, y_glob in label_sets.items():
                head = PartialFCHead(D, c, margin=margin, grad=grad, seed=5)
                ref = reference(c, 5, margin, grad)
                xr = x_glob.clone().requires_grad_()
                ref_loss = ref.loss(xr, y_glob)
                ref_loss.backward()
                x = x_glob[rank * 4:(rank + 1) * 4].clone().requires_grad_()
                loss = head.loss(x, y_glob[rank * 4:(rank + 1) * 4])
                loss.backward()
                key = f"{margin}/{grad}/{lname}"
                out[f"loss/{key}"] = rel_err(loss, ref_loss)
                # ddp_grad_scale=True: world x dL/dx, so DDP's mean gives the single-process grad
                out[f"xgrad/{key}"] = rel_err(x.grad / WORLD, xr.grad[rank * 4:(rank + 1) * 4])
                out[f"wgrad/{key}"] = rel_err(head.weight.grad, ref.weight.grad[head.start:head.stop])
    # unscaled embedding gradient + unequal batch sizes (3 and 5 rows)
    y_glob = label_sets["ignore"]
    head = PartialFCHead(D, c, margin="expface", seed=5, ddp_grad_scale=False)
    ref = reference(c, 5, "expface", "detached")
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
    head = PartialFCHead(D, c, margin="arcface", seed=5)
    ref = reference(c, 5, "arcface", "detached")
    xb = x_glob.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head.loss(xb[rank * 4:(rank + 1) * 4], label_sets["all"][rank * 4:(rank + 1) * 4])
    out["bf16/dtype_is_float32"] = loss.dtype == torch.float32
    out["bf16/loss"] = rel_err(loss, ref.loss(xb.float(), label_sets["all"]))
    return out


def scenario_ddp_backbone(rank: int) -> dict:
    """DDP-averaged backbone gradient == single-process gradient; DDP leaves the shards alone."""
    out = {}
    torch.manual_seed(3)  # same backbone init on both ranks
    model = Pair(c=12)
    ref_backbone = nn.Linear(6, D)
    ref_backbone.load_state_dict(model.backbone.state_dict())
    ref_head, ref_sampled = reference(12, 11, "cosface", "detached"), reference(12, 12, "arcface", "detached")
    w_before = model.head.weight.detach().clone()
    names = exclude_sharded_from_ddp(model)
    out["ignore_names"] = sorted(names)
    ddp = nn.parallel.DistributedDataParallel(model)
    out["shard_kept_after_ddp_init"] = torch.equal(model.head.weight, w_before)
    out["shards_not_in_reducer"] = all(
        p is not model.head.weight and p is not model.sampled.weight_active for p in ddp._module_parameters
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g)
    y = torch.tensor([0, 5, 6, 11, 3, 3, 9, -1])
    model.eval()  # sampled head: full shard, exact loss
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
            loss = head.loss(x_glob[rank * 4:(rank + 1) * 4], y_glob[rank * 4:(rank + 1) * 4])
            idx = head._active_index.clone()
            # swapped-in optimizer rows == the full-shard rows of this sample
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
                full_w = torch.cat(parts)
                sub.weight.copy_(full_w[classes])
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
    # too many positives for the sample -> clear error
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
    exclude_sharded_from_ddp(model)
    opt = train_pair(model, steps=3, gen_seed=2, rank=rank, world=WORLD)
    ckpt = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}
    live_w = model.head.weight.detach().clone()
    consolidate_checkpoint(ckpt, model, [opt])
    out["live_untouched"] = torch.equal(model.head.weight, live_w) and opt.state[model.head.weight][
        "momentum_buffer"
    ].shape[0] == model.head.num_local
    full_head = model.head.full_weight()
    full_sampled = model.sampled.full_weight()
    if rank == 0:
        out["rank0_full"] = torch.equal(ckpt["state_dict"]["head.weight"], full_head) and torch.equal(
            ckpt["state_dict"]["sampled.weight"], full_sampled
        )
        torch.save(ckpt, tmp / "ckpt_world2.pt")
        torch.save({"head": full_head, "sampled": full_sampled}, tmp / "full_world2.pt")
    # everyone has the full tensors with all_ranks=True
    ckpt_all = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}
    consolidate_checkpoint(ckpt_all, model, [opt], all_ranks=True)
    out["all_ranks_full"] = torch.equal(ckpt_all["state_dict"]["head.weight"], full_head)
    dist.barrier()
    # same-world resume: a fresh model loads the consolidated checkpoint exactly
    ckpt = torch.load(tmp / "ckpt_world2.pt", weights_only=False)
    fresh = Pair(c=12)
    shard_checkpoint(ckpt, fresh)
    fresh.load_state_dict(ckpt["state_dict"])
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt2.load_state_dict(ckpt["optimizer_states"][0])
    out["same_world_weights"] = torch.equal(fresh.head.weight, model.head.weight) and torch.equal(
        fresh.sampled.weight, model.sampled.weight
    )
    out["same_world_momentum"] = torch.equal(
        opt2.state[fresh.head.weight]["momentum_buffer"], opt.state[model.head.weight]["momentum_buffer"]
    ) and torch.equal(
        opt2.state[fresh.sampled.weight_active][FULL_STATE_PREFIX + "momentum_buffer"],
        opt.state[model.sampled.weight_active][FULL_STATE_PREFIX + "momentum_buffer"],
    )
    # 1 -> 2: a checkpoint written by a single process (prepared by the fixture)
    ref = torch.load(tmp / "ckpt_world1.pt", weights_only=False)
    full = torch.load(tmp / "world1_full.pt", weights_only=False)
    m2 = Pair(c=12)
    shard_checkpoint(ref, m2)
    m2.load_state_dict(ref["state_dict"])
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    o2.load_state_dict(ref["optimizer_states"][0])
    s, e = m2.head.start, m2.head.stop
    out["from_world1_weights"] = torch.equal(m2.head.weight, full["head"][s:e]) and torch.equal(
        m2.sampled.weight, full["sampled"][s:e]
    )
    out["from_world1_momentum"] = torch.equal(
        o2.state[m2.head.weight]["momentum_buffer"], full["head_mom"][s:e]
    ) and torch.equal(
        o2.state[m2.sampled.weight_active][FULL_STATE_PREFIX + "momentum_buffer"], full["sampled_mom"][s:e]
    )
    # and it keeps training
    train_pair(m2, steps=1, gen_seed=5, rank=rank, world=WORLD)
    out["from_world1_trains"] = bool(torch.isfinite(m2.head.weight).all())
    return out


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results: dict = {}
    for name, fn in [
        ("equivalence", lambda: scenario_equivalence(rank)),
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
    consolidate_checkpoint(ckpt, model, [opt])
    torch.save(ckpt, tmp / "ckpt_world1.pt")
    torch.save(
        {
            "head": model.head.weight.detach().clone(),
            "sampled": model.sampled.weight.clone(),
            "head_mom": opt.state[model.head.weight]["momentum_buffer"].clone(),
            "sampled_mom": opt.state[model.sampled.weight_active][FULL_STATE_PREFIX + "momentum_buffer"].clone(),
        },
        tmp / "world1_full.pt",
    )


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    tmp = tmp_path_factory.mktemp("pfc")
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
    full = _init_rows(0, 70000, 70000, 4, seed=3)
    parts = [_init_rows(*shard_bounds(70000, r, 3), 70000, 4, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), full)
    assert torch.equal(torch.cat([_init_rows(0, 5, 11, 4, 3), _init_rows(5, 11, 11, 4, 3)]), _init_rows(0, 11, 11, 4, 3))
    assert torch.equal(PartialFCHead(4, 70000, seed=3).weight.detach(), full)


def test_single_process_equals_margin_head() -> None:
    x = torch.randn(6, D, requires_grad=True)
    y = torch.tensor([0, 3, -1, 9, 3, 1])
    head = PartialFCHead(D, 10, margin="expface", grad="exact", seed=1)
    ref = reference(10, 1, "expface", "exact")
    xr = x.detach().clone().requires_grad_()
    head(x, y).backward()
    ref.loss(xr, y).backward()
    assert rel_err(x.grad, xr.grad) < TOL
    assert rel_err(head.weight.grad, ref.weight.grad) < TOL
    assert rel_err(head.to_margin_head().weight, ref.weight) == 0.0


def test_ddp_ignore_names() -> None:
    model = Pair()
    assert ddp_params_to_ignore(model) == ["head.weight", "sampled.weight", "sampled.weight_active"]
    model._ddp_params_and_buffers_to_ignore = ["backbone.bias"]
    exclude_sharded_from_ddp(model)
    assert model._ddp_params_and_buffers_to_ignore[0] == "backbone.bias"
    assert getattr(model.head.weight, "_ddp_ignored", False)
    assert "sampled.weight_active" not in model.state_dict()  # per-step scratch, never saved


def test_sampled_head_requires_attached_optimizer() -> None:
    head = PartialFCHead(D, 20, sample_rate=0.5)
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        head.loss(torch.randn(2, D), torch.tensor([1, 2]))
    head.eval()
    assert torch.isfinite(head.loss(torch.randn(2, D), torch.tensor([1, 2])))  # eval: full shard


def test_loss_and_gradients_equal_single_process(dist_results) -> None:
    for r, res in enumerate(_scenario(dist_results, "equivalence")):
        assert len([k for k in res if k.startswith("loss/")]) == 12
        for key, value in res.items():
            if key == "bf16/dtype_is_float32":
                assert value is True
            else:
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
        for key in ("live_untouched", "all_ranks_full", "same_world_weights", "same_world_momentum",
                    "from_world1_weights", "from_world1_momentum", "from_world1_trains"):
            assert res[key] is True, key


def test_checkpoint_two_to_one(dist_results) -> None:
    _scenario(dist_results, "reshard")
    tmp = dist_results[1]
    ckpt = torch.load(tmp / "ckpt_world2.pt", weights_only=False)
    full = torch.load(tmp / "full_world2.pt", weights_only=False)
    assert ckpt["state_dict"]["head.weight"].shape == (12, D)
    model = Pair(c=12)  # world 1: holds all centres
    shard_checkpoint(ckpt, model)
    model.load_state_dict(ckpt["state_dict"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.sampled.attach_optimizer(opt)
    opt.load_state_dict(ckpt["optimizer_states"][0])
    assert torch.equal(model.head.weight, full["head"])
    assert torch.equal(model.sampled.weight, full["sampled"])
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
