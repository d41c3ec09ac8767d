"""The data/ tree: layers that import only downwards, small modules, light imports, a root resolved once."""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_face_set

SRC = Path(__file__).resolve().parents[1] / "src"
DATA = SRC / "facemargin" / "data"
#: bottom to top; a module may import from its own layer and the ones below it
LAYERS = {"storage": 0, "formats": 1, "sources": 2, "loading": 3, "tools": 4, "module": 4, "pack": 4, "inspect": 4}
#: what data/ may use from the rest of facemargin (none of it imports data/ back up)
OUTSIDE = ("facemargin.config", "facemargin.errors", "facemargin.cli", "facemargin.input_spec", "facemargin.detect", "facemargin.align")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in ``path`` (inside functions too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[2]) if len(parts) > 2 and parts[:2] == ["facemargin", "data"] else None


def test_data_imports_only_go_down() -> None:
    wrong = []
    for path in sorted(DATA.rglob("*.py")):
        here = _layer(_module_name(path))
        for line, target in _imports(path):
            where = f"{path.relative_to(SRC)}:{line} imports {target}"
            if target.startswith("facemargin.data."):
                there = _layer(target)
                if here is not None and there is not None and there > here:
                    wrong.append(where + " (a layer above it)")
            elif target.startswith("facemargin") and target != "facemargin.data" and not target.startswith(OUTSIDE):
                wrong.append(where + " (outside data/, above it)")
    assert not wrong, "\n".join(wrong)


def test_every_data_module_is_small_and_in_a_layer() -> None:
    for path in sorted(DATA.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        assert lines <= 420, f"{path.relative_to(SRC)} has {lines} lines: split it by concept (~400 max)"
        if path.parent != DATA:
            assert path.parent.name in LAYERS, f"{path.relative_to(SRC)} is in no layer"
        else:
            assert path.stem in LAYERS or path.name == "__init__.py", f"{path.relative_to(SRC)} is in no layer"


def test_layers_import_no_lightning_timm_and_only_loading_imports_torch() -> None:
    light = sorted(_module_name(p) for layer in ("storage", "formats", "sources", "tools")
                   for p in (DATA / layer).rglob("*.py"))
    code = (
        "import importlib, sys\n"
        f"for name in {light!r} + ['facemargin.data', 'facemargin.data.pack', 'facemargin.data.inspect']:\n"
        "    importlib.import_module(name)\n"
        "heavy = [m for m in ('lightning', 'timm', 'torch') if m in sys.modules]\n"
        "import facemargin.data.loading.loader, facemargin.data.loading.device_decode, facemargin.data.loading.augment\n"
        "print(heavy, [m for m in ('lightning', 'timm') if m in sys.modules])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC), "PATH": ""})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[] []"


def test_set_files_resolve_the_root_once(tmp_path: Path) -> None:
    from facemargin.data.formats.setfiles import SetFiles

    local = SetFiles.at(tmp_path / "set")
    assert (local.rec, local.idx, local.property) == tuple(tmp_path / "set" / n for n in ("train.rec", "train.idx", "property"))
    assert not local.is_remote and local.remote == {}
    assert local.verification_file("lfw") == tmp_path / "set" / "lfw.bin"
    assert local.verification_file("more/agedb_30.bin") == tmp_path / "set" / "more" / "agedb_30.bin"
    assert local.verification_file("https://h/x.bin") == "https://h/x.bin"
    url = SetFiles.at("https://host/sets/ms1m/", {"retry": {"attempts": 2}, "timeout": 5})
    assert (url.rec, url.idx, url.property) == tuple(f"https://host/sets/ms1m/{n}" for n in ("train.rec", "train.idx", "property"))
    assert url.is_remote and url.remote["retry"].attempts == 2 and url.remote["timeout"] == 5
    assert url.verification_file("cfp_fp") == "https://host/sets/ms1m/cfp_fp.bin"
    assert pickle.loads(pickle.dumps(url)) == url
    with pytest.raises(ValueError, match="unknown remote option"):
        SetFiles.at(tmp_path, {"retries": 3})


def test_the_datamodule_resolves_its_root_once_and_hands_it_down(tmp_path: Path, monkeypatch) -> None:
    from facemargin.data.formats.setfiles import SetFiles
    from facemargin.data.module import FaceRecordDataModule
    from facemargin.data.sources.recordio import FaceRecordSet
    from facemargin.data.tools.inspect import inspect_dir

    root = write_face_set(tmp_path / "set", [0, 0, 1, 1, 2, 2, 3, 3])
    calls = []
    at = SetFiles.at.__func__
    monkeypatch.setattr(SetFiles, "at", classmethod(lambda cls, *a, **k: calls.append(a) or at(cls, *a, **k)))
    dm = FaceRecordDataModule(root, batch_size=4, num_workers=0)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(calls) == 1 and dm.source.files is dm.files and len(batches) == 2
    fs = FaceRecordSet(dm.files)
    assert (fs.rec_path, fs.idx_path, fs.property_path, fs.root) == (dm.files.rec, dm.files.idx, dm.files.property, root)
    assert FaceRecordSet.peek(dm.files) == (4, fs.image_size) and len(calls) == 1
    assert pickle.loads(pickle.dumps(fs)).files == dm.files  # workers get the resolved files, not the root
    assert inspect_dir(dm.files)["ok"] and len(calls) == 1
    with pytest.raises(TypeError, match="SetFiles.at"):
        FaceRecordSet(dm.files, remote={"timeout": 1})
