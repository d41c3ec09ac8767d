"""Identity mixing of the training plans, and what poor mixing costs in accuracy.

    python benchmarks/data_mixing.py plans                 # distinct identities per batch (seconds)
    python benchmarks/data_mixing.py accuracy --epochs 6   # demo-set runs (minutes on 2 cores)

``plans``: the plan is a pure function of sample indices, so batch diversity is measured without
reading a byte: label layouts like MS1MV3 (93 431 identities, 5.18 M images) and Glint360K
(360 232 identities, 17.1 M images), sorted by identity as insightface writes them, identity sizes
drawn from a long-tailed (log-normal) law with the sets' mean. For each plan: median and 5th
percentile of distinct identities per 128-image batch of rank 0 of 8 ranks, over 2 000 batches.
``old-stream`` approximates the previous streaming loader (4 MiB blocks ~ 600 images, a
10 000-image shuffle buffer per worker).

``accuracy``: the demo experiment (``python -m facemargin.train``) with a full shuffle, with the
streaming defaults, and with streaming deliberately starved of mixing (blocks of one identity,
a one-batch window); best ``val/acc`` on the demo's held-out pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from facemargin.data.loading.plan import EpochPlan, PlanSpec

SETS = {"ms1mv3": (93_431, 5_179_510), "glint360k": (360_232, 17_091_657)}
BATCH, WORLD = 128, 8


def sorted_labels(identities: int, images: int, seed: int = 0) -> np.ndarray:
    """Labels sorted by identity; identity sizes log-normal with the set's mean, at least 1."""
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(mean=0.0, sigma=0.8, size=identities)
    sizes = np.maximum(1, np.round(sizes / sizes.sum() * images)).astype(np.int64)
    sizes[: images - sizes.sum()] += 1 if images > sizes.sum() else 0
    return np.repeat(np.arange(identities), sizes)[:images]


def distinct_per_batch(labels: np.ndarray, spec: PlanSpec, batches: int = 2000) -> tuple[float, float]:
    plan = EpochPlan.start(spec, 0, labels.size, WORLD, BATCH)
    seq = plan.sequence(0)[: batches * BATCH].reshape(-1, BATCH)
    counts = np.array([np.unique(labels[b]).size for b in seq])
    return float(np.median(counts)), float(np.percentile(counts, 5))


def plans() -> None:
    grid = [("full shuffle (map-style)", PlanSpec(seed=0))]
    grid += [("old-stream (600 x 10 000)", PlanSpec(seed=0, streaming=True, chunk=600, window=10_000))]
    grid += [(f"stream chunk={c} window={w}", PlanSpec(seed=0, streaming=True, chunk=c, window=w))
             for c in (256, 64, 32, 16) for w in (8192, 32768, 131072)]
    print(f"distinct identities per {BATCH}-image batch (rank 0 of {WORLD}); median / 5th percentile")
    print("| plan | " + " | ".join(SETS) + " |")
    print("|---|" + "---|" * len(SETS))
    labels = {name: sorted_labels(*SETS[name]) for name in SETS}
    for title, spec in grid:
        cells = [distinct_per_batch(labels[name], spec) for name in SETS]
        print(f"| {title} | " + " | ".join(f"{m:.0f} / {p:.0f}" for m, p in cells) + " |")


def accuracy(epochs: int, seeds: list[int]) -> None:
    runs = {
        "full shuffle": ["data.streaming=false"],
        "stream defaults": ["data.streaming=true"],
        "stream starved (chunk 12, window 64)": ["data.streaming=true", "data.chunk_size=12", "data.shuffle_buffer=64"],
    }
    specs = {"full shuffle": PlanSpec(0), "stream defaults": PlanSpec(0, True),
             "stream starved (chunk 12, window 64)": PlanSpec(0, True, 12, 64)}
    cache = Path(tempfile.mkdtemp(prefix="facemargin-mixing-"))
    env = {**os.environ, "FACEMARGIN_CACHE": str(cache), "WANDB_MODE": "offline"}
    demo = np.repeat(np.arange(200), 12)  # the demo set: 200 identities x 12 images, sorted
    print(f"demo set, {epochs} epochs, batch 64; distinct identities per batch (median); best val/acc per seed")
    for title, overrides in runs.items():
        plan = EpochPlan.start(specs[title], 0, demo.size, 1, 64)
        distinct = np.median([np.unique(demo[b]).size for b in plan.sequence(0).reshape(-1, 64)])
        accs = []
        for seed in seeds:
            out = cache / f"run-{len(accs)}-{abs(hash(title))}"
            subprocess.run([sys.executable, "-m", "facemargin.train", *overrides, f"seed={seed}",
                            f"trainer.max_epochs={epochs}", "~callbacks.progress_bar", "logger=none",
                            f"hydra.run.dir={out}"], env=env, check=True, capture_output=True)
            metrics = json.loads((out / "metrics.json").read_text())
            accs.append(metrics.get("best/val/acc", metrics.get("val/acc")))
        print(f"| {title} | {distinct:.0f} | " + " | ".join(f"{a:.4f}" for a in accs) + f" | mean {np.mean(accs):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["plans", "accuracy"])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    plans() if args.what == "plans" else accuracy(args.epochs, args.seeds)


if __name__ == "__main__":
    main()
