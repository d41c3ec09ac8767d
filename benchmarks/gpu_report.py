"""One table from the pieces of ``benchmarks/gpu_check.sh``.

Each benchmark script given ``--json PATH`` writes its figures there as rows (:func:`write_rows`);
this script merges every ``*.json`` of a folder into ``gpu_check.json`` and ``gpu_check.md`` there
and prints the table:

    python benchmarks/gpu_report.py OUT_DIR

A row: ``figure`` (which benchmark), ``setting`` (what ran), ``value`` + ``unit`` (the measured
figure, or ``None`` with a ``note`` saying why), ``ratio`` (to ``baseline``, the row of the same
figure it was paired with, in the same process) and ``goal`` where the issue states one.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

REPORT_NAME = "gpu_check"


def device_name(device: str) -> str:
    """The GPU's name for ``cuda`` devices, else ``CPU (<machine>)``."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def row(figure: str, setting: str, value: float | None, unit: str, ratio: float | None = None,
        baseline: str = "", goal: str = "", note: str = "") -> dict[str, Any]:
    """One measured figure (see the module docstring)."""
    return {"figure": figure, "setting": setting, "value": value, "unit": unit, "ratio": ratio,
            "baseline": baseline, "goal": goal, "note": note}


def write_rows(path: str | None, benchmark: str, device: str, rows: list[dict[str, Any]],
               details: Any = None) -> None:
    """Write ``rows`` (and anything else worth keeping, ``details``) as JSON to ``path`` (no-op if None)."""
    if not path:
        return
    import torch

    doc = {"benchmark": benchmark, "device": device_name(device), "torch": torch.__version__,
           "argv": sys.argv, "rows": rows, "details": details}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2))


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def markdown(docs: list[dict[str, Any]]) -> str:
    """The merged rows as one Markdown table (devices and torch versions above it)."""
    seen = sorted({(d["device"], d["torch"]) for d in docs})
    lines = [f"device: {dev}; torch {tv}" for dev, tv in seen] + [
        "",
        "| figure | setting | value | unit | ratio | paired with | goal | note |",
        "|---|---|---:|---|---:|---|---|---|",
    ]
    for d in docs:
        for r in d["rows"]:
            ratio = "–" if r["ratio"] is None else f"{r['ratio']:.3f}"
            lines.append(
                f"| {r['figure']} | {r['setting']} | {_fmt(r['value'])} | {r['unit']} | {ratio} | "
                f"{r['baseline'] or '–'} | {r['goal'] or '–'} | {r['note'] or ''} |"
            )
    return "\n".join(lines)


def merge(folder: Path) -> tuple[list[dict[str, Any]], str]:
    """Every piece's JSON in ``folder`` (not the merged report), in name order, and the table."""
    docs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.stem != REPORT_NAME]
    return docs, markdown(docs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    docs, table = merge(args.folder)
    if not docs:
        raise SystemExit(f"gpu_report: no benchmark JSON in {args.folder}")
    (args.folder / f"{REPORT_NAME}.json").write_text(json.dumps(docs, indent=2))
    (args.folder / f"{REPORT_NAME}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
