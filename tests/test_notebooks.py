"""Every ``notebooks/*.ipynb`` runs top to bottom in a fresh kernel and is stored without outputs.

The kernel is the interpreter running pytest: a ``python3`` kernelspec pointing at
``sys.executable`` is written into a temporary ``JUPYTER_PATH``, which Jupyter searches before any
installed kernelspec. ``MPLBACKEND=Agg`` keeps matplotlib headless; notebooks that draw use
``%matplotlib inline`` so their figures become ``image/png`` outputs. Cells tagged
``skip-in-tests`` are dropped before execution.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
SKIP_TAG = "skip-in-tests"
# minimum number of image outputs per notebook (a notebook not listed here must only run cleanly)
MIN_IMAGES = {"margin_curves.ipynb": 4}


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``python3`` kernelspec for this interpreter in a temp JUPYTER_PATH; returns a work dir."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    workdir = tmp_path / "work"
    workdir.mkdir()
    return workdir


def _images(nb) -> int:
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") in ("display_data", "execute_result") and "image/png" in out.get("data", {})
    )


def test_notebooks_exist() -> None:
    assert (NOTEBOOKS_DIR / "margin_curves.ipynb") in NOTEBOOKS, f"no margin_curves.ipynb in {NOTEBOOKS_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_stored_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} have stored outputs or execution counts; clear them, e.g. "
        f"`jupyter nbconvert --clear-output --inplace {path.relative_to(NOTEBOOKS_DIR.parent)}`"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_executes(path: Path, kernel_env: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if SKIP_TAG not in c.get("metadata", {}).get("tags", [])]
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(kernel_env)}}
    )
    # check the kernel really is this interpreter before trusting anything it ran
    probe = nbformat.v4.new_code_cell("import sys; print(sys.executable)")
    nb.cells.insert(0, probe)
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:  # the message carries the traceback
        pytest.fail(f"{path.name} failed:\n{exc}", pytrace=False)
    printed = "".join(o.get("text", "") for o in nb.cells[0].outputs).strip()
    assert printed == sys.executable, f"kernel ran {printed!r}, not {sys.executable!r}"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: error outputs {[(e.ename, e.evalue) for e in errors]}"
    n_images = _images(nb)
    want = MIN_IMAGES.get(path.name, 0)
    assert n_images >= want, f"{path.name}: {n_images} image outputs, expected at least {want}"
