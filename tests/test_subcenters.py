"""Sub-centres (``head.subcenters=K``) against references written from Sub-center ArcFace
(Deng et al., ECCV 2020): a sample's cosine to a class is the largest cosine to its K sub-centres,
and only that sub-centre is pulled. The cleaning rule follows insightface's ``drop.py``.

One spawn of 2 gloo processes checks that Partial FC with sub-centres and/or UniFace equals one
process within 1e-5 (loss, gradients, UniFace's bias), with sample_rate 1 and < 1 (positives
kept with all K rows, unsampled centres untouched), and that K-row shards round-trip through
checkpoints.
"""

from __future__ import annotations

import math
import os
import socket
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from facemargin.heads import MarginHead, PartialFCHead
from facemargin.heads.sharding import FULL_STATE_PREFIX, consolidate, init_rows
from facemargin.heads.subcenters import clean_by_dominant_subcentre, dominant_weights, subcentre_max

K = 3
#: psi(cos) of the paper margins used with sub-centres (the target replaced without autograd)
PSI = {
    "arcface": ({}, lambda c: torch.cos(torch.acos(c.clamp(-1, 1)) + 0.5)),
    "expface": ({}, lambda c: torch.cos(math.pi * (torch.acos(c.clamp(-1, 1)) / math.pi) ** 0.7)),
}


def reference_subcentre_ce(x, w, labels, psi, s, k):
    """Per row: pick each class's nearest sub-centre by comparing the K cosines (first maximum),
    then the margin cross-entropy on those C cosines; mean over labelled rows."""
    c = w.shape[0] // k
    terms = []
    for i, y in enumerate(labels.tolist()):
        if y < 0:
            continue
        xi = x[i] / x[i].norm()
        cos_row = []
        for cls in range(c):
            sims = [(xi @ (w[cls * k + j] / w[cls * k + j].norm())).item() for j in range(k)]
            best = sims.index(max(sims))  # first maximal sub-centre
            row = w[cls * k + best]
            cos_row.append(xi @ (row / row.norm()))
        cos_row = torch.stack(cos_row)
        target = cos_row[y] + (psi(cos_row[y]) - cos_row[y]).detach()
        logits = s * torch.cat([cos_row[:y], target.view(1), cos_row[y + 1:]])
        terms.append(torch.logsumexp(logits, 0) - logits[y])
    return torch.stack(terms).mean()


@pytest.mark.parametrize("name", sorted(PSI))
def test_max_pooling_values_and_gradients_match_the_paper(name) -> None:
    params, psi = PSI[name]
    g = torch.Generator().manual_seed(3)
    c, d = 5, 6
    x = torch.randn(7, d, generator=g, dtype=torch.float64)
    w = torch.randn(c * K, d, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 4, -1, 2, 2, 1, 3])
    head = MarginHead(d, c, margin=name, subcenters=K, **params).double()
    with torch.no_grad():
        head.weight.copy_(w)
    xh = x.clone().requires_grad_()
    loss = head.loss(xh, labels)
    loss.backward()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = reference_subcentre_ce(xr, wr, labels, psi, head.margin.s, K)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(xh.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, wr.grad, rtol=1e-10, atol=1e-12)
    # inference: s * (max over the sub-centres of each class)
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
    torch.testing.assert_close(head(x), head.margin.s * cos.view(7, c, K).amax(dim=2))


def test_ties_pull_the_first_subcentre_only() -> None:
    """Exact ties (the same cosine to two sub-centres): the value is that cosine, the gradient
    goes to the lowest-index sub-centre only (the one the cleaner assigns the sample to)."""
    cos = torch.tensor([[0.3, 0.7, 0.7, -0.2, -0.2, -0.2], [0.5, 0.1, 0.5, 0.9, 0.0, 0.9]], requires_grad=True)
    pooled = subcentre_max(cos, K)
    assert torch.equal(pooled, torch.tensor([[0.7, -0.2], [0.5, 0.9]]))
    pooled.backward(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert torch.equal(cos.grad, torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 4.0, 0.0, 0.0]]))
    assert subcentre_max(cos, 1) is cos
    with pytest.raises(ValueError, match="not a multiple of subcenters=4"):
        subcentre_max(cos, 4)


