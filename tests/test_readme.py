"""Every ``python -m facemargin...`` command the README shows is run here, as far as a test can
without the data sets it names.

* Hydra entry points (``train``, ``evaluate``, ``export``, ``clean``): the command's overrides are
  composed with the packaged config (``-m`` sweeps with each swept value): every group option and
  every key it names must exist, so the README cannot drift from ``conf/``.
* The ``key=value`` and ``--flag`` entry points (``sweep``, ``embed``, ``compare``, ``data.pack``,
  ``data.inspect``, ``detect``): the command runs as written in an empty folder; it may stop because
  a file it names is not there (one line, exit 2), never because of its options or arguments.
* Each entry point the README shows also runs end to end elsewhere in the suite
  (:data:`END_TO_END`, checked to name an existing test).
* The README has a table of contents whose links reach its sections, and shows what the code does
  where it says what a command writes (``embed``'s ``<out>.txt``, ``metrics.csv`` with every logger).
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
HYDRA_APPS = {"train": "config", "evaluate": "evaluate", "export": "export", "clean": "clean"}

#: entry point -> a test that runs it end to end (file::function)
END_TO_END = {
    "train": "test_train.py::test_multirun_over_the_margin_writes_a_summary",
    "evaluate": "test_cli_models.py::test_export_then_evaluate_the_onnx_file_twice",
    "export": "test_cli_models.py::test_export_then_evaluate_the_onnx_file_twice",
    "clean": "test_clean.py::test_cli_reports_what_it_dropped",
    "sweep": "test_sweep.py::test_summary_flags_identical_weights_and_says_why",
    "embed": "test_cli_models.py::test_embed_and_compare_entry_points",
    "compare": "test_cli_models.py::test_embed_and_compare_entry_points",
    "data.pack": "test_pack_inspect.py::test_pack_cli_and_inspect_cli",
    "data.inspect": "test_pack_inspect.py::test_module_entry_points",
    "detect": "test_detect_cli.py::test_detect_cli_writes_the_landmark_list_and_the_photos_without_a_face",
}


def readme_commands() -> list[tuple[str, list[str]]]:
    """``(module, arguments)`` of every ``python -m facemargin.<module> ...`` in the README's shell blocks
    (continuation lines joined; a trailing ``# comment`` and a bare ``...`` dropped)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            m = re.search(r"python -m facemargin\.([\w.]+)(.*)", line)
            if not m:
                continue
            args = shlex.split(m.group(2), comments=True)
            found.append((m.group(1), [a for a in args if a != "..."]))
    return found


COMMANDS = readme_commands()


def test_the_readme_shows_the_commands():
    modules = {module for module, _ in COMMANDS}
    assert {"train", "evaluate", "export", "clean", "sweep", "embed", "compare", "data.pack", "data.inspect"} <= modules
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("module", sorted({m for m, _ in COMMANDS}))
def test_each_entry_point_runs_end_to_end_in_the_suite(module):
    target = END_TO_END.get(module)
    assert target, f"no end-to-end test is named for python -m facemargin.{module}"
    path, name = target.split("::")
    assert re.search(rf"^def {name}\(", (REPO / "tests" / path).read_text(), re.M), target


def _sweep_values(overrides: list[str]) -> list[list[str]]:
    """One override list per job of a ``-m`` sweep (``key=a,b`` -> each value; lists are not split)."""
    choices = []
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and "," in value and not value.startswith("["):
            choices.append([f"{key}={v}" for v in value.split(",")])
        else:
            choices.append([o])
    return [list(c) for c in itertools.product(*choices)]


@pytest.mark.parametrize("module, args", [c for c in COMMANDS if c[0] in HYDRA_APPS],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_hydra_commands_compose(module, args, monkeypatch):
    from hydra import compose, initialize_config_dir

    from facemargin.hydra_entry import config_dir, register_resolvers

    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    overrides = [a for a in args if a not in ("-m", "--multirun") and not a.startswith("hydra.")]
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for job in _sweep_values(overrides):
            cfg = compose(HYDRA_APPS[module], overrides=job)
            for item in job:  # every value given is the value composed
                key, _, value = item.lstrip("+").partition("=")
                if "/" in key or key.split(".")[0] in ("eval", "experiment") or "." not in key:
                    continue  # group choices
                node = cfg
                for part in key.split("."):
                    node = node[part]
                assert str(node) == value.strip("'\"") or str(value).startswith("[") or isinstance(node, (int, float))


@pytest.mark.parametrize("module, args", [c for c in COMMANDS if c[0] not in HYDRA_APPS],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_other_commands_parse_as_written(module, args, tmp_path):
    proc = subprocess.run([sys.executable, "-m", f"facemargin.{module}", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "WANDB_MODE": "offline"})
    said = proc.stdout + proc.stderr
    assert "Traceback" not in said, said[-3000:]
    for shape in ("unknown option", "unrecognized arguments", "expected ", "usage:"):
        assert shape not in said.split("\nhint:")[0], said[-2000:]  # refused for a missing file, not its form
    assert proc.returncode in (0, 1, 2), said[-2000:]


def test_table_of_contents_reaches_every_section():
    contents = README.split("## Contents", 1)[1].split("\n## ", 1)[0]
    links = re.findall(r"\]\(#([\w-]+)\)", contents)
    headings = re.findall(r"^## (.+)$", README, re.M)

    def anchor(title: str) -> str:
        return re.sub(r"[^\w\- ]", "", title.lower()).strip().replace(" ", "-")

    anchors = {anchor(h) for h in headings}
    assert set(links) <= anchors, set(links) - anchors
    assert {anchor(h) for h in headings if h != "Contents"} <= set(links)


def test_the_readme_says_what_the_code_writes():
    from facemargin import embed

    assert "embeddings.txt" not in README and "`<out>.txt`" in README
    assert "<out>.txt" in embed.__doc__
    assert "written with every `logger=` (`csv`, `tensorboard`, `wandb`, `none`)" in README
    data_row = next(line for line in README.splitlines() if line.startswith("| `data` |"))
    assert "`folder`" in data_row
    assert "../shared" not in (REPO / "docs" / "architecture.md").read_text()
    assert "notebooks/" in README and "jupyter" in README.lower()
