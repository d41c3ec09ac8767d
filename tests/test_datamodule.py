"""FaceRecordDataModule on real files: demo set, RecordIO set + .bin files, and inside a Trainer."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import simplejpeg
import torch
from torch.utils.data import DataLoader

from facemargin.data.datasets import RecordStream
from facemargin.data.module import FaceRecordDataModule
from facemargin.data.recordio import IRHeader, RecordIOWriter, pack_record
from facemargin.data.verification import write_bin

SIZE = 16
SMALL_DEMO = dict(num_identities=12, images_per_identity=4, num_val_identities=4, num_val_pairs=20, image_size=112)


def _jpeg(value: int) -> bytes:
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[:, : SIZE // 2] = value
    return simplejpeg.encode_jpeg(img, quality=95, colorspace="RGB")


def make_root(root: Path, n: int = 100, num_classes: int = 100) -> Path:
    """im2rec-layout set, label of key k = k % num_classes; plus lfw.bin and cfp_fp.bin."""
    root.mkdir(parents=True, exist_ok=True)
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        for k in range(n):
            w.write(k, pack_record(IRHeader(0, float(k % num_classes), k, 0), _jpeg(20 + k % 200)))
    (root / "property").write_text(f"{num_classes},{SIZE},{SIZE}")
    write_bin(root / "lfw.bin", [_jpeg(i * 10) for i in range(6)], [True, False, True])
    write_bin(root / "cfp_fp.bin", [_jpeg(i * 10) for i in range(4)], [False, True])
    return root


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo_cache")


def test_demo_datamodule(demo_cache: Path) -> None:
    dm = FaceRecordDataModule(demo=True, demo_cache_dir=demo_cache, demo_options=SMALL_DEMO, batch_size=8, num_workers=0)
    assert dm.num_classes == 12 and dm.image_size == (112, 112)  # before setup
    (ev,) = dm.evaluators()
    assert ev.name == "demo_val" and ev.issame.dtype == bool and ev.issame.size == 20
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    assert raw[0].dtype == torch.uint8  # normalize_on_device: uint8 through the workers
    images, labels = dm.on_after_batch_transfer(raw, 0)
    assert images.shape == (8, 3, 112, 112) and images.dtype == torch.float32
    assert torch.equal(images, raw[0].float() / 127.5 - 1)
    assert labels.dtype == torch.long and 0 <= labels.min() and labels.max() < 12
    assert -1.0 <= images.min() and images.max() <= 1.0
    vi, idx = dm.normalize_batch(next(iter(DataLoader(ev.dataset(), batch_size=16))))
    assert vi.dtype == torch.float32 and vi.shape[1:] == (3, 112, 112) and idx.tolist() == list(range(len(idx)))
    # root="demo" is the same thing
    assert FaceRecordDataModule("demo", demo_cache_dir=demo_cache, demo_options=SMALL_DEMO).root == dm.root


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
@pytest.mark.parametrize("workers", [0, 2])
def test_recordio_datamodule_loaders(tmp_path: Path, streaming: bool, workers: int) -> None:
    root = make_root(tmp_path / "set", n=100, num_classes=30)
    dm = FaceRecordDataModule(
        root,
        val_sets=["cfp_fp", "lfw"],
        batch_size=16,
        num_workers=workers,
        streaming=streaming,
        normalize_on_device=False,  # float32 straight from the loaders
    )
    assert dm.num_classes == 30
    assert [ev.name for ev in dm.evaluators()] == ["cfp_fp", "lfw"]
    dm.setup("fit")
    train = dm.train_dataloader()
    batches = [(x.shape, y) for x, y in train]
    assert len(batches) == len(train) == 100 // 16  # drop_last
    assert all(s == (16, 3, SIZE, SIZE) for s, _ in batches)
    assert next(iter(train))[0].dtype == torch.float32
    labels = torch.cat([y for _, y in batches])
    assert labels.dtype == torch.long and labels.unique().numel() == 30
    assert [len(ev.dataset()) for ev in dm.evaluators()] == [4, 6]
    for ev in dm.evaluators():
        images, idx = next(iter(DataLoader(ev.dataset(), batch_size=4)))
        assert images.shape[1:] == (3, SIZE, SIZE) and idx.dtype == torch.long


def test_missing_val_set_is_named(tmp_path: Path) -> None:
    root = make_root(tmp_path / "set", n=20)
    dm = FaceRecordDataModule(root, val_sets=["agedb_30"], num_workers=0)
    with pytest.raises(FileNotFoundError, match="agedb_30.bin"):
        dm.setup("fit")


class _Recorder(pl.LightningModule):
    """Tiny model that records the labels of every training batch per epoch."""

    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.seen: dict[int, list[list[int]]] = {}
        self.stop_after = stop_after

    def training_step(self, batch, batch_idx):
        x, y = batch
        assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1  # normalised by the DataModule
        self.seen.setdefault(self.current_epoch, []).append(y.tolist())
        return self.lin(x.mean(dim=(2, 3))).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.stop_after is not None and batch_idx + 1 == self.stop_after:
            self.trainer.save_checkpoint(self.ckpt_path)
            raise KeyboardInterrupt  # simulated crash right after the checkpoint

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(epochs: int) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_trainer_reshuffles_each_epoch_and_resumes_mid_epoch(tmp_path: Path, streaming: bool) -> None:
    root = make_root(tmp_path / "set", n=96, num_classes=96)  # label == sample
    kw = dict(batch_size=8, num_workers=2, streaming=streaming, seed=5, shuffle_buffer=16, chunk_bytes=1024)
    full = _Recorder()
    _trainer(2).fit(full, FaceRecordDataModule(root, persistent_workers=True, **kw))
    e0, e1 = full.seen[0], full.seen[1]
    assert len(e0) == len(e1) == 12
    assert e0 != e1 and sorted(sum(e0, [])) == sorted(sum(e1, [])) == list(range(96))
    if streaming:  # the epoch reached the stream: same order as a stand-alone stream at that epoch
        for epoch, seen in ((0, e0), (1, e1)):
            s = RecordStream(root, batch_size=8, seed=5, shuffle_buffer=16, chunk_bytes=1024, rank=0, world_size=1)
            s.set_epoch(epoch)
            from facemargin.data.datasets import StreamDataLoader

            assert [y.tolist() for _, y in StreamDataLoader(s, num_workers=2)] == seen

    # crash after 5 batches of epoch 1, resume from the checkpoint: the rest of epoch 1 exactly
    crashed = _Recorder(stop_after=None)
    crashed.ckpt_path = tmp_path / "mid.ckpt"
    trainer = _trainer(2)

    class _Crash(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 4:
                trainer.save_checkpoint(crashed.ckpt_path)
                raise RuntimeError("simulated crash")

    trainer.callbacks.append(_Crash())
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(crashed, FaceRecordDataModule(root, **kw))
    assert crashed.seen[0] == e0 and crashed.seen[1] == e1[:5]
    resumed = _Recorder()
    _trainer(2).fit(resumed, FaceRecordDataModule(root, **kw), ckpt_path=crashed.ckpt_path)
    assert list(resumed.seen) == [1]
    rest = resumed.seen[1]
    assert sorted(map(sorted, e1[:5] + rest)) == sorted(map(sorted, e1))  # nothing repeated or lost
    assert len(rest) == 7


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_trainer_resume_from_end_of_epoch_checkpoint(tmp_path: Path, streaming: bool) -> None:
    root = make_root(tmp_path / "set", n=64, num_classes=64)
    kw = dict(batch_size=8, num_workers=0, streaming=streaming, seed=2, shuffle_buffer=16, chunk_bytes=1024)
    full = _Recorder()
    _trainer(2).fit(full, FaceRecordDataModule(root, **kw))
    ckpt = tmp_path / "epoch0.ckpt"

    class _SaveAtEpochEnd(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.save_checkpoint(ckpt)

    first = _Recorder()
    trainer = _trainer(1)
    trainer.callbacks.append(_SaveAtEpochEnd())
    trainer.fit(first, FaceRecordDataModule(root, **kw))
    resumed = _Recorder()
    _trainer(2).fit(resumed, FaceRecordDataModule(root, **kw), ckpt_path=ckpt)
    assert first.seen[0] == full.seen[0]
    assert resumed.seen == {1: full.seen[1]}  # the whole next epoch, in the same order
