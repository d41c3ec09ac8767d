"""Peak host memory of one training step per backbone and batch size, on the CPU (float32).

Each (backbone, batch) cell runs in a fresh process: it builds the backbone (``build_embedder``,
512-d embedding, 112x112) and a random uint8 batch, records ``ru_maxrss`` (the baseline: imports,
weights, input), then runs forward + backward of ``embedding.square().mean()`` (train mode) and
records ``ru_maxrss`` again. The figure is the increase: activations kept for backward, gradients,
and the temporaries of the step -- what the batch size costs on top of the weights. Weights are
shown beside it (float32). GPU figures differ (cuDNN workspaces, mixed precision halves the
activations): these are CPU measurements, stated as such.

    python benchmarks/backbone_memory.py                           # the README table
    python benchmarks/backbone_memory.py --backbones iresnet50 --batches 8 16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

DEFAULT_BACKBONES = ["mobilefacenet", "iresnet50", "iresnet100", "iresnet200", "adaface_ir101", "face_vit_t", "face_vit_b"]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def cell(name: str, batch: int, threads: int) -> dict[str, float]:
    """Run one (backbone, batch) step in this process; returns its figures."""
    import torch

    from facemargin.backbones import build_embedder
    from facemargin.input_spec import input_spec_of

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_embedder(name, embedding_size=512).train()
    images = torch.randint(0, 256, (batch, 3, 112, 112), dtype=torch.uint8)
    spec = input_spec_of(net)
    before = _rss_mib()
    emb = net(spec.normalize(images))
    emb.square().mean().backward()
    peak = _rss_mib()
    params = sum(p.numel() for p in net.parameters()) * 4 / 2**20
    return {"backbone": name, "batch": batch, "weights_mib": round(params, 1), "step_mib": round(peak - before, 1)}


def table(rows: list[dict[str, float]], batches: list[int]) -> str:
    """Markdown: one row per backbone, weights then the step's peak increase per batch size (GiB)."""
    names = list(dict.fromkeys(r["backbone"] for r in rows))
    head = "| backbone | weights | " + " | ".join(f"batch {b}" for b in batches) + " |"
    lines = [head, "|---" * (2 + len(batches)) + "|"]
    for name in names:
        got = {r["batch"]: r for r in rows if r["backbone"] == name}
        weights = next(iter(got.values()))["weights_mib"]
        cells = [f"{got[b]['step_mib'] / 1024:.2f} GiB" if b in got else "-" for b in batches]
        lines.append(f"| {name} | {weights:.0f} MiB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES)
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cell", nargs=2, metavar=("BACKBONE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(cell(args.cell[0], int(args.cell[1]), args.threads)))
        return
    rows = []
    for name in args.backbones:
        for batch in args.batches:
            out = subprocess.run([sys.executable, __file__, "--cell", name, str(batch), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(table(rows, args.batches))


if __name__ == "__main__":
    main()
