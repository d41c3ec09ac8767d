"""Training samples/s through the real training path: Hydra config -> ``facemargin.train.build``
-> Lightning Trainer, the demo face set's JPEGs through the training loader.

Per backbone (default iresnet50 and iresnet100, batch 128, ``--workers`` DataLoader workers), one
fit per variant, each in this process, each timed from step ``--warmup`` to the last of
``--steps`` further steps (the device synchronised at both ends, so compilation and the loaders'
start stay out of the figure):

* ``bf16, CPU decode`` (the baseline every ratio is paired with): ``trainer.precision=bf16-mixed``,
  workers decode the JPEGs;
* ``bf16, device decode``: ``data.decode=gpu`` (the batch's JPEGs decoded with nvJPEG);
* ``fp32, CPU decode``: ``trainer.precision=32-true``;
* ``bf16, CPU decode, channels-last``: ``model.channels_last=true``;
* ``bf16, CPU decode, compile``: ``model.compile=true`` (compiled during the warm-up steps).

Reported: samples/s, the ratio to the baseline, the peak GPU memory of the fit
(``torch.cuda.max_memory_allocated``). ``--budget-s``: a fit that would start after that many
seconds is not run; its row says so (value null), so the whole check keeps to its time.

    python benchmarks/gpu_train.py --json out/train.json            # on a CUDA machine
    python benchmarks/gpu_train.py --dry-run --json /tmp/train.json  # CPU, tiny sizes, aot_eager
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir

from facemargin.train import build, config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_report import row, write_rows  # noqa: E402

BASELINE = "bf16, CPU decode"
VARIANTS: list[tuple[str, list[str]]] = [
    (BASELINE, ["trainer.precision=bf16-mixed", "data.decode=cpu"]),
    ("bf16, device decode", ["trainer.precision=bf16-mixed", "data.decode=gpu"]),
    ("fp32, CPU decode", ["trainer.precision=32-true", "data.decode=cpu"]),
    ("bf16, CPU decode, channels-last", ["trainer.precision=bf16-mixed", "data.decode=cpu", "model.channels_last=true"]),
    ("bf16, CPU decode, compile", ["trainer.precision=bf16-mixed", "data.decode=cpu", "model.compile=true"]),
]


class StepTimer(pl.Callback):
    """Wall time from the start of batch ``warmup`` to the end of batch ``warmup + steps - 1``."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.start = self.seconds = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self._sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.warmup + self.steps - 1 and self.start is not None:
            self._sync()
            self.seconds = time.perf_counter() - self.start


def overrides(args: argparse.Namespace, backbone: str, variant: list[str], out: str) -> list[str]:
    """The Hydra overrides of one fit (shown in the JSON details)."""
    n = args.warmup + args.steps
    ids, per_id = (6, 4) if args.dry_run else (max(8, -(-(n + 2) * args.batch // 12)), 12)
    demo = f"{{num_identities:{ids},images_per_identity:{per_id},num_val_identities:4,num_val_pairs:10}}"
    common = [
        f"backbone={backbone}", "trainer=cpu" if args.dry_run else "trainer=gpu", "logger=none", "callbacks=none",
        "data=demo", f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
        f"data.persistent_workers={'true' if args.workers else 'false'}", f"++data.demo_options={demo}",
        f"data.demo_cache_dir={args.cache}", f"trainer.max_steps={n}", "trainer.max_epochs=1",
        "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false", "+trainer.enable_checkpointing=false", f"output_dir={out}", "seed=0",
    ]
    if args.dry_run:
        common.append("model.compile_options={backend:aot_eager}")
    return common + variant


def fit(args: argparse.Namespace, cfg_overrides: list[str], device: torch.device) -> tuple[float | None, float | None]:
    """Samples/s and peak device memory (MiB; None on the CPU) of one fit."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=cfg_overrides)
    pl.seed_everything(0, workers=True)
    trainer, model, datamodule = build(cfg)
    timer = StepTimer(args.warmup, args.steps, device)
    trainer.callbacks.append(timer)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit(model, datamodule=datamodule)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    rate = args.steps * args.batch / timer.seconds if timer.seconds else None
    del trainer, model, datamodule
    gc.collect()
    return rate, peak


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="iresnet50,iresnet100")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--only", default="", help="comma-separated substrings: run only matching variants")
    p.add_argument("--budget-s", type=float, default=0.0, help="start no fit after this many seconds (0: no limit)")
    p.add_argument("--cache", default=os.environ.get("GPU_CHECK_CACHE", str(Path(tempfile.gettempdir()) / "facemargin-gpu-check")),
                   help="where the demo set is generated once")
    p.add_argument("--dry-run", action="store_true", help="CPU, backbone=demo (iresnet_demo), batch 8, 1+2 steps, compile backend aot_eager")
    p.add_argument("--json", default=None, help="also write the rows here (benchmarks/gpu_report.py)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.backbones, args.batch, args.warmup, args.steps, args.workers = "demo", 8, 1, 2, 0
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_train: no CUDA device (torch.cuda.is_available() is False); --dry-run runs it on the CPU")
    else:
        device = torch.device("cuda")
    variants = [v for v in VARIANTS if not args.only or any(q in v[0] for q in args.only.split(","))]
    tf32 = f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}"
    rows, details = [], []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        for backbone in args.backbones.split(","):
            base = None
            for name, variant in variants:
                cfg_overrides = overrides(args, backbone, variant, out)
                setting = f"{backbone} {name}; batch {args.batch}, {args.workers} workers, {args.steps} steps"
                if args.budget_s and time.perf_counter() - started > args.budget_s:
                    note = f"not run: the {args.budget_s:.0f} s budget was spent (--budget-s)"
                    rows.append(row("training samples/s", setting, None, "samples/s", note=note))
                    print(f"{backbone:11s} {name:34s} {note}", flush=True)
                    continue
                t0 = time.perf_counter()
                rate, peak = fit(args, cfg_overrides, device)
                wall = time.perf_counter() - t0
                base = rate if name == BASELINE else base
                ratio = rate / base if rate and base and name != BASELINE else (1.0 if name == BASELINE and rate else None)
                note = f"peak {peak:,.0f} MiB" if peak is not None else "CPU dry run"
                if name.startswith("fp32"):
                    note += f"; {tf32}"
                rows.append(row("training samples/s", setting, rate, "samples/s", ratio,
                                BASELINE if name != BASELINE else "", note=note))
                details.append({"backbone": backbone, "variant": name, "overrides": cfg_overrides,
                                "samples_per_s": rate, "peak_mib": peak, "fit_wall_s": wall})
                print(f"{backbone:11s} {name:34s} {rate or float('nan'):8.1f} samples/s  "
                      f"ratio {ratio or float('nan'):.3f}  {note}  (fit {wall:.0f} s)", flush=True)
    write_rows(args.json, "gpu_train", device.type, rows, details)


if __name__ == "__main__":
    main()
