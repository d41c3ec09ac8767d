"""Summarise a Hydra multirun: one row per job (its overrides and final metrics) as CSV, Markdown
and a plot of verification accuracy against the swept value.

Runs by itself at the end of every ``python -m facemargin.train -m ...`` (a Hydra callback set in
``conf/hydra/default.yaml``), or by hand: ``python -m facemargin.sweep multirun/2026-11-22/10-00-00``.

Jobs whose swept values differ but whose final weights are bitwise identical are flagged in the
summary with the reason (:func:`identical_weights`, :func:`explain_identical`): a sweep over a
margin that changes nothing is a finding, not a result.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import yaml

from .cli import Option, parse_kv_args, run_cli
from .errors import UserError

if TYPE_CHECKING:
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


class NoFinishedJobs(UserError, FileNotFoundError):
    """A folder without any finished job (``*/metrics.json``)."""


def summarize(sweep_dir: str | Path, metric: str = METRIC) -> list[dict[str, Any]]:
    """Write ``summary.csv``, ``summary.md`` and ``summary.png`` into ``sweep_dir``; return the rows.

    ``summary.md`` ends with a note for each group of jobs that differ in a swept value but ended
    with bitwise-identical weights, saying why that happens."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        raise NoFinishedJobs(f"no finished jobs (*/{METRICS_FILE}) under {sweep_dir}")
    swept = swept_keys(rows)
    metric_cols = sorted({k for r in rows for k in r if k.startswith(("val/", "best/"))})
    columns = ["job", *swept, *metric_cols]
    with open(sweep_dir / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    notes = [explain_identical(group, swept) for group in identical_weights(sweep_dir, rows)] if swept else []
    (sweep_dir / "summary.md").write_text(_markdown(rows, columns) + "".join(f"\n**{n}**\n" for n in notes))
    _plot(rows, swept, metric, sweep_dir / "summary.png")
    return rows


# --------------------------------------------------------------------------- identical results
#: -log of float32's resolution next to 1 (2**-24): a target probability below exp(-this) vanishes
#: in 1 - p, and beside the other classes' sum
FLOAT32_LOSS_FLOOR = 24 * math.log(2)
#: override keys of the margin: identical weights across them have the mechanism explained
MARGIN_KEYS = ("loss.m", "loss.m1", "loss.m2", "loss.m3", "loss.s", "loss.h", "loss.t_alpha")


def weights_digest(checkpoint: Path) -> str | None:
    """SHA-1 of a checkpoint's ``state_dict`` (names, dtypes, shapes and bytes), or ``None`` when
    the file is missing or unreadable."""
    import torch

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True).get("state_dict", {})
    except (OSError, RuntimeError, EOFError, AttributeError, ValueError):
        return None
    digest = hashlib.sha1()
    for name in sorted(state):
        t = state[name]
        if isinstance(t, torch.Tensor):
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def identical_weights(sweep_dir: Path, rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Groups (of two or more) of jobs whose ``checkpoints/last.ckpt`` hold bitwise-identical weights."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        digest = weights_digest(Path(sweep_dir) / row["job"] / "checkpoints" / "last.ckpt")
        if digest is not None:
            groups.setdefault(digest, []).append(row)
    return [g for g in groups.values() if len(g) > 1]


def explain_identical(group: list[dict[str, Any]], swept: Sequence[str]) -> str:
    """Why jobs with different swept values ended with identical weights (one paragraph)."""
    keys = [k for k in swept if len({repr(r.get(k)) for r in group}) > 1] or list(swept)
    values = "; ".join(", ".join(f"{k}={r.get(k)}" for k in keys) for r in group)
    text = (f"identical results: jobs {', '.join(str(r['job']).split('_')[0] for r in group)} ({values}) ended with "
            "bitwise-identical weights, so the swept value did not change training.")
    if not any(k in MARGIN_KEYS or k.startswith("loss.") for k in keys):
        return text + " Expected where the setting does not enter the arithmetic (e.g. data.num_workers)."
    losses = [r.get("train/loss_epoch") for r in group if isinstance(r.get("train/loss_epoch"), (int, float))]
    evidence = ""
    if losses:
        loss = min(losses)
        evidence = (f" Here the final training loss is {loss:.2f}, a target probability of about {math.exp(-loss):.1e}"
                    + (f", below float32's 2^-24 = 6.0e-08." if loss > FLOAT32_LOSS_FLOOR else "."))
    return text + (
        " The margin only acts through the target's softmax probability p = exp(s*psi(theta)) / sum_j exp(s*cos(theta_j)). "
        "With grad=detached the gradient on the target cosine is s*(p - 1) and on every other class s*p_j, whatever "
        "psi is; when s*psi(theta) sits far below the other logits (large s, an early or short run), p stays under "
        "float32's resolution, 1 - p rounds to 1 and the other classes' p_j do not see the target term, so every "
        "margin gives the same gradient, bit for bit." + evidence +
        " Train longer, lower loss.s (the demo uses 32), or use loss.grad=exact, whose target gradient depends on m.")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan  # null in metrics.json -> NaN


def error_bar(row: dict[str, Any], metric: str) -> float:
    """The 10-fold std behind ``row[metric]``: ``<metric>_std``, or for ``val/acc`` (the mean over the
    verification sets) the root mean square of the sets' ``val/<set>/acc_std``; NaN when unknown."""
    std = _number(row.get(f"{metric}_std"))
    if not math.isnan(std):
        return std
    if metric == METRIC:
        stds = [_number(v) for k, v in row.items() if k.startswith("val/") and k.endswith("/acc_std")]
        stds = [v for v in stds if not math.isnan(v)]
        if stds:
            return math.sqrt(sum(s * s for s in stds) / len(stds))
    return math.nan


def y_limits(values: list[float], errors: list[float], accuracy: bool) -> tuple[float, float]:
    """A y-range that shows the points with their error bars and spans at least 6 std (or 2
    percentage points of accuracy), so that differences within the noise do not look like a cliff."""
    pts = [(v, 0.0 if math.isnan(e) else e) for v, e in zip(values, errors) if not math.isnan(v)]
    if not pts:
        return (0.0, 1.0)
    lo, hi = min(v - e for v, e in pts), max(v + e for v, e in pts)
    floor = max([6 * e for _, e in pts] + [0.02 if accuracy else 0.0])
    if hi - lo < floor:
        mid = (lo + hi) / 2
        lo, hi = mid - floor / 2, mid + floor / 2
    pad = 0.08 * (hi - lo) or 0.05 * max(abs(hi), 1e-3)
    lo, hi = lo - pad, hi + pad
    if accuracy:  # keep the span inside [0, 1] by shifting the window, not by cutting it
        shift = max(0.0, hi - 1.0) - max(0.0, -lo)
        lo, hi = max(lo - shift, 0.0), min(hi - shift, 1.0)
    return lo, hi


def plot_summary(rows: list[dict[str, Any]], swept: list[str], metric: str = METRIC):
    """The figure of ``summary.png``: ``metric`` against the first numeric swept key (one line per
    combination of the others), each point with its 10-fold std as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = next((k for k in swept if all(isinstance(r.get(k), (int, float)) for r in rows)), None)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        label = ", ".join(f"{k}={r.get(k)}" for k in swept if k != x_key) or metric
        groups.setdefault(label, []).append(r)
    values, errors = [], []
    for label, group in groups.items():
        pts = sorted(
            ((r.get(x_key) if x_key else r["job"], _number(r.get(metric)), error_bar(r, metric)) for r in group),
            key=lambda p: p[0] if x_key else 0,
        )
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=[0.0 if math.isnan(e) else e for e in es], marker="o", capsize=3, label=label)
        values += ys
        errors += es
    accuracy = "acc" in metric and all(0.0 <= v <= 1.0 for v in values if not math.isnan(v))
    ax.set_ylim(*y_limits(values, errors, accuracy))
    ax.set_xlabel(x_key or "job")
    ax.set_ylabel(metric)
    bars = "bars: ±1 std over the 10 folds" if any(not math.isnan(e) for e in errors) else "no fold std in metrics.json"
    ax.set_title(f"{metric} vs {x_key or 'job'} ({len(rows)} jobs; {bars})", fontsize=9)
    ax.grid(alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot(rows: list[dict[str, Any]], swept: list[str], metric: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = plot_summary(rows, swept, metric)
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SweepSummaryCallback:
    """Hydra callback: summarise the sweep directory when a multirun ends.

    Shaped like ``hydra.experimental.callback.Callback`` (every other ``on_*`` hook does nothing)
    without importing Hydra, so that ``python -m facemargin.sweep --help`` answers at once."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            rows = summarize(sweep_dir)
        except NoFinishedJobs as err:
            print(f"[facemargin] no sweep summary: {err}")
            return
        print(f"[facemargin] sweep summary of {len(rows)} jobs: {sweep_dir / 'summary.md'} (and summary.csv, summary.png)")
        print((sweep_dir / "summary.md").read_text())


OPTIONS = {"metric": Option(METRIC, "the metric plotted against the swept value (a key of the jobs' metrics.json)")}


def _run(sweep_dir: Path, metric: str) -> None:
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir}: no such folder", hint="give a multirun folder, e.g. multirun/2026-11-22/10-00-00")
    rows = summarize(sweep_dir, metric)
    print((sweep_dir / "summary.md").read_text(), end="")
    print(f"{len(rows)} jobs -> {sweep_dir}/summary.csv, summary.md, summary.png")


def main(argv: list[str] | None = None) -> None:
    """``python -m facemargin.sweep SWEEP_DIR [metric=val/acc]``: a user's mistake is one line, status 2."""
    args = parse_kv_args(argv, "facemargin.sweep", __doc__, {"SWEEP_DIR": "a multirun folder (multirun/DATE/TIME)"},
                         OPTIONS)
    run_cli(lambda: _run(Path(args["SWEEP_DIR"]), args["metric"]), "facemargin.sweep")


if __name__ == "__main__":
    main()
