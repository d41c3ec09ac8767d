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
    from facemargin.data.recordio import IRHeader, RecordIOWriter, pack_record

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
