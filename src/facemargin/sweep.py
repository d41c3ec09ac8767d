"""Summarise a Hydra multirun: one row per job (its overrides and final metrics) as CSV, Markdown
and a plot of verification accuracy against the swept value.

Runs by itself at the end of every ``python -m facemargin.train -m ...`` (a Hydra callback set in
``conf/hydra/default.yaml``), or by hand: ``python -m facemargin.sweep multirun/2026-11-22/10-00-00``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

METRIC = "val/acc"
METRICS_FILE = "metrics.json"


def _value(text: str) -> Any:
    """Override values as numbers where they are numbers (``0.5`` -> 0.5)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One dict per finished job: its overrides (``key=value``) and its ``metrics.json``."""
    rows = []
    for metrics_path in sorted(Path(sweep_dir).glob(f"*/{METRICS_FILE}")):
        job = metrics_path.parent
        overrides_path = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.exists() else []
        row: dict[str, Any] = {"job": job.name}
        for item in overrides or []:
            key, _, value = str(item).partition("=")
            row[key.lstrip("+~")] = _value(value)
        row.update(json.loads(metrics_path.read_text()))
        rows.append(row)
    return rows


def swept_keys(rows: list[dict[str, Any]], metric_prefixes: tuple[str, ...] = ("val/", "train/", "best/", "lr-")) -> list[str]:
    """Override keys whose value differs between jobs."""
    keys = [k for k in rows[0] if k != "job" and not k.startswith(metric_prefixes) and k != "global_step"] if rows else []
    return [k for k in keys if len({repr(r.get(k)) for r in rows}) > 1]


def summarize(sweep_dir: str | Path, metric: str = METRIC) -> list[dict[str, Any]]:
    """Write ``summary.csv``, ``summary.md`` and ``summary.png`` into ``sweep_dir``; return the rows."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"no finished jobs (*/{METRICS_FILE}) under {sweep_dir}")
    swept = swept_keys(rows)
    metric_cols = sorted({k for r in rows for k in r if k.startswith(("val/", "best/"))})
    columns = ["job", *swept, *metric_cols]
    with open(sweep_dir / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.md").write_text(_markdown(rows, columns))
    _plot(rows, swept, metric, sweep_dir / "summary.png")
    return rows


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], swept: list[str], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = next((k for k in swept if all(isinstance(r.get(k), (int, float)) for r in rows)), None)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        label = ", ".join(f"{k}={r.get(k)}" for k in swept if k != x_key) or metric
        groups.setdefault(label, []).append(r)
    for label, group in groups.items():
        pts = [(r.get(x_key) if x_key else r["job"], r.get(metric, float("nan"))) for r in group]
        pts.sort(key=lambda p: p[0] if x_key else 0)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel(x_key or "job")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SweepSummaryCallback(Callback):
    """Hydra callback: summarise the sweep directory when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            rows = summarize(sweep_dir)
        except FileNotFoundError as err:
            print(f"[facemargin] no sweep summary: {err}")
            return
        print(f"[facemargin] sweep summary of {len(rows)} jobs: {sweep_dir / 'summary.md'}")
        print((sweep_dir / "summary.md").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metric", default=METRIC)
    args = parser.parse_args(argv)
    rows = summarize(args.sweep_dir, args.metric)
    print((args.sweep_dir / "summary.md").read_text(), end="")
    print(f"{len(rows)} jobs -> {args.sweep_dir}/summary.csv, summary.md, summary.png")


if __name__ == "__main__":
    main()
