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
# ----- END data-format fixtures ---------------------------------------------------------------


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
        "backbone.embedding_size=64", "+backbone.kwargs.widths=[8,16,32]", "+backbone.kwargs.stem_width=8",
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
