"""Peak host memory of a Partial FC head per rank: world 1 vs 2, sample_rate 1.0 vs 0.1.

Each configuration runs in its own freshly spawned process group (gloo, CPU). Every rank
records ``ru_maxrss`` after imports and process-group set-up (the baseline), then builds the head,
an SGD optimizer (momentum 0.9, weight decay 5e-4, insightface's) and runs ``--steps`` training
steps on random embeddings (``B`` per rank, labels spread over all classes); the figure is the
peak RSS increase: weights + gradients + momentum + logits + softmax temporaries + the
optimizer's weight-decay temporary.

    python benchmarks/partial_fc_memory.py --num-classes 200000
    python benchmarks/partial_fc_memory.py              # C = 1 000 000 (needs ~16 GiB free)

``--device cuda``: world 1 only, in this process, on the GPU: per sample_rate (1.0, 0.2, 0.1) the
peak of ``torch.cuda.max_memory_allocated`` over the steps and the memory still held after them
(weights, gradients, optimizer state), both above what was allocated before the head was built.
``--dry-run``: the same code on the CPU with tiny sizes (no memory figure: null).

    python benchmarks/partial_fc_memory.py --device cuda --json out/pfc_gpu.json
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from facemargin.heads import PartialFCHead

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_report import row, write_rows  # noqa: E402


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _current_rss_mib() -> float:
    """Resident memory now (Linux ``/proc/self/statm``), not the high-water mark."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def held_mib(head: PartialFCHead, optimizer: torch.optim.Optimizer) -> float:
    """Exact bytes the head holds between steps: its parameters, buffers and gradients and the
    optimizer state of its parameters (for sample_rate < 1 the full-shard state rows too)."""
    tensors = {id(t): t for t in (*head.parameters(), *head.buffers())}
    tensors.update({id(p.grad): p.grad for p in head.parameters() if p.grad is not None})
    for p in head.parameters():
        tensors.update({id(v): v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)})
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, rate: float, out: str) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    base = _rss_mib()
    if getattr(args, "warmup", False):  # one step of a tiny head first: the libraries' lazy set-up
        small = 64 * world  # >= 13 sampled classes per shard for the global batch of `world` rows
        tiny = PartialFCHead(args.embedding_size, small, margin="arcface", sample_rate=rate, seed=0)
        tiny_opt = torch.optim.SGD([tiny.optimizer_param], lr=0.1, momentum=0.9, weight_decay=5e-4)
        tiny.attach_optimizer(tiny_opt)
        tiny.loss(torch.randn(1, args.embedding_size, requires_grad=True), torch.randint(0, small, (1,))).backward()
        tiny_opt.step()
        del tiny, tiny_opt
        base = _current_rss_mib()  # what is resident now; the peak below is the high-water mark
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
    Path(out, f"{rank}.txt").write_text(f"{peak} {step_s} {head.num_local} {held_mib(head, opt)}")
    if world > 1:
        dist.destroy_process_group()


def run(world: int, rate: float, args: argparse.Namespace) -> list[tuple[float, float, int, float]]:
    """Spawn ``world`` gloo ranks; per rank (peak RSS increase MiB, s/step, C_local, held MiB)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, port, args, rate, out), nprocs=world, join=True)
        rows = [Path(out, f"{r}.txt").read_text().split() for r in range(world)]
    return [(float(a), float(b), int(c), float(d)) for a, b, c, d in rows]


def device_run(args: argparse.Namespace, rate: float, device: torch.device) -> tuple[float | None, float | None, float]:
    """World 1 in this process: (peak MiB, held MiB after the steps, s/step); MiB None off CUDA."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    torch.manual_seed(0)
    head = PartialFCHead(args.embedding_size, args.num_classes, margin="arcface", sample_rate=rate, seed=0).to(device)
    opt = torch.optim.SGD([head.optimizer_param], lr=0.1, momentum=0.9, weight_decay=5e-4)
    head.attach_optimizer(opt)
    t0 = 0.0
    for step in range(args.steps + 1):  # step 0 warms up (allocator, kernels), untimed
        if step == 1:
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        x = torch.randn(args.batch_size, args.embedding_size, device=device, requires_grad=True)
        y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
        opt.zero_grad(set_to_none=True)
        head.loss(x, y).backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize(device)
    step_s = (time.perf_counter() - t0) / max(1, args.steps)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None
    held = (torch.cuda.memory_allocated(device) - base) / 2**20 if cuda else held_mib(head, opt)
    del head, opt
    return peak, held, step_s


def device_main(args: argparse.Namespace) -> None:
    """``--device cuda`` / ``--dry-run``: peak device memory of Partial FC at world 1."""
    device = torch.device("cpu" if args.dry_run else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("partial_fc_memory: --device cuda but torch.cuda.is_available() is False")
    c, d, b = args.num_classes, args.embedding_size, args.batch_size
    rows, table = [], []
    for rate in (1.0, 0.2, 0.1):
        peak, held, step_s = device_run(args, rate, device)
        table.append((rate, peak, held, step_s))
        note = f"held after the steps {held:,.1f} MiB; {step_s * 1e3:.1f} ms/step"
        if peak is None:
            note += " (tensor bytes); no CUDA (dry run): the peak is not measured"
        rows.append(row("Partial FC memory", f"world 1, sample_rate {rate}, C={c:,}, D={d}, B={b}, SGD momentum",
                        peak, "MiB peak", None if peak is None or table[0][1] is None else peak / table[0][1],
                        "" if rate == 1.0 else "sample_rate 1.0", note=note))
    one = c * d * 4 / 2**20
    print(f"C={c:,} D={d} B={b} float32 on {device}: one [C, D] tensor = {one:,.0f} MiB")
    print("| sample_rate | peak MiB | held MiB | ms/step |\n|---:|---:|---:|---:|")
    for rate, peak, held, step_s in table:
        print(f"| {rate} | {peak if peak is None else f'{peak:,.0f}'} | {held if held is None else f'{held:,.0f}'} | {step_s * 1e3:.1f} |")
    write_rows(args.json, "partial_fc_memory", device.type, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-classes", type=int, default=1_000_000)
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128, help="per rank")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu: spawned ranks, host RSS; cuda: world 1 on the GPU")
    p.add_argument("--dry-run", action="store_true", help="the --device code path on the CPU, tiny sizes")
    p.add_argument("--json", default=None, help="also write the rows here (--device cuda / --dry-run)")
    args = p.parse_args()
    if args.dry_run or args.device != "cpu":
        if args.dry_run:
            args.num_classes, args.embedding_size, args.batch_size, args.steps = 1000, 32, 16, 2
        device_main(args)
        return
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
