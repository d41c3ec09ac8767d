"""Where the default run's time goes: ``python -m facemargin.train`` (the demo) profiled by phase.

Runs the default config in this process (as ``facemargin.train.run`` does for the command) and
splits its wall and CPU time into start-up (imports, config, model and loaders built, demo set
generated when not cached), training steps (data included) and validation; ``--baseline`` runs the
demo's previous defaults (iresnet_demo at widths 32/64/128, s = 64) the same way, in the same
process, and prints each phase's ratio new / previous. Same data, same steps, same validation on
both sides; only the backbone's width and the loss scale differ.

    python benchmarks/demo_run.py --baseline            # ~2 x the demo's time
    python benchmarks/demo_run.py --threads 1           # one torch thread: CPU time without OpenMP spin
    python benchmarks/demo_run.py --baseline trainer.max_epochs=1   # a shorter look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl

#: the demo's defaults before issue 18 (the baseline); everything else is the default config
PREVIOUS_DEMO = ["backbone.kwargs.widths=[32,64,128]", "backbone.kwargs.stem_width=32", "loss.s=64"]


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class PhaseTimer(pl.Callback):
    """Wall and CPU seconds of the training steps (data waits included) and of validation."""

    latest: "PhaseTimer | None" = None  # the instance the run's Trainer holds

    def __init__(self) -> None:
        PhaseTimer.latest = self
        self.wall = {"steps": 0.0, "validation": 0.0}
        self.cpu = {"steps": 0.0, "validation": 0.0}
        self._mark: tuple[float, float] | None = None

    def _start(self) -> None:
        self._mark = (time.perf_counter(), cpu_seconds())

    def _stop(self, phase: str) -> None:
        if self._mark is not None:
            self.wall[phase] += time.perf_counter() - self._mark[0]
            self.cpu[phase] += cpu_seconds() - self._mark[1]
        self._mark = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop("steps")
        self._start()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._stop("validation")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop("steps")


def profile(overrides: list[str], out: Path) -> dict:
    from hydra import compose, initialize_config_dir

    from facemargin.train import config_dir, run

    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={out}", "callbacks.progress_bar.plain=true",
                                           "+callbacks.phase_timer={_target_:__main__.PhaseTimer}", *overrides])
    metrics = run(cfg)
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    t = PhaseTimer.latest
    phases = {"total": (wall, cpu), "steps": (t.wall["steps"], t.cpu["steps"]),
              "validation": (t.wall["validation"], t.cpu["validation"])}
    phases["start-up and the rest"] = (wall - t.wall["steps"] - t.wall["validation"],
                                       cpu - t.cpu["steps"] - t.cpu["validation"])
    return {"phases": phases, "val/acc": metrics.get("val/acc"), "best/val/acc": metrics.get("best/val/acc"),
            "steps": metrics.get("global_step")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", action="store_true", help="also run the previous demo defaults, for ratios")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs (e.g. trainer.max_epochs=1)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs["demo"] = profile(args.overrides, Path(tmp) / "demo")
        if args.baseline:
            runs["previous"] = profile([*PREVIOUS_DEMO, *args.overrides], Path(tmp) / "previous")
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at the end")
    for name, r in runs.items():
        print(f"{name}: {r['steps']:.0f} steps, val/acc {r['val/acc']:.4f} (best {r['best/val/acc']:.4f})")
        for phase, (wall, cpu) in r["phases"].items():
            ratio = ""
            if name == "demo" and "previous" in runs:
                pw, pc = runs["previous"]["phases"][phase]
                ratio = f"   new/previous: wall {wall / pw:.2f}x, CPU {cpu / pc:.2f}x"
            print(f"  {phase:<22} wall {wall:7.1f} s   CPU {cpu:7.1f} s{ratio}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
