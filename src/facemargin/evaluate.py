"""Score a model: ``python -m facemargin.evaluate ckpt_path=... eval=[lfw,cfp_fp,agedb_30,ijbc]``.

``ckpt_path`` is a training checkpoint, a file written by ``facemargin.export`` (ONNX,
TorchScript) or a published model (insightface ``backbone.pth``, AdaFace ``.ckpt``, CVLface
``model.pt``, a foreign ONNX file; ``backbone=NAME`` and ``input.*=`` where the file does not say,
see :mod:`facemargin.published`). Every ``eval/<name>.yaml`` adds one named evaluator (``conf/evaluate.yaml`` says
where the sets live: ``eval_root``, ``ijb_root``, by default under ``$FACEMARGIN_DATA``). The same
evaluator objects run in training validation. Prints one table per protocol and writes
``eval.json`` (figures, and why a figure is null) into the run folder. Embeddings are cached per
(model, set): evaluating the same model on the same set again only re-scores.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .errors import UserError
from .hydra_entry import hydra_main

if TYPE_CHECKING:  # imported when a command runs: --help answers before torch is imported
    from .evaluation.base import Evaluator
    from .evaluation.embedder import Embedder
    from .evaluation.runner import EmbeddingCache

__all__ = ["evaluate", "format_tables", "main"]

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"


def evaluate(
    model: Embedder,
    evaluators: Sequence[Evaluator],
    cache: EmbeddingCache | None = None,
    batch_size: int = 256,
    num_workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """``{"model", "sets": {name: figures}, "notes": {name: {key: why null}}, "cached": {name: bool}}``,
    keyed by each evaluator's ``name``."""
    from .evaluation.runner import run_evaluator

    names = [ev.name for ev in evaluators]
    if len(set(names)) != len(names):
        raise ValueError(f"two evaluation sets have the same name: {names}; give each a distinct name=")
    result: dict[str, Any] = {"model": model.source, "sets": {}, "notes": {}, "cached": {}}
    for evaluator in evaluators:
        name = evaluator.name
        figures, cached = run_evaluator(model, evaluator, cache, batch_size, num_workers, progress)
        result["sets"][name] = figures
        result["notes"][name] = dict(evaluator.notes)
        result["cached"][name] = cached
        log.info("%s: %s%s", name, json.dumps(figures), " (cached embeddings)" if cached else "")
    return result


def _cell(key: str, value: float) -> str:
    if math.isnan(value):
        return "null*"
    if key == "xnorm":
        return f"{value:.2f}"
    return f"{value:.4f}"


def format_tables(result: Mapping[str, Any]) -> str:
    """One text table per set of figure names (pairs sets together, IJB sets together), then the
    notes explaining every null figure."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, figures in result["sets"].items():
        groups.setdefault(tuple(figures), []).append(name)
    blocks = []
    for keys, names in groups.items():
        rows = [["set", *keys]] + [[n, *(_cell(k, result["sets"][n][k]) for k in keys)] for n in names]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        blocks.append("\n".join(lines))
    notes = []
    for n, by_key in result["notes"].items():
        by_why: dict[str, list[str]] = {}
        for k, why in by_key.items():
            by_why.setdefault(why, []).append(k)
        notes += [f"* {n} {', '.join(keys)}: {why}" for why, keys in by_why.items()]
    return "\n\n".join(blocks + (["\n".join(notes)] if notes else []))


def _plain(value: Any) -> Any:
    """JSON-ready: NaN -> null (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _instantiate_evaluators(nodes: Mapping[str, Any]) -> dict[str, Evaluator]:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    evaluators = {}
    for key, node in nodes.items():
        if not node:
            continue
        try:
            evaluators[key] = instantiate(node)
        except InstantiationException as exc:
            cause = exc.__cause__
            if isinstance(cause, FileNotFoundError):  # the set is not where the config looks: say where that is set
                raise UserError(f"eval.{key}: {cause}",
                                hint="say where the sets live: eval_root=..., ijb_root=..., or FACEMARGIN_DATA") from exc
            if isinstance(cause, (UserError, ValueError)):  # a refused or malformed file: no hint about where
                raise UserError(f"eval.{key}: {cause}", hint=getattr(cause, "hint", None)) from exc
            raise
    if not evaluators:
        raise UserError("no evaluation set selected: pass eval=[lfw,cfp_fp,...]", hint="the sets are the files in conf/eval/")
    return evaluators


def _run(cfg: Any) -> None:
    from .evaluation.embedder import load_embedder
    from .evaluation.runner import EmbeddingCache

    if "://" not in str(cfg.ckpt_path) and not Path(str(cfg.ckpt_path)).is_file():
        raise UserError(f"ckpt_path={cfg.ckpt_path}: no such file",
                        hint="a training checkpoint (.ckpt), a file written by python -m facemargin.export, "
                             "or a published model (insightface .pth/.onnx, AdaFace .ckpt)")
    from .published.options import config_model_options

    evaluators = _instantiate_evaluators(cfg.eval)  # first: a set that is not there is said before any model loads
    model = load_embedder(cfg.ckpt_path, cfg.device, **config_model_options(cfg))
    cache = EmbeddingCache(cfg.cache_dir) if cfg.cache else None
    result = evaluate(model, list(evaluators.values()), cache, cfg.batch_size, cfg.num_workers, cfg.progress)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / EVAL_FILE).write_text(json.dumps(_plain(result), indent=2) + "\n")
    print(format_tables(result))
    print(f"\nwrote {out / EVAL_FILE}")


def main() -> None:
    """``python -m facemargin.evaluate``: a user's mistake is one line and exit status 2."""
    hydra_main("facemargin.evaluate", "evaluate", __doc__, _run)


if __name__ == "__main__":
    main()
