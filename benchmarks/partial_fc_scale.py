"""Partial FC at scale on the CPU: 2M classes over 8 gloo ranks (D = 512, sample_rate 0.2), head
memory per rank vs one rank holding every class. Goal: per rank <= 1/8 + 5 % of one rank's.

Per rank (spawned gloo processes, SGD momentum 0.9 + weight decay 5e-4 as insightface, ``--steps``
steps on random embeddings, ``--batch-size`` per rank, all ranks' embeddings gathered):

* **held**: exact bytes of what the head keeps between steps -- its shard of centres, the sampled
  ``weight_active`` and its gradient, the optimizer state of both (the full-shard momentum rows);
* **peak**: the peak RSS (high-water mark) over the resident memory after one step of a tiny head
  (so the libraries' lazy set-up is not counted): held plus the step's transients (the
  ``[global batch, sampled classes]`` logit block, softmax, gathers).

One rank holding all classes is NOT run at 2M (that would be 8 ranks' memory in one process):
it is (a) computed for *held* with the same byte count (every term is linear in C) and
(b) measured for *peak* as one process with C / 8 classes and the same global batch, times 8
(the step's transients are linear in the sampled classes too). Both comparators are printed.

    python benchmarks/partial_fc_scale.py                         # 2M classes, 8 ranks (~15 GiB RAM)
    python benchmarks/partial_fc_scale.py --num-classes 200000    # a quick look
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from partial_fc_memory import run  # noqa: E402


def held_analytic_mib(classes: int, dim: int, rate: float) -> float:
    """Bytes a head with ``classes`` centres holds between steps (float32, SGD momentum):
    centres + their full momentum rows + sampled rows x (parameter, gradient, momentum)."""
    sampled = math.ceil(rate * classes) if rate < 1 else 0
    rows = 2 * classes + 3 * sampled if rate < 1 else 3 * classes  # rate 1: weight, grad, momentum
    return rows * dim * 4 / 2**20


def mem_available_mib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-classes", type=int, default=2_000_000)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--sample-rate", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=32, help="per rank; the global batch is world x this")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="in all; each rank gets threads // world (at least 1)")
    p.add_argument("--force", action="store_true", help="run even when MemAvailable looks too small")
    args = p.parse_args(argv)
    c, w, d, r, b = args.num_classes, args.world, args.embedding_size, args.sample_rate, args.batch_size
    local = c // w
    logits_mib = w * b * math.ceil(r * local) * 4 / 2**20
    need = w * (held_analytic_mib(local, d, r) + 3 * logits_mib + 250)  # + ~250 MiB private per process (torch)
    avail = mem_available_mib()
    print(f"C={c:,} over {w} ranks (C_local={local:,}), D={d}, sample_rate={r}, B={b}/rank (global {w * b}); "
          f"estimated need ~{need / 1024:.1f} GiB, MemAvailable {'?' if avail is None else f'{avail / 1024:.1f} GiB'}")
    if avail is not None and avail < 1.2 * need and not args.force:
        raise SystemExit(f"partial_fc_scale: MemAvailable {avail / 1024:.1f} GiB < 1.2 x the estimated "
                         f"{need / 1024:.1f} GiB; free memory, lower --num-classes, or --force")

    t0 = time.perf_counter()
    many = run(w, r, argparse.Namespace(num_classes=c, embedding_size=d, batch_size=b, steps=args.steps,
                                        threads=args.threads, warmup=True))
    wall_many = time.perf_counter() - t0
    t0 = time.perf_counter()
    one = run(1, r, argparse.Namespace(num_classes=local, embedding_size=d, batch_size=w * b, steps=args.steps,
                                       threads=args.threads, warmup=True))[0]
    wall_one = time.perf_counter() - t0

    held_rank = max(x[3] for x in many)
    peak_rank = max(x[0] for x in many)
    held_all = held_analytic_mib(c, d, r)
    peak_all = w * one[0]
    goal = (1 / w) * 1.05
    print(f"\n| | held MiB | peak RSS increase MiB | s/step |\n|---|---:|---:|---:|")
    for i, (peak, step_s, n_local, held) in enumerate(many):
        print(f"| rank {i} of {w} (C_local {n_local:,}) | {held:,.0f} | {peak:,.0f} | {step_s:.2f} |")
    print(f"| 1 rank, C/{w} = {local:,} classes, global batch {w * b} | {one[3]:,.0f} | {one[0]:,.0f} | {one[1]:.2f} |")
    print(f"| 1 rank, all {c:,} classes | {held_all:,.0f} (computed) | {peak_all:,.0f} ({w} x the row above) | |")
    print(f"\nper rank / one rank holding all: held {held_rank / held_all:.4f}, peak {peak_rank / peak_all:.4f} "
          f"(goal <= 1/{w} + 5 % = {goal:.4f}); held computed for all C: the measured 1-rank C/{w} held "
          f"x {w} = {w * one[3]:,.0f} MiB")
    print(f"wall: {w} ranks {wall_many:.0f} s, 1 rank {wall_one:.0f} s (threads {args.threads}, "
          f"{os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