def reference_drop(x, w, labels, k, threshold):
    """insightface drop.py's rule, one class at a time in numpy."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    w = w.reshape(-1, k, w.shape[1])
    keep = np.zeros(len(x), dtype=bool)
    dominant = np.zeros(w.shape[0], dtype=np.int64)
    for cls in range(w.shape[0]):
        idx = np.flatnonzero(labels == cls)
        stat = np.zeros(k, dtype=np.int64)
        for i in idx:
            stat[np.argmax(w[cls] @ x[i])] += 1
        dominant[cls] = np.argmax(stat)
        keep[idx] = x[idx] @ w[cls, dominant[cls]] > np.cos(np.pi * threshold / 180.0)
    return keep, dominant


def test_cleaning_rule_matches_insightface_drop() -> None:
    rng = np.random.default_rng(0)
    c, d = 6, 8
    w = rng.normal(size=(c * K, d))
    labels = rng.integers(0, c - 1, size=60)  # the last class has no sample: dominant 0
    x = w[labels * K + rng.integers(0, K, size=60)] + 0.6 * rng.normal(size=(60, d))
    labels[:4] = 0
    x[:2] = w[0 * K + 1]  # ties in the counts of class 0 resolve to the lowest index
    for threshold in (75.0, 40.0):
        res = clean_by_dominant_subcentre(torch.from_numpy(x), torch.from_numpy(labels), torch.from_numpy(w), K, threshold)
        keep, dominant = reference_drop(x, w, labels, K, threshold)
        assert np.array_equal(res.keep.numpy(), keep) and np.array_equal(res.dominant.numpy(), dominant)
        assert res.counts.sum() == 60 and int(res.counts[c - 1].sum()) == 0
        assert res.dropped_samples == int((~keep).sum())
        assert 0 < res.dropped_samples < 60 or threshold == 75.0
        angle = np.degrees(np.arccos(np.clip(
            (x / np.linalg.norm(x, axis=1, keepdims=True) * (w / np.linalg.norm(w, axis=1, keepdims=True))
             .reshape(c, K, d)[labels, dominant[labels]]).sum(1), -1, 1)))
        np.testing.assert_allclose(res.angle.numpy(), angle, rtol=1e-5, atol=1e-4)
        before, gone = res.identities(torch.from_numpy(labels))
        assert before == c - 1 and gone == before - len(np.unique(labels[keep]))
    top = dominant_weights(torch.from_numpy(w), res.dominant, K)
    assert torch.equal(top, torch.from_numpy(w.reshape(c, K, d)[np.arange(c), dominant]))
    with pytest.raises(ValueError, match="labels must lie in"):
        clean_by_dominant_subcentre(torch.zeros(1, d), torch.tensor([c]), torch.from_numpy(w), K)


def test_bad_subcenters_and_checkpoint_mismatch_are_named() -> None:
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="subcenters must be a positive integer"):
            MarginHead(4, 3, subcenters=bad)
    ckpt = {"state_dict": {"weight": torch.zeros(3 * 2, 4)}}
    with pytest.raises(ValueError, match="expected 3 classes x 3 sub-centres = 9 rows"):
        PartialFCHead(4, 3, subcenters=3, seed=0).on_load_checkpoint(ckpt, "")


# ----------------------------------------------------------------------------- 2 processes
WORLD, D, C = 2, 8, 11  # uneven class shards: 5 and 6 (15 and 18 rows with K = 3)
TOL = 1e-5
STEPS = 3
#: (label, margin, margin params, subcenters, objective)
FULL_CASES = [
    ("arcface/K3/softmax", "arcface", {}, K, "softmax"),
    ("curricularface/K3/softmax", "curricularface", {}, K, "softmax"),
    ("cosface/K1/uniface", "cosface", {"m": 0.4}, 1, "uniface"),
    ("expface/K3/uniface", "expface", {"m": 0.69}, K, "uniface"),
]
SAMPLED_CASES = [
    ("arcface/K3/softmax/r0.5", "arcface", {}, K, "softmax"),
    ("cosface/K1/uniface/r0.5", "cosface", {"m": 0.4}, 1, "uniface"),
    ("expface/K3/uniface/r0.5", "expface", {"m": 0.69}, K, "uniface"),
]
LABELS = torch.tensor([[0, 4, -1, 10, 3, 7, -1, 1], [6, 9, 5, -1, 2, -1, 8, 8], [1, 1, 2, -1, -1, 10, 4, 0]])
SAMPLED_C = 20  # 10 classes a shard, 5 sampled; labels below keep <= 5 positives a shard
SAMPLED_LABELS = torch.tensor([[0, 1, 12, -1, 13, 2, 11, 0], [3, 14, 14, 4, -1, 15, 1, 0], [19, 18, 5, 6, 7, 17, -1, 8]])


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).abs().max() / (1.0 + b.abs().max()))


def global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(8, D, generator=g) * 4


def bias_of(head) -> torch.Tensor:
    return head.objective.bias.detach().clone() if hasattr(head.objective, "bias") else torch.zeros(())


def run_steps(head, rows: slice, labels: torch.Tensor) -> list[dict]:
    opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
    out = []
    for step in range(STEPS):
        x = global_batch(step)[rows].clone().requires_grad_()
        opt.zero_grad()
        res = head.output(x, labels[step][rows])
        res.loss.backward()
        b = getattr(head.objective, "bias", None)
        out.append({"loss": res.loss.detach(), "xgrad": x.grad.clone(), "wgrad": head.weight.grad.clone(),
                    "bgrad": b.grad.clone() if b is not None else torch.zeros(()),
                    "logs": {k: v.clone() for k, v in res.logs.items()}})
        opt.step()
        out[-1]["bias_after"] = bias_of(head)
    return out


def references() -> dict:
    refs = {}
    for label, margin, params, k, objective in FULL_CASES:
        head = MarginHead(D, C, margin=margin, subcenters=k, objective=objective, **params)
        with torch.no_grad():
            head.weight.copy_(init_rows(0, C * k, C * k, D, seed=5))
        refs[label] = run_steps(head, slice(None), LABELS)
    return refs


def scenario_full(rank: int, refs: dict) -> dict:
    out = {}
    mine = slice(rank * 4, (rank + 1) * 4)
    for label, margin, params, k, objective in FULL_CASES:
        head = PartialFCHead(D, C, margin=margin, subcenters=k, objective=objective, seed=5, **params)
        rows = head.weight.shape[0]
        out[f"{label}/rows"] = rows == (5 if rank == 0 else 6) * k
        for step, (got, want) in enumerate(zip(run_steps(head, mine, LABELS), refs[label])):
            key = f"{label}/step{step}"
            out[f"loss/{key}"] = rel_err(got["loss"], want["loss"])
            out[f"xgrad/{key}"] = rel_err(got["xgrad"] / WORLD, want["xgrad"][mine])
            out[f"wgrad/{key}"] = rel_err(got["wgrad"], want["wgrad"][head.start * k:head.stop * k])
            out[f"bgrad/{key}"] = rel_err(got["bgrad"], want["bgrad"])
            out[f"bias/{key}"] = rel_err(got["bias_after"], want["bias_after"])
            for name, value in want["logs"].items():
                out[f"log/{name}/{key}"] = rel_err(got["logs"][name], value)
    return out


def scenario_sampled(rank: int) -> dict:
    """Each step equals one process holding the union of the sampled classes (all K rows each)."""
    out: dict = {}
    mine = slice(rank * 4, (rank + 1) * 4)
    for label, margin, params, k, objective in SAMPLED_CASES:
        head = PartialFCHead(D, SAMPLED_C, margin=margin, subcenters=k, objective=objective, sample_rate=0.5,
                             seed=9, **params)
        out[f"{label}/bias_init"] = rel_err(bias_of(head), math.log(10 * SAMPLED_C * 0.5) if objective == "uniface" else 0.0)
        opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
        head.attach_optimizer(opt)
        for step in range(STEPS):
            x_glob, y_glob = global_batch(step), SAMPLED_LABELS[step]
            w0, b0 = head.full_weight(), bias_of(head)
            x = x_glob[mine].clone().requires_grad_()
            opt.zero_grad()
            loss = head.loss(x, y_glob[mine])
            idx = head._active_index.clone()
            classes = idx.view(-1, k)[:, 0] // k
            key = f"{label}/step{step}"
            out[f"whole_classes/{key}"] = torch.equal(idx, (classes.unsqueeze(1) * k + torch.arange(k)).view(-1))
            pos = y_glob[(y_glob >= head.start) & (y_glob < head.stop)] - head.start
            out[f"positives/{key}"] = bool(torch.isin(pos, classes).all())
            parts = [torch.empty_like(classes) for _ in range(WORLD)]
            dist.all_gather(parts, classes + head.start)
            union = torch.cat(parts)
            ref = MarginHead(D, union.numel(), margin=margin, subcenters=k, objective=objective, **params)
            rows = (union.unsqueeze(1) * k + torch.arange(k)).view(-1)
            with torch.no_grad():
                ref.weight.copy_(w0[rows])
                if objective == "uniface":
                    ref.objective.bias.copy_(b0)
            remap = torch.full((SAMPLED_C,), -1, dtype=torch.long)
            remap[union] = torch.arange(union.numel())
            xr = x_glob.clone().requires_grad_()
            ref_loss = ref.loss(xr, torch.where(y_glob >= 0, remap[y_glob.clamp_min(0)], y_glob))
            ref_loss.backward()
            loss.backward()
            out[f"loss/{key}"] = rel_err(loss, ref_loss)
            out[f"xgrad/{key}"] = rel_err(x.grad / WORLD, xr.grad[mine])
            lo = rank * parts[0].numel() * k
            out[f"wgrad/{key}"] = rel_err(head.weight_active.grad, ref.weight.grad[lo:lo + idx.numel()])
            if objective == "uniface":
                out[f"bgrad/{key}"] = rel_err(head.objective.bias.grad, ref.objective.bias.grad)
            pulled = head.weight_active.grad.abs().sum(1) > 1e-6  # K > 1: only the nearest sub-centres
            opt.step()
            untouched = torch.ones(head.weight.shape[0], dtype=torch.bool)
            untouched[idx] = False
            w1 = head.weight
            out[f"unsampled_untouched/{key}"] = torch.equal(w1[untouched], w0[head.start * k:head.stop * k][untouched])
            moved = (w1[idx] != w0[head.start * k:head.stop * k][idx]).any(1)
            out[f"pulled_moved/{key}"] = bool(moved[pulled].all()) and bool(pulled.any())
            both = [torch.empty(()) for _ in range(WORLD)]
            dist.all_gather(both, bias_of(head))
            out[f"bias_same_on_ranks/{key}"] = torch.equal(both[0], both[1])
    return out


def scenario_checkpoint(rank: int, tmp: Path) -> dict:
    """K-row shards and their optimizer rows consolidate and re-shard exactly."""
    out: dict = {}
    head = PartialFCHead(D, C, margin="arcface", subcenters=K, objective="uniface", sample_rate=0.8, seed=4)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    head.attach_optimizer(opt)
    for step in range(2):
        opt.zero_grad()
        head.loss(global_batch(step)[rank * 4:(rank + 1) * 4], LABELS[step][rank * 4:(rank + 1) * 4]).backward()
        opt.step()
    ckpt = {"state_dict": {k: v.clone() for k, v in head.state_dict().items()}, "optimizer_states": [opt.state_dict()]}
    consolidate(head, ckpt, "", [opt])
    full = head.full_weight()
    if rank == 0:
        out["full_rows"] = ckpt["state_dict"]["weight"].shape == (C * K, D) and torch.equal(ckpt["state_dict"]["weight"], full)
        torch.save({"ckpt": ckpt, "full": full}, tmp / "subcentre_ckpt.pt")
    dist.barrier()
    saved = torch.load(tmp / "subcentre_ckpt.pt", weights_only=False)["ckpt"]
    fresh = PartialFCHead(D, C, margin="arcface", subcenters=K, objective="uniface", sample_rate=0.8, seed=4)
    fresh.on_load_checkpoint(saved, "")
    fresh.load_state_dict(saved["state_dict"])
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(saved["optimizer_states"][0])
    key = FULL_STATE_PREFIX + "momentum_buffer"
    out["weights"] = torch.equal(fresh.weight, head.weight)
    out["bias"] = torch.equal(fresh.objective.bias, head.objective.bias)
    out["momentum_rows"] = torch.equal(opt2.state[fresh.weight_active][key], opt.state[head.weight_active][key])
    return out


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    refs = torch.load(Path(tmp) / "references.pt", weights_only=False)
    results: dict = {}
    for name, fn in [("full", lambda: scenario_full(rank, refs)), ("sampled", lambda: scenario_sampled(rank)),
                     ("checkpoint", lambda: scenario_checkpoint(rank, Path(tmp)))]:
        try:
            results[name] = fn()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
    torch.save(results, Path(tmp) / f"results_{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    tmp = tmp_path_factory.mktemp("subcentres")
    torch.save(references(), tmp / "references.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"results_{r}.pt", weights_only=False) for r in range(WORLD)], tmp


def _checked(two_ranks, name: str) -> list[dict]:
    per_rank = [res[name] for res in two_ranks[0]]
    for r, res in enumerate(per_rank):
        assert "error" not in res, f"rank {r}:\n{res.get('error')}"
    return per_rank


def _assert_all(per_rank: list[dict]) -> None:
    for r, res in enumerate(per_rank):
        bad = {k: v for k, v in res.items() if (v is not True and not (isinstance(v, float) and v <= TOL))}
        assert not bad, f"rank {r}: {bad}"


def test_two_processes_equal_one_with_every_centre(two_ranks) -> None:
    per_rank = _checked(two_ranks, "full")
    _assert_all(per_rank)
    for label, *_ in FULL_CASES:  # every step of every case was compared
        assert all(f"loss/{label}/step{s}" in per_rank[0] for s in range(STEPS))
    assert any(k.startswith("bgrad/expface/K3/uniface") for k in per_rank[0])


def test_two_processes_sampled_equal_one_over_the_sampled_classes(two_ranks) -> None:
    per_rank = _checked(two_ranks, "sampled")
    _assert_all(per_rank)
    assert sum(k.startswith("unsampled_untouched/") for k in per_rank[0]) == len(SAMPLED_CASES) * STEPS


def test_subcentre_shards_round_trip_through_checkpoints(two_ranks) -> None:
    per_rank = _checked(two_ranks, "checkpoint")
    _assert_all(per_rank)
    assert per_rank[0]["full_rows"] is True
    # the 2-rank checkpoint also loads on one process, as one MarginHead-equivalent head
    saved = torch.load(two_ranks[1] / "subcentre_ckpt.pt", weights_only=False)
    one = PartialFCHead(D, C, margin="arcface", subcenters=K, objective="uniface", sample_rate=0.8, seed=4)
    one.on_load_checkpoint(saved["ckpt"], "")
    one.load_state_dict(saved["ckpt"]["state_dict"])
    assert torch.equal(one.weight, saved["full"])
    margin_head = one.to_margin_head()
    assert margin_head.subcenters == K and torch.equal(margin_head.objective.bias, one.objective.bias)
