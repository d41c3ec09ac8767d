"""FaceRecordDataModule on real files: demo set, RecordIO and folder sources, inside real Trainers."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import simplejpeg
import torch
from conftest import face_image, write_face_set
from torch.utils.data import DataLoader

from facemargin.data.formats.verification import write_bin
from facemargin.data.loading.plan import PlanSpec
from facemargin.data.module import FaceRecordDataModule
from facemargin.evaluation.pairs import datamodule_evaluators

SMALL_DEMO = dict(num_identities=12, images_per_identity=4, num_val_identities=4, num_val_pairs=20, image_size=112)


def _jpeg(value: int) -> bytes:
    return simplejpeg.encode_jpeg(face_image(value), quality=95, colorspace="RGB")


def make_root(root: Path, n: int = 100, num_classes: int = 100) -> Path:
    """insightface-layout set (labels sorted, label of sample i = i * num_classes // n); lfw.bin and cfp_fp.bin."""
    write_face_set(root, [i * num_classes // n for i in range(n)], num_classes=num_classes)
    write_bin(root / "lfw.bin", [_jpeg(i * 10) for i in range(6)], [True, False, True])
    write_bin(root / "cfp_fp.bin", [_jpeg(i * 10) for i in range(4)], [False, True])
    return root


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo_cache")


def test_demo_datamodule(demo_cache: Path) -> None:
    dm = FaceRecordDataModule(demo=True, demo_cache_dir=demo_cache, demo_options=SMALL_DEMO, batch_size=8, num_workers=0)
    assert dm.num_classes == 12 and dm.image_size == (112, 112)  # before setup
    (ev,) = datamodule_evaluators(dm)  # built above the data layer, from dm.verification_files()
    assert ev.name == "demo_val" and ev.issame.dtype == bool and ev.issame.size == 20
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    assert raw[0].dtype == torch.uint8 and raw[0].shape == (8, 3, 112, 112)  # uint8 through the workers
    images, labels, index = dm.on_after_batch_transfer(raw, 0)
    assert images.dtype == torch.float32 and torch.equal(images, raw[0].float() / 127.5 - 1)
    assert labels.dtype == index.dtype == torch.long and torch.equal(labels, torch.from_numpy(dm.source.labels())[index])
    vi, idx = dm.normalize_batch(next(iter(DataLoader(ev.dataset(), batch_size=16))))
    assert vi.dtype == torch.float32 and vi.shape[1:] == (3, 112, 112) and idx.tolist() == list(range(len(idx)))
    assert FaceRecordDataModule("demo", demo_cache_dir=demo_cache, demo_options=SMALL_DEMO).root == dm.root


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_recordio_datamodule_loaders(tmp_path: Path, streaming: bool) -> None:
    root = make_root(tmp_path / "set", n=100, num_classes=30)
    dm = FaceRecordDataModule(root, val_sets=["cfp_fp", "lfw"], batch_size=16, num_workers=2,
                              streaming=streaming, chunk_size=4, shuffle_buffer=32)
    assert dm.num_classes == 30 and [p.name for p in dm.verification_files()] == ["cfp_fp.bin", "lfw.bin"]
    dm.setup("fit")
    train = dm.train_dataloader()
    batches = list(train)
    assert len(batches) == len(train) == 100 // 16 and all(b[0].shape == (16, 3, 16, 16) for b in batches)
    labels = torch.cat([b[1] for b in batches])
    assert labels.dtype == torch.long and labels.unique().numel() >= 25
    assert [len(ev.dataset()) for ev in datamodule_evaluators(dm)] == [4, 6]


def test_missing_val_set_is_named(tmp_path: Path) -> None:
    dm = FaceRecordDataModule(make_root(tmp_path / "set", n=20), val_sets=["agedb_30"], num_workers=0)
    with pytest.raises(FileNotFoundError, match="agedb_30.bin"):
        dm.setup("fit")


def test_image_folder_given_to_recordio_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "alice").mkdir(parents=True)
    (tmp_path / "imgs" / "alice" / "1.jpg").write_bytes(_jpeg(1))
    with pytest.raises(FileNotFoundError, match=r"imgs is an image folder \(1 identity sub-folders\), not a RecordIO "
                       r"set .*data=folder data\.root=.*python -m facemargin\.data\.pack"):
        FaceRecordDataModule(tmp_path / "imgs")


def test_cpu_trainer_caps_workers_and_does_not_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = FaceRecordDataModule(make_root(tmp_path / "set", n=32), batch_size=8, num_workers=64, persistent_workers=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(_Recorder(), dm)
    loader = dm._train_loader
    from facemargin.data.module import available_cores

    assert loader.num_workers == min(64, available_cores()) and loader.pin_memory is False


def test_augment_runs_on_training_batches_before_normalisation(tmp_path: Path) -> None:
    calls = []

    def invert(images: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        assert images.dtype == torch.uint8 and index.dtype == torch.long
        calls.append((epoch, index.tolist()))
        return 255 - images

    dm = FaceRecordDataModule(make_root(tmp_path / "set", n=32), batch_size=8, num_workers=0, augment=invert, flip_p=0)
    model = _Recorder()
    _trainer(2).fit(model, dm)
    assert [e for e, _ in calls] == [0] * 4 + [1] * 4
    assert [i for _, i in calls] == model.seen[0] + model.seen[1]
    first = model.images[0]  # the model saw the augmented, normalised image: (255 - x) / 127.5 - 1
    source = dm.source
    label, raw = source.parse(model.seen[0][0][0], source.read_raw(model.seen[0][0][0]))
    plain = torch.from_numpy(simplejpeg.decode_jpeg(raw, colorspace="RGB")).permute(2, 0, 1)
    assert torch.equal(first, (255 - plain).float() / 127.5 - 1)


def test_folder_and_recordio_give_the_same_epochs(tmp_path: Path) -> None:
    from facemargin.data.tools.pack import pack_images

    rng = np.random.default_rng(0)
    for c in range(6):
        for j in range(int(rng.integers(3, 9))):
            path = tmp_path / "imgs" / f"id{c:02d}" / f"{j}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(simplejpeg.encode_jpeg(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), quality=90))
    pack_images(tmp_path / "imgs", tmp_path / "rec", progress=False)
    for streaming in (False, True):
        kw = dict(batch_size=4, num_workers=0, streaming=streaming, chunk_size=3, shuffle_buffer=8, seed=4)
        folder = FaceRecordDataModule(tmp_path / "imgs", source="folder", **kw)
        rec = FaceRecordDataModule(tmp_path / "rec", **kw)
        assert (folder.num_classes, folder.image_size) == (rec.num_classes, rec.image_size) == (6, (16, 16))
        for epoch in (0, 1):
            got = []
            for dm in (folder, rec):
                dl = dm.train_dataloader()
                dl.sampler.set_epoch(epoch)
                got.append([(x, y.tolist(), i.tolist()) for x, y, i in dl])
            assert len(got[0]) == len(got[1]) > 0
            for (xf, yf, i_f), (xr, yr, ir) in zip(*got):
                assert i_f == ir and yf == yr and torch.equal(xf, xr)


def test_a_third_source_is_one_small_class(tmp_path: Path) -> None:
    from facemargin.data.sources.base import FaceSource

    class ListSource(FaceSource):  # the images in a Python list: all a source has to say
        def __init__(self, root: str) -> None:
            self.name, self.num_classes, self.image_size = root, 4, (16, 16)
            self.items = [(i % 4, _jpeg(i % 4)) for i in range(24)]

        def __len__(self) -> int:
            return len(self.items)

        def read_raw(self, i: int) -> bytes:
            return self.items[i][1]

        def parse(self, i: int, raw: bytes) -> tuple[int, bytes]:
            return self.items[i][0], raw

        def where(self, i: int) -> str:
            return f"{self.name}[{i}]"

        def labels(self) -> np.ndarray:
            return np.array([lab for lab, _ in self.items])

    dm = FaceRecordDataModule("my-list", source=ListSource, batch_size=8, num_workers=2, flip_p=0)
    assert (dm.num_classes, dm.image_size) == (4, (16, 16))
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and sorted(sum((b[2].tolist() for b in batches), [])) == list(range(24))
    for images, labels, index in batches:
        assert torch.equal(labels, index % 4) and torch.equal(images[:, 0, 0, 0].long(), 20 + 10 * labels)


# --------------------------------------------------------------------------- inside a Trainer
class _Recorder(pl.LightningModule):
    """Tiny model recording the sample indices of every training batch, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.seen: dict[int, list[list[int]]] = {}
        self.images: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1  # normalised by the DataModule
        self.seen.setdefault(self.current_epoch, []).append(index.tolist())
        self.images.append(x[0].clone())
        return self.lin(x.mean(dim=(2, 3))).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(epochs: int, *callbacks: pl.Callback) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, callbacks=list(callbacks))


class _SaveAt(pl.Callback):
    """Save a checkpoint after batch ``batch`` of ``epoch`` (``batch=None``: at the epoch's end), then crash."""

    def __init__(self, path: Path, epoch: int, batch: int | None) -> None:
        self.path, self.epoch, self.batch = path, epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            trainer.save_checkpoint(self.path)
            raise RuntimeError("simulated crash")

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch and self.batch is None:
            trainer.save_checkpoint(self.path)
            raise RuntimeError("simulated crash")


def _fit_resumed(root: Path, ckpt: Path, workers: int, **kw) -> tuple[_Recorder, list[str]]:
    resumed = _Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(3).fit(resumed, FaceRecordDataModule(root, num_workers=workers, **kw), ckpt_path=ckpt)
    return resumed, [str(w.message) for w in caught if "resum" in str(w.message)]


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_trainer_resume_mid_epoch_and_end_of_epoch_with_two_workers(tmp_path: Path, streaming: bool) -> None:
    root = make_root(tmp_path / "set", n=96, num_classes=96)
    kw = dict(batch_size=8, streaming=streaming, seed=5, shuffle_buffer=16, chunk_size=4)
    full = _Recorder()
    _trainer(3).fit(full, FaceRecordDataModule(root, num_workers=2, persistent_workers=True, **kw))
    assert [len(full.seen[e]) for e in range(3)] == [12, 12, 12]
    assert full.seen[0] != full.seen[1] and sorted(sum(full.seen[0], [])) == sorted(sum(full.seen[1], [])) == list(range(96))

    # crash inside epoch 1 after 5 batches: resuming gives exactly the rest, in order, with 2, 3, 0 workers
    mid = tmp_path / "mid.ckpt"
    crashed = _Recorder()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(3, _SaveAt(mid, 1, 4)).fit(crashed, FaceRecordDataModule(root, num_workers=2, **kw))
    assert crashed.seen[1] == full.seen[1][:5]
    for workers in (2, 3, 0):
        resumed, warned = _fit_resumed(root, mid, workers, **kw)
        assert not warned  # Lightning sees a resumable loader
        assert resumed.seen == {1: full.seen[1][5:], 2: full.seen[2]}

    # crash at the end of epoch 0 (workers start before set_epoch): the next epochs, whole and in order
    end = tmp_path / "end.ckpt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(3, _SaveAt(end, 0, None)).fit(_Recorder(), FaceRecordDataModule(root, num_workers=2, **kw))
    resumed, warned = _fit_resumed(root, end, 2, **kw)
    assert not warned and resumed.seen == {1: full.seen[1], 2: full.seen[2]}


# --------------------------------------------------------------------------- end to end (slow)
_DDP_SCRIPT = '''
import json, os, sys
import lightning.pytorch as pl
sys.path.insert(0, {tests!r})
from test_datamodule import _Recorder, _SaveAt
from facemargin.data.loading.plan import PlanSpec
from facemargin.data.module import FaceRecordDataModule

class Dump(pl.Callback):
    def on_exception(self, trainer, pl_module, exc):
        with open(os.path.join({out!r}, f"seen{{trainer.global_rank}}.json"), "w") as f:
            json.dump(pl_module.seen, f)

model = _Recorder()
trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0,
                     callbacks=[_SaveAt({ckpt!r}, 1, 2), Dump()])
trainer.fit(model, FaceRecordDataModule({root!r}, num_workers=2, **{kw!r}))
'''


@pytest.mark.slow
def test_trainer_resume_on_another_world_size(tmp_path: Path) -> None:
    """2 DDP ranks (gloo, 2 workers each) crash inside epoch 1; one process finishes: nothing repeated or skipped.

    Streaming (windows re-planned too); map-style re-planning is checked in test_loader without processes."""
    streaming = True
    import json
    import subprocess
    import sys

    from facemargin.data.loading.plan import planned_samples

    root = make_root(tmp_path / "set", n=100, num_classes=100)
    kw = dict(batch_size=4, streaming=streaming, seed=3, shuffle_buffer=16, chunk_size=4)
    ckpt = tmp_path / "ddp.ckpt"
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path), ckpt=str(ckpt),
                                         root=str(root), kw=kw))
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert ckpt.is_file(), proc.stderr[-3000:]
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert all(len(s["1"]) == 3 for s in seen)  # batches 0..2 of epoch 1 on each rank
    before = sum(seen[0]["1"] + seen[1]["1"], [])
    resumed, warned = _fit_resumed(root, ckpt, 2, **kw)
    after = sum(resumed.seen[1], [])
    epoch = before + after
    assert not warned and len(epoch) == len(set(epoch))  # nothing twice
    assert len(set(range(100)) - set(epoch)) < 4  # only the tail no whole batch of 4 can hold
    assert set(epoch) <= set(range(100)) and len(before) == 2 * 3 * 4
    assert sorted(sum(resumed.seen[2], [])) == planned_samples(PlanSpec(3, streaming, 4, 16), 2, 100, 1, 4).tolist()


@pytest.mark.slow
def test_cli_trains_from_an_image_folder(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    images = tmp_path / "images"
    rng = np.random.default_rng(1)
    for c in range(8):
        for j in range(5):
            path = images / f"person{c}" / f"{j}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(simplejpeg.encode_jpeg(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8), quality=85))
    files = sorted(images.rglob("*.jpg"))[:40]
    write_bin(tmp_path / "pairs.bin", [f.read_bytes() for f in files], [k % 2 == 0 for k in range(20)])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "WANDB_MODE": "offline"}
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "facemargin.train", "data=folder", f"data.root={images}",
         f"data.val_sets=[{tmp_path / 'pairs.bin'}]", "data.batch_size=8", "data.num_workers=0",
         "trainer.max_epochs=1", "~callbacks.progress_bar", "logger=none", f"hydra.run.dir={run}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 40 // 8 and 0.0 <= metrics["val/acc"] <= 1.0
