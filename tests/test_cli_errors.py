"""Every entry point answers an ordinary mistake with one line and a non-zero exit (no traceback),
lists its options one line each on ``--help`` without importing torch, and still shows the
traceback of a real bug."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg

from conftest import write_face_set

ENTRY_POINTS = ["train", "evaluate", "export", "clean", "sweep", "data.pack", "data.inspect", "embed", "compare", "detect"]
SMALL_DEMO = ["+data.demo_options.num_identities=8", "+data.demo_options.images_per_identity=2",
              "+data.demo_options.num_val_identities=4", "+data.demo_options.num_val_pairs=20",
              "+data.demo_options.image_size=32", "+backbone.input_size=32", "data.batch_size=8"]


def cli(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300,
        python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python_flags, "-m", f"facemargin.{module}", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "WANDB_MODE": "offline", **(env or {})})


def one_line(proc: subprocess.CompletedProcess, prog: str) -> str:
    """The error line of a refused command; asserts exit status 2, no traceback, at most a hint besides."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-4000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith((f"{prog}: error: ", "hint: "))]
    errors = [ln for ln in lines if ln.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and len(lines) <= 2, proc.stderr
    assert lines[0] == errors[0]  # the hint, if any, follows the error
    return errors[0][len(f"{prog}: error: "):]


def hint_of(proc: subprocess.CompletedProcess) -> str | None:
    return next((ln[len("hint: "):] for ln in proc.stderr.splitlines() if ln.startswith("hint: ")), None)


# --------------------------------------------------------------------------- --help
@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_lists_every_option_on_one_line_without_importing_torch(module, tmp_path):
    proc = cli(module, "--help", cwd=tmp_path, python_flags=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    assert not {m for m in imported if m == "torch" or m.startswith(("torch.", "lightning", "timm"))}, sorted(imported)
    text = proc.stdout
    assert text.startswith(f"usage: python -m facemargin.{module} ")
    option_lines = [ln for ln in text.splitlines() if ln.startswith("  ")]
    assert option_lines and all(len(ln.split()) >= 1 for ln in option_lines)
    if module in ("train", "evaluate", "export", "clean"):  # Hydra apps: groups and keys from the YAML
        keys = {ln.split()[0].split("=")[0] for ln in option_lines}
        expected = {"train": {"backbone", "loss", "data", "trainer", "seed", "ckpt_path", "memory_check"},
                    "evaluate": {"eval", "ckpt_path", "eval_root", "device", "cache"},
                    "export": {"ckpt_path", "format", "out", "flip_fused"},
                    "clean": {"data", "ckpt_path", "out", "threshold"}}[module]
        assert expected <= keys, keys
        assert len(keys) == len(option_lines)  # one line each
    if module == "train":
        loss = next(ln for ln in option_lines if ln.split()[0] == "loss=expface")
        assert "arcface" in loss and "cosface" in loss  # the group's options on its line
        assert re.search(r"memory_check=true\s+refuse a batch", text)


# --------------------------------------------------------------------------- train
@pytest.mark.parametrize("override, message, hint", [
    ("trainer.max_epoch=3", "Could not override 'trainer.max_epoch': Key 'max_epoch' is not in struct",
     "To append to your config use +trainer.max_epoch=3"),
    ("loss=expfac", "loss=expfac: no such option (did you mean loss=expface?)", "loss options: adaface, arcface, "),
    ("data.batch_size=[1", "cannot read the overrides: no viable alternative at input '[1'", "overrides are key=value"),
    ("ckpt_path=/nowhere/last.ckpt", "ckpt_path=/nowhere/last.ckpt: no such checkpoint", "a run prints the ckpt_path"),
    ("data=folder", "data.root is required: give data.root=...", None),
    ("data=folder data.root=/nowhere/photos", "data: image folder or list file not found: /nowhere/photos", None),
    ("loss.m=abc", "margin 'expface': m must be a number in (0, 1]; got 'abc'", None),
    ("+trainer.max_epoch=3", "trainer: Trainer.__init__() got an unexpected keyword argument 'max_epoch'", None),
])
def test_train_mistakes_are_one_line(override, message, hint, demo_env, tmp_path):
    small = [] if override.startswith("data") else SMALL_DEMO  # refusals after the set is built: a small one
    proc = cli("train", *override.split(), *small, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=demo_env)
    assert one_line(proc, "facemargin.train") == message
    assert (hint_of(proc) or "").startswith(hint) if hint else hint_of(proc) is None


def test_a_malformed_set_is_named_in_one_line(demo_env, tmp_path):
    root = write_face_set(tmp_path / "set", [0, 0, 1, 1])
    idx = root / "train.idx"
    idx.write_text(idx.read_text().replace("\t", "\t-", 1))  # a sign in the first offset
    proc = cli("train", "data=recordio", f"data.root={root}", "+backbone.input_size=16",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=demo_env)
    assert one_line(proc, "facemargin.train").startswith(f"{idx}: line 1 is not 'key<TAB>offset' (unexpected '-')")
    assert hint_of(proc) is None  # nothing about where sets live: the file was found, it is malformed


BUGGY_CALLBACK = '''
import lightning.pytorch as pl


class Buggy(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        1 / 0
'''


@pytest.mark.slow
def test_a_bug_keeps_its_traceback_and_no_resume_line_is_printed_before_last_ckpt(demo_env, tmp_path):
    (tmp_path / "buggy_callback.py").write_text(BUGGY_CALLBACK)
    env = {**demo_env, "PYTHONPATH": os.pathsep.join([str(tmp_path), demo_env.get("PYTHONPATH", "")])}
    proc = cli("train", "+callbacks.bug={_target_:buggy_callback.Buggy}", "trainer.max_epochs=1", *SMALL_DEMO,
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr and "ZeroDivisionError: division by zero" in proc.stderr
    assert "resume with" not in (proc.stdout + proc.stderr).lower()  # no last.ckpt was written: nothing to resume
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


# --------------------------------------------------------------------------- evaluate, export, clean
def test_evaluate_export_clean_mistakes_are_one_line(tmp_path):
    missing = tmp_path / "nope.ckpt"
    proc = cli("evaluate", cwd=tmp_path)
    assert one_line(proc, "facemargin.evaluate") == "ckpt_path is required: give ckpt_path=..."
    proc = cli("evaluate", f"ckpt_path={missing}", f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    assert one_line(proc, "facemargin.evaluate") == f"ckpt_path={missing}: no such file"
    proc = cli("evaluate", f"ckpt_path={missing}", "eval=[lfw,nosuch]", cwd=tmp_path)
    assert one_line(proc, "facemargin.evaluate").startswith("eval=nosuch: no such option")
    proc = cli("export", f"ckpt_path={missing}", cwd=tmp_path)
    assert one_line(proc, "facemargin.export") == f"ckpt_path={missing}: no such checkpoint"
    proc = cli("export", f"ckpt_path={missing}", "format=tflite", cwd=tmp_path)
    assert one_line(proc, "facemargin.export") == "format=tflite: expected one of onnx, torchscript"
    proc = cli("clean", f"ckpt_path={missing}", cwd=tmp_path)
    assert one_line(proc, "facemargin.clean") == "out is required: give out=..."
    proc = cli("clean", f"ckpt_path={missing}", f"out={tmp_path / 'clean'}", cwd=tmp_path)
    assert one_line(proc, "facemargin.clean") == f"ckpt_path={missing}: no such checkpoint"


def test_a_refused_bin_gets_no_hint_about_where_sets_live(demo_checkpoint, tmp_path):
    """A ``.bin`` that is there but malformed is not a question of where the sets live; a missing one is."""
    bad = tmp_path / "lfw.bin"
    bad.write_bytes(b"\x80\x04not a pickle at all")
    proc = cli("evaluate", f"ckpt_path={demo_checkpoint}", "eval=[bin]", f"eval.bin.path={bad}",
               f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    assert one_line(proc, "facemargin.evaluate").startswith(f"eval.bin: {bad}")
    assert hint_of(proc) is None
    proc = cli("evaluate", f"ckpt_path={demo_checkpoint}", "eval=[lfw]", f"eval_root={tmp_path / 'sets'}",
               f"hydra.run.dir={tmp_path / 'e2'}", cwd=tmp_path)
    assert one_line(proc, "facemargin.evaluate") == f"eval.lfw: verification file not found: {tmp_path / 'sets' / 'lfw.bin'}"
    assert hint_of(proc) == "say where the sets live: eval_root=..., ijb_root=..., or FACEMARGIN_DATA"


# --------------------------------------------------------------------------- sweep, pack, inspect
def test_sweep_pack_inspect_mistakes_are_one_line(tmp_path):
    proc = cli("sweep", str(tmp_path / "nope"), cwd=tmp_path)
    assert one_line(proc, "facemargin.sweep") == f"{tmp_path / 'nope'}: no such folder"
    proc = cli("sweep", str(tmp_path), "metrc=val/acc", cwd=tmp_path)
    assert one_line(proc, "facemargin.sweep").startswith("unknown option 'metrc' (did you mean metric=?)")
    proc = cli("data.pack", str(tmp_path / "photos"), str(tmp_path / "out"), cwd=tmp_path)
    assert one_line(proc, "facemargin.data.pack") == f"image root is not a directory: {tmp_path / 'photos'}"
    (tmp_path / "photos" / "alice").mkdir(parents=True)
    proc = cli("data.pack", str(tmp_path / "photos"), str(tmp_path / "out"), "--crop", "3x", cwd=tmp_path)
    assert one_line(proc, "facemargin.data.pack").startswith("--crop must be 'square', a fraction in (0, 1] or WxH")
    proc = cli("data.inspect", str(tmp_path / "nope"), cwd=tmp_path)
    assert one_line(proc, "facemargin.data.inspect").startswith(f"{tmp_path / 'nope'}: no such folder")


def test_a_bug_in_a_key_value_entry_point_keeps_its_traceback(tmp_path, monkeypatch):
    from facemargin import sweep

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(sweep, "summarize", broken)
    with pytest.raises(KeyError, match="a bug"):
        sweep.main([str(tmp_path)])


def test_an_error_in_a_dataloader_worker_is_reported_by_its_own_message():
    """Errors cross from a DataLoader worker with the worker's traceback in their text."""
    from facemargin.cli import error_line
    from facemargin.data.formats.image import CorruptImageError

    wrapped = CorruptImageError("Caught CorruptImageError in DataLoader worker process 0.\nOriginal Traceback (most "
                                "recent call last):\n  File \"x.py\", line 1, in f\n    g()\nfacemargin.data.formats.image."
                                "CorruptImageError: set/train.rec: key 7: not a JPEG or PNG\n")
    assert error_line(wrapped) == "set/train.rec: key 7: not a JPEG or PNG"


def test_domain_errors_are_user_errors_and_keep_their_builtin():
    from facemargin.data.formats.image import CorruptImageError
    from facemargin.data.formats.recordio import RecordIOError
    from facemargin.data.loading.plan import PlanMismatchError
    from facemargin.data.storage.remote import RemoteReadError
    from facemargin.data.sources.base import SourceError
    from facemargin.errors import UserError

    for cls, builtin in [(CorruptImageError, ValueError), (RecordIOError, ValueError), (SourceError, ValueError),
                         (PlanMismatchError, ValueError), (RemoteReadError, OSError)]:
        assert issubclass(cls, UserError) and issubclass(cls, builtin)
        assert str(cls("names the file")) == "names the file"


# --------------------------------------------------------------------------- pack under a umask
def test_pack_writes_files_with_the_umask_permissions(tmp_path):
    for person in ("alice", "bob"):
        (tmp_path / "photos" / person).mkdir(parents=True)
        img = np.full((16, 16, 3), 100, np.uint8)
        (tmp_path / "photos" / person / "1.jpg").write_bytes(simplejpeg.encode_jpeg(img, colorspace="RGB"))
    script = ("import os, sys; os.umask(0o022); from facemargin.data.pack import main; "
              f"sys.exit(main([{str(tmp_path / 'photos')!r}, {str(tmp_path / 'out')!r}, '--quiet']))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("train.rec", "train.idx", "property"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644, name
