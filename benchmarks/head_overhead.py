"""Overhead of ``MarginHead`` with every loss over a plain normalised-linear + cross-entropy baseline.

Forward + backward of the loss w.r.t. embeddings and class centres, in float32 on ``--device``
(default CPU; ``cuda``: synchronised before and after every timed call), with
C=100 000 classes, D=512, B=256 by default: every psi-margin (ExpFace also with the exact
gradient), the dynamic margins, CurricularFace, AdaFace, MagFace and SphereFace-R. Goal: <= 1.10
for psi-margins and dynamic ones, <= 1.25 for the others.

Every head and the baseline share ONE weight tensor and run in the same process, interleaved
after a warm-up (baseline, margin-free head, head; the order rotates every repeat), so machine
noise hits all sides alike. Reported per loss: median times, the median of the per-repeat ratios
to the baseline (the goal figure) and to ``MarginHead(margin="softmax")`` at the same ``s``
(what the margin itself costs on top of the head's own cosine + cross-entropy).

    python benchmarks/head_overhead.py                 # all cores, Markdown table on stdout
    python benchmarks/head_overhead.py --threads 2 --repeats 15 --only adaface,magface
    python benchmarks/head_overhead.py --device cuda --classes 1000000 --json out/head_1m.json

``--profile NAME`` prints a ``torch.profiler`` table of one forward+backward of that variant.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facemargin.heads import MarginHead
from facemargin.margins import ADAPTIVE_MARGINS, MARGINS
from facemargin.margins.psi import DYNAMIC_MARGINS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_report import row, write_rows  # noqa: E402

Step = Callable[[], None]

#: (label, margin name, parameters, goal)
VARIANTS: list[tuple[str, str, dict, float]] = [
    *[(name, name, {}, 1.10) for name in MARGINS],
    ("expface grad=exact", "expface", {"grad": "exact"}, 1.10),
    *[(f"{name} dynamic=balanced", name, {"dynamic": "balanced"}, 1.10) for name in DYNAMIC_MARGINS],
    *[(name, name, {}, 1.25) for name in ADAPTIVE_MARGINS],
]


def baseline_loss(x: Tensor, weight: Tensor, labels: Tensor, s: float) -> Tensor:
    """NormFace-style baseline: normalise both sides, matmul, scale, cross-entropy."""
    logits = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()
    return F.cross_entropy(logits * s, labels)


@dataclass
class Row:
    """Timings (seconds) of one loss, the baseline and the margin-free head, repeat by repeat."""

    name: str
    goal: float
    head: list[float] = field(default_factory=list)
    base: list[float] = field(default_factory=list)
    plain: list[float] = field(default_factory=list)

    def pair_ratio(self, other: list[float]) -> float:
        return statistics.median(h / b for h, b in zip(self.head, other))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Step, device: torch.device = torch.device("cpu")) -> float:
    """Wall time of one call of ``step``, the device's queue drained before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
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


def interleaved(
    result: Row, steps: dict[str, Step], repeats: int, warmup: int, device: torch.device = torch.device("cpu"),
) -> Row:
    """Warm up every step, then time ``repeats`` rounds, rotating the order each round."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    names = list(steps)
    for i in range(repeats):
        for name in names[i % 3:] + names[:i % 3]:
            getattr(result, name).append(timed(steps[name], device))
    return result


def shared_head(weight: nn.Parameter, classes: int, margin: str, **params: object) -> MarginHead:
    """A ``MarginHead`` whose centres are ``weight`` (same memory, same data for every variant)."""
    head = MarginHead(weight.shape[1], 1, margin=margin, **params).to(weight.device)
    head.num_classes = classes
    head.weight = weight
    return head


def profile(step: Step, rows: int = 15) -> None:
    """Print the top CPU ops (self time) of one forward+backward."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def markdown(rows: list[Row], threads: int, batch: int, classes: int, dim: int, device: str = "CPU") -> str:
    """The results as a Markdown table."""
    lines = [
        f"torch {torch.__version__}, {device} float32, threads={threads}, B={batch}, C={classes}, D={dim}, "
        f"{len(rows[0].head) if rows else 0} interleaved rounds per row",
        "",
        "| loss | head median (ms) | baseline median (ms) | ratio to baseline | ratio to margin-free head | goal | met |",
        "|---|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        ratio = r.pair_ratio(r.base)
        lines.append(
            f"| {r.name} | {1e3 * statistics.median(r.head):.0f} | {1e3 * statistics.median(r.base):.0f} "
            f"| {ratio:.3f} | {r.pair_ratio(r.plain):.3f} | {r.goal:.2f} | {'yes' if ratio <= r.goal else 'no'} |"
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
    p.add_argument("--only", default="", help="comma-separated substrings: time only matching losses")
    p.add_argument("--profile", default="", help="profile the loss whose label contains this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--json", default=None, help="also write the rows here (benchmarks/gpu_report.py)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("head_overhead: --device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    weight = nn.Parameter(torch.randn(args.classes, args.dim, device=device) * 0.01)
    x = torch.randn(args.batch, args.dim, device=device, requires_grad=True)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    variants = [v for v in VARIANTS if not args.only or any(q in v[0] for q in args.only.split(","))]

    if args.profile:
        label, loss, params, _ = next(v for v in variants if args.profile in v[0])
        head = shared_head(weight, args.classes, loss, **params)
        print(f"## profile: baseline (s={head.margin.s})")
        profile(make_base_step(weight, x, labels, head.margin.s))
        print(f"## profile: {label}")
        profile(make_head_step(head, x, labels))
        return

    rows = []
    for label, loss, params, goal in variants:
        head = shared_head(weight, args.classes, loss, **params)
        plain = shared_head(weight, args.classes, "softmax", s=head.margin.s)
        steps = {
            "base": make_base_step(weight, x, labels, head.margin.s),
            "plain": make_head_step(plain, x, labels),
            "head": make_head_step(head, x, labels),
        }
        rows.append(interleaved(Row(label, goal), steps, args.repeats, args.warmup, device))
        print(f"  {label}: ratio {rows[-1].pair_ratio(rows[-1].base):.3f}", flush=True)
        del head, plain, steps
    print()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(markdown(rows, args.threads, args.batch, args.classes, args.dim, name))
    setting = f"C={args.classes:,}, D={args.dim}, B={args.batch}, fwd+bwd float32"
    write_rows(args.json, "head_overhead", args.device, [
        row("head overhead", f"{r.name}; {setting}", 1e3 * statistics.median(r.head), "ms", r.pair_ratio(r.base),
            "normalised linear + CE, same weight", f"<= {r.goal:.2f}x",
            f"vs margin-free head {r.pair_ratio(r.plain):.3f}x")
        for r in rows
    ])


if __name__ == "__main__":
    main()
