"""Shared pytest fixtures. Each engineer keeps their fixtures in a delimited block."""

from __future__ import annotations

# ----- BEGIN data-format fixtures (recordio / faceset / pack / inspect) ---------------------
import struct
from pathlib import Path

import numpy as np
import pytest
import simplejpeg


def tiny_jpeg(seed: int, size: int = 8) -> bytes:
    """A real RGB JPEG of ``size x size`` pixels whose content depends on ``seed``."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return simplejpeg.encode_jpeg(img, quality=90, colorspace="RGB")


#: labels of the 7 images in ``tiny_recdir`` (keys 1..7), 3 identities.
TINY_LABELS = [0, 0, 0, 1, 1, 2, 2]


@pytest.fixture()
def tiny_recdir(tmp_path: Path) -> Path:
    """An insightface-layout set written by hand with ``struct`` (not the package's pack code).

    ``property`` = ``3,8,8``; key 0 = meta record (flag 2, labels (8, 11)); keys 1..7 = 8x8 RGB
    JPEGs ``tiny_jpeg(key)`` with flag-0 labels ``TINY_LABELS``; keys 8..10 = identity records
    with labels ``(first_key, last_key + 1)``. Each record is a single, whole part (flag 0); the
    fixture asserts no payload contains the magic number.
    """
    magic = struct.pack("<I", 0xCED7230A)
    root = tmp_path / "tinyset"
    root.mkdir()
    records: list[tuple[int, bytes]] = [(0, struct.pack("<IfQQff", 2, 0.0, 0, 0, 8.0, 11.0))]
    for key, label in enumerate(TINY_LABELS, start=1):
        records.append((key, struct.pack("<IfQQ", 0, float(label), key, 0) + tiny_jpeg(key)))
    for c, (lo, hi) in enumerate([(1, 4), (4, 6), (6, 8)]):
        records.append((8 + c, struct.pack("<IfQQff", 2, 0.0, 8 + c, 0, float(lo), float(hi))))
    rec, idx = bytearray(), []
    for key, payload in records:
        assert all(payload[i:i + 4] != magic for i in range(0, len(payload) - 3, 4))
        idx.append(f"{key}\t{len(rec)}\n")
        rec += magic + struct.pack("<I", len(payload)) + payload + b"\0" * (-len(payload) % 4)
    (root / "train.rec").write_bytes(bytes(rec))
    (root / "train.idx").write_text("".join(idx))
    (root / "property").write_text("3,8,8")
    return root


FACE = 16  # side of the faces write_face_set writes


def face_image(label: int, size: int = FACE) -> np.ndarray:
    """Left half's grey level encodes ``label % 20``, right half black: flips and labels are visible."""
    img = np.zeros((size, size, 3), np.uint8)
    img[:, : size // 2] = 20 + 10 * (label % 20)
    return img


def label_of(image) -> tuple[int, bool]:
    """``(label % 20, flipped)`` of a uint8 ``[3, H, W]`` tensor made from :func:`face_image`."""
    x = image.float()
    left, right = float(x[:, :, 1:6].mean()), float(x[:, :, -6:-1].mean())
    return round((max(left, right) - 20) / 10), right > left


def write_face_set(root: Path, labels: list[int], layout: str = "insightface", num_classes: int | None = None,
                   corrupt: tuple[int, ...] = (), size: int = FACE) -> Path:
    """A RecordIO face set written with the writer: insightface (meta record, images, identity ranges;
    labels must be sorted) or im2rec (every key an image). ``corrupt`` samples get garbage JPEG bytes."""
    from facemargin.data.formats.recordio import IRHeader, RecordIOWriter, pack_record

    root.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    classes = num_classes or (max(labels) + 1)
    meta = layout == "insightface"
    first = 1 if meta else 0
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        if meta:
            assert labels == sorted(labels)
            w.write(0, pack_record(IRHeader(0, 0.0, 0, 0), b"", labels=[n + 1, n + 1 + classes]))
        for i, lab in enumerate(labels):
            data = simplejpeg.encode_jpeg(face_image(lab, size), quality=95, colorspace="RGB")
            if i in corrupt:
                data = data[:10] + b"\x00garbage"
            w.write(first + i, pack_record(IRHeader(0, float(lab), first + i, 0), data))
        if meta:
            bounds = np.searchsorted(np.asarray(labels), np.arange(classes + 1)) + 1
            for c in range(classes):
                w.write(n + 1 + c, pack_record(IRHeader(0, 0.0, n + 1 + c, 0), b"", labels=[bounds[c], bounds[c + 1]]))
    (root / "property").write_text(f"{classes},{size},{size}")
    return root
# ----- END data-format fixtures ---------------------------------------------------------------


# ----- BEGIN runs fixtures (train entry point, resume, signals) -------------------------------
import contextlib  # noqa: E402
import csv  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import signal as _signal  # noqa: E402
import time  # noqa: E402

#: a run of a few seconds: 16 identities x 3 images of 32x32 (6 batches of 8 an epoch, random flips), a
#: 64-d demo backbone with dropout (so the global RNG matters), the default SGD with momentum and poly
#: schedule (warm-up over the first epoch: the learning rate changes every step, so the optimizer and
#: scheduler states matter), every step logged, no progress bar
TINY_RUN = [
    "+data.demo_options.num_identities=16", "+data.demo_options.images_per_identity=3",
    "+data.demo_options.num_val_identities=4", "+data.demo_options.num_val_pairs=20",
    "+data.demo_options.image_size=32", "+backbone.input_size=32", "backbone.embedding_size=64",
    "backbone.dropout=0.2", "data.batch_size=8", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
    "~callbacks.progress_bar", "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
]
TINY_STEPS_PER_EPOCH = 6
#: the variants of the exact-resume tests: the default MarginHead with a user's augmentation that draws
#: from the global torch RNG, Partial FC sampling 12 of 16 centres a step, and the default run with a
#: constant learning rate (its first epoch is a 1-epoch run)
TINY_CASES = {
    "default": [],
    "augment": ["data.augment={_target_:custom_augment.BrightnessJitter}"],
    "partial_fc": ["head=partial_fc", "head.sample_rate=0.75"],
    "constant_lr": ["scheduler=constant"],
}


def pytest_configure(config) -> None:
    """The suite never writes into the user's ``~/.cache/facemargin``: one cache folder per test
    process (each pytest-xdist worker its own), inherited by the subprocesses it starts."""
    import tempfile

    config._facemargin_cache = os.environ["FACEMARGIN_CACHE"] = tempfile.mkdtemp(prefix="facemargin-test-cache-")


def pytest_unconfigure(config) -> None:
    import shutil

    shutil.rmtree(getattr(config, "_facemargin_cache", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def demo_env(tmp_path_factory) -> dict[str, str]:
    """One demo-set cache for the session (in-process runs and subprocesses); one torch thread in
    subprocesses, like the in-process runs of :func:`train_in_process` (same float results)."""
    cache = tmp_path_factory.mktemp("facemargin-cache")
    os.environ["FACEMARGIN_CACHE"] = str(cache)  # in-process runs share the generated demo set
    return {**os.environ, "FACEMARGIN_CACHE": str(cache), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1"}


def compose_run(out: Path, *overrides: str):
    """The composed config of ``python -m facemargin.train output_dir=out *overrides``."""
    from hydra import compose, initialize_config_dir

    from facemargin.train import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=[f"output_dir={out}", *overrides])


@contextlib.contextmanager
def one_torch_thread():
    """Runs compared bit for bit use one intra-op thread (and a loaded 2-core machine runs them faster)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_in_process(out: Path, *overrides: str) -> dict[str, float]:
    """``facemargin.train.run`` on one torch thread (the killed subprocesses use one too)."""
    from facemargin.train import run

    with one_torch_thread():
        return run(compose_run(out, *overrides))


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(Path(run_dir) / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def step_losses(run_dir: Path) -> list[tuple[int, float]]:
    """``(step, train/loss_step)`` of every logged training step in ``run_dir/metrics.csv``."""
    return [(int(r["step"]), float(r["train/loss_step"])) for r in metrics_rows(run_dir) if r.get("train/loss_step")]


def validated_epochs(run_dir: Path) -> list[int]:
    """The epoch of every ``metrics.csv`` row that carries ``val/acc``."""
    return [int(r["epoch"]) for r in metrics_rows(run_dir) if r.get("val/acc")]


def last_ckpt(run_dir: Path) -> dict:
    import torch

    return torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory, demo_env):
    """``tiny_reference(case)``: the uninterrupted TINY_RUN of a ``TINY_CASES`` variant (0 workers, one
    torch thread): its per-step ``(step, loss)`` list and its final weights."""
    done: dict[str, tuple[list, dict]] = {}

    def get(case: str) -> tuple[list, dict]:
        if case not in done:
            out = tmp_path_factory.mktemp(f"reference-{case}")
            train_in_process(out, *TINY_RUN, *TINY_CASES[case], "data.num_workers=0")
            losses = step_losses(out)
            assert [s for s, _ in losses] == list(range(2 * TINY_STEPS_PER_EPOCH))
            done[case] = losses, last_ckpt(out)["state_dict"]
        return done[case]

    return get


def _train_child(out: Path, overrides: tuple[str, ...], env: dict[str, str]) -> None:
    os.environ.update(env)
    train_in_process(out, *overrides)


def signal_at_step(out: Path, overrides: list[str], step: int, signum: int = _signal.SIGKILL,
                   env: dict[str, str] | None = None, send=None, timeout: float = 300.0) -> tuple[int, int]:
    """Train in a forked process (``env`` added to its environment); send ``signum`` (or call
    ``send(pid)``) once ``metrics.csv`` shows training step ``step`` and a ``last.ckpt`` exists.
    Returns ``(exit code, last step logged when signalled)``; a negative exit code is the signal
    that killed it."""
    proc = multiprocessing.get_context("fork").Process(target=_train_child, args=(out, tuple(overrides), env or {}))
    proc.start()
    seen, deadline = -1, time.monotonic() + timeout
    while proc.is_alive() and time.monotonic() < deadline:
        try:
            losses = step_losses(out)
        except (FileNotFoundError, KeyError, ValueError):  # not written yet, or being rewritten
            losses = []
        if losses and losses[-1][0] >= step and (out / "checkpoints" / "last.ckpt").is_file():
            seen = losses[-1][0]
            send(proc.pid) if send is not None else os.kill(proc.pid, signum)
            break
        time.sleep(0.005)
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    assert seen >= 0, f"the run ended (exit {proc.exitcode}) before step {step} could be signalled"
    return proc.exitcode, seen
# ----- END runs fixtures ----------------------------------------------------------------------


# ----- BEGIN eval fixtures (evaluate / export / embed / compare) ------------------------------
#: a small demo set: 120 training images, demo_val.bin with 100 pairs (200 images)
EVAL_DEMO = dict(num_identities=24, images_per_identity=5, num_val_identities=12, num_val_pairs=100)


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> Path:
    """One checkpoint of the demo config, trained 2 steps and validated on a small demo_val.bin,
    shared by the evaluation, export and CLI tests. A thin iresnet_demo (widths 8/16/32, 64-d)
    keeps every forward cheap. ``demo_checkpoint.parent / "demo_val.bin"`` is its verification set."""
    import shutil

    from hydra import compose, initialize_config_dir

    from facemargin.train import build, config_dir

    out = tmp_path_factory.mktemp("eval-demo")
    overrides = [
        f"output_dir={out}", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "data.batch_size=32",
        "data.num_workers=0", "val_num_workers=0", "logger=none", "~callbacks.progress_bar",
        "~callbacks.checkpoint", f"data.demo_cache_dir={out / 'cache'}",
        *(f"+data.demo_options.{k}={v}" for k, v in EVAL_DEMO.items()),
        "backbone.embedding_size=64", "backbone.kwargs.widths=[8,16,32]", "backbone.kwargs.stem_width=8",
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    trainer, model, dm = build(cfg)
    trainer.fit(model, datamodule=dm)
    ckpt = out / "demo.ckpt"
    trainer.save_checkpoint(ckpt)
    shutil.copy(dm.root / "demo_val.bin", out / "demo_val.bin")
    return ckpt
# ----- END eval fixtures ----------------------------------------------------------------------


# ----- BEGIN remote fixtures (HTTP byte sources) -----------------------------------------------
@pytest.fixture()
def served(tmp_path: Path):
    """A 300 000-byte random file ``data.bin`` behind a running ``range_http.RangeServer``; yields (server, bytes)."""
    from range_http import RangeServer

    root = tmp_path / "www"
    root.mkdir()
    data = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    (root / "data.bin").write_bytes(data)
    with RangeServer(root) as server:
        yield server, data
# ----- END remote fixtures ---------------------------------------------------------------------
