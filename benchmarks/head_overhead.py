"""Overhead of ``MarginHead`` over a plain normalised-linear + cross-entropy baseline.

Forward + backward of the loss w.r.t. embeddings and class centres, on CPU in float32, with
C=100 000 classes, D=512, B=256 by default. Every head and the baseline share ONE weight tensor
and run in the same process, interleaved (baseline, head, baseline, head, ...) after a warm-up,
so machine noise hits both sides alike. Reported per loss: median times, the ratio of medians
and the median of the per-pair ratios (the more robust figure on a noisy machine).

    python benchmarks/head_overhead.py                 # all cores, Markdown table on stdout
    python benchmarks/head_overhead.py --threads 2 --repeats 15

``--profile NAME`` prints a ``torch.profiler`` table of one forward+backward of that variant.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facemargin import MarginHead

Step = Callable[[], None]


# ---------------------------------------------------------------------------------------------
# baseline
# ---------------------------------------------------------------------------------------------


def baseline_loss(x: Tensor, weight: Tensor, labels: Tensor, s: float) -> Tensor:
    """NormFace-style baseline: normalise both sides, matmul, scale, cross-entropy."""
    logits = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()
    return F.cross_entropy(logits * s, labels)




# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """Timings of one head variant against the baseline (seconds)."""

    name: str
    head: list[float]
    base: list[float]

    @property
    def ratio_of_medians(self) -> float:
        return statistics.median(self.head) / statistics.median(self.base)

    @property
    def median_pair_ratio(self) -> float:
        return statistics.median(h / b for h, b in zip(self.head, self.base))


def timed(step: Step) -> float:
    """Wall time of one call of ``step``."""
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def make_head_step(head: nn.Module, x: Tensor, labels: Tensor) -> Step:
    """One forward+backward of ``head.loss``; gradients are dropped first (set to None)."""

    def step() -> None:
        head.weight.grad = None
        x.grad = None
        head.loss(x, labels).backward()

    return step


def make_base_step(weight: nn.Parameter, x: Tensor, labels: Tensor, s: float) -> Step:
    """One forward+backward of :func:`baseline_loss`."""

    def step() -> None:
        weight.grad = None
        x.grad = None
        baseline_loss(x, weight, labels, s).backward()

    return step


def interleaved(name: str, head_step: Step, base_step: Step, repeats: int, warmup: int) -> Row:
    """Warm up both, then time ``repeats`` pairs, alternating which one goes first."""
    for _ in range(warmup):
        base_step()
        head_step()
    row = Row(name, [], [])
    for i in range(repeats):
        if i % 2 == 0:
            row.base.append(timed(base_step))
            row.head.append(timed(head_step))
        else:
            row.head.append(timed(head_step))
            row.base.append(timed(base_step))
    return row


def build_variants(weight: nn.Parameter, dim: int, classes: int) -> dict[str, MarginHead]:
    """``name -> MarginHead`` for each measured loss, all sharing ``weight``."""
    configs = [("expface", "detached"), ("expface", "exact"), ("cosface", "detached"), ("arcface", "detached")]
    heads: dict[str, MarginHead] = {}
    for loss, grad in configs:
        head = MarginHead(dim, 1, margin=loss, grad=grad)
        head.num_classes = classes
        head.weight = weight  # share the centres: same memory, same data for every variant
        heads[f"MarginHead {loss}/{grad}"] = head
    return heads


def profile(step: Step, rows: int = 15) -> None:
    """Print the top CPU ops (self time) of one forward+backward."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def markdown(rows: list[Row], threads: int, batch: int, classes: int, dim: int) -> str:
    """The results as a Markdown table."""
    lines = [
        f"torch {torch.__version__}, CPU float32, threads={threads}, B={batch}, C={classes}, D={dim}, "
        f"{len(rows[0].head) if rows else 0} interleaved pairs per row",
        "",
        "| variant | head median (ms) | baseline median (ms) | ratio of medians | median pair ratio | <= 1.10 |",
        "|---|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        ok = "yes" if r.median_pair_ratio <= 1.10 else "no"
        lines.append(
            f"| {r.name} | {1e3 * statistics.median(r.head):.1f} | {1e3 * statistics.median(r.base):.1f} "
            f"| {r.ratio_of_medians:.3f} | {r.median_pair_ratio:.3f} | {ok} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the interleaved benchmark, print the Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated substrings: time only matching variants")
    p.add_argument("--profile", default="", help="profile the variant whose name contains this")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    weight = nn.Parameter(torch.randn(args.classes, args.dim) * 0.01)
    x = torch.randn(args.batch, args.dim, requires_grad=True)
    labels = torch.randint(0, args.classes, (args.batch,))
    heads = build_variants(weight, args.dim, args.classes)
    if args.only:
        keys = args.only.split(",")
        heads = {k: h for k, h in heads.items() if any(q in k for q in keys)}

    if args.profile:
        name = next(k for k in heads if args.profile in k)
        print(f"## profile: baseline (s={heads[name].margin.s})")
        profile(make_base_step(weight, x, labels, heads[name].margin.s))
        print(f"## profile: {name}")
        profile(make_head_step(heads[name], x, labels))
        return

    rows = []
    for name, head in heads.items():
        base = make_base_step(weight, x, labels, head.margin.s)
        rows.append(interleaved(name, make_head_step(head, x, labels), base, args.repeats, args.warmup))
        print(f"  {name}: pair ratio {rows[-1].median_pair_ratio:.3f}", flush=True)
    print()
    print(markdown(rows, args.threads, args.batch, args.classes, args.dim))


if __name__ == "__main__":
    main()
