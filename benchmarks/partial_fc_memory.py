"""Peak host memory of a Partial FC head per rank: world 1 vs 2, sample_rate 1.0 vs 0.1.

Each configuration runs in its own freshly spawned process group (gloo, CPU). Every rank
records ``ru_maxrss`` after imports and process-group set-up (the baseline), then builds the head,
an SGD optimizer (momentum 0.9, weight decay 5e-4, insightface's) and runs ``--steps`` training
steps on random embeddings (``B`` per rank, labels spread over all classes); the figure is the
peak RSS increase: weights + gradients + momentum + logits + softmax temporaries + the
optimizer's weight-decay temporary.

    python benchmarks/partial_fc_memory.py --num-classes 200000
    python benchmarks/partial_fc_memory.py              # C = 1 000 000 (needs ~16 GiB free)
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from facemargin.heads import PartialFCHead


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, rate: float, out: str) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    base = _rss_mib()
    head = PartialFCHead(args.embedding_size, args.num_classes, margin="arcface", sample_rate=rate, seed=0)
    opt = torch.optim.SGD([head.optimizer_param], lr=0.1, momentum=0.9, weight_decay=5e-4)
    head.attach_optimizer(opt)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        x = torch.randn(args.batch_size, args.embedding_size, requires_grad=True)
        y = torch.randint(0, args.num_classes, (args.batch_size,))
        opt.zero_grad(set_to_none=True)
        head.loss(x, y).backward()
        opt.step()
    step_s = (time.perf_counter() - t0) / args.steps
    peak = _rss_mib() - base
    Path(out, f"{rank}.txt").write_text(f"{peak} {step_s} {head.num_local}")
    if world > 1:
        dist.destroy_process_group()


def run(world: int, rate: float, args: argparse.Namespace) -> list[tuple[float, float, int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, port, args, rate, out), nprocs=world, join=True)
        rows = [Path(out, f"{r}.txt").read_text().split() for r in range(world)]
    return [(float(a), float(b), int(c)) for a, b, c in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-classes", type=int, default=1_000_000)
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128, help="per rank")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    c, d, b = args.num_classes, args.embedding_size, args.batch_size
    gib = c * d * 4 / 2**30
    print(f"C={c:,} D={d} B={b}/rank float32: one full [C, D] tensor = {gib:.2f} GiB, "
          f"one global-batch logit block [world*B, C/world] = {b * c * 4 / 2**30:.2f} GiB")
    results = {}
    for world, rate in [(1, 1.0), (2, 1.0), (1, 0.1), (2, 0.1)]:
        results[(world, rate)] = run(world, rate, args)
    print(f"\n| world | sample_rate | C_local | peak RSS increase per rank (MiB) | s/step |")
    print("|---:|---:|---:|---:|---:|")
    for (world, rate), rows in results.items():
        peaks = " / ".join(f"{r[0]:.0f}" for r in rows)
        print(f"| {world} | {rate} | {rows[-1][2]:,} | {peaks} | {max(r[1] for r in rows):.2f} |")
    peak = {k: max(r[0] for r in v) for k, v in results.items()}
    print(f"\nworld 2 / world 1 (sample_rate 1.0): {peak[(2, 1.0)] / peak[(1, 1.0)]:.3f}  (goal <= 0.55)")
    print(f"world 2 / world 1 (sample_rate 0.1): {peak[(2, 0.1)] / peak[(1, 0.1)]:.3f}")
    print(f"sample_rate 0.1 / 1.0 (world 1): {peak[(1, 0.1)] / peak[(1, 1.0)]:.3f}")
    print(f"sample_rate 0.1 / 1.0 (world 2): {peak[(2, 0.1)] / peak[(2, 1.0)]:.3f}")


if __name__ == "__main__":
    main()
