"""Batches packed into reused shared slots, turned and flipped on the device: the same batches as before, bit for bit."""

from __future__ import annotations

import copy
import gc
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import simplejpeg
import torch

from facemargin.data.formats.image import ImageSizeError, decode_image, decode_into
from facemargin.data.formats.recordio import IRHeader, RecordIOWriter, pack_record
from facemargin.data.loading import loader as loader_module
from facemargin.data.loading.layout import HWCImages, to_training_batch, to_training_layout
from facemargin.data.loading.loader import BatchReader, PlanSampler, TrainLoader
from facemargin.data.loading.plan import EpochPlan, PlanSpec, hash_uniform
from facemargin.data.loading.slots import PackedBatch, PackedLayout, SlotRing
from facemargin.data.module import FaceRecordDataModule
from facemargin.data.sources.recordio import FaceRecordSet

DAMAGED = (3, 17, 40, 41, 77)
SEED, H, W, B = 5, 20, 24, 8


@pytest.fixture(scope="module")
def noisy_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 random-pixel 24x20 JPEGs (every flip shows), 9 identities, five of them cut in half."""
    root = tmp_path_factory.mktemp("layout") / "set"
    root.mkdir()
    rng = np.random.default_rng(0)
    labels = sorted(rng.integers(0, 9, 90).tolist())
    n, classes = len(labels), 9
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        w.write(0, pack_record(IRHeader(0, 0.0, 0, 0), b"", labels=[n + 1, n + 1 + classes]))
        for i, lab in enumerate(labels):
            data = simplejpeg.encode_jpeg(rng.integers(0, 255, (H, W, 3), dtype=np.uint8), quality=90)
            w.write(1 + i, pack_record(IRHeader(0, float(lab), 1 + i, 0), data[: len(data) // 2] if i in DAMAGED else data))
        bounds = np.searchsorted(np.asarray(labels), np.arange(classes + 1)) + 1
        for c in range(classes):
            w.write(n + 1 + c, pack_record(IRHeader(0, 0.0, n + 1 + c, 0), b"", labels=[bounds[c], bounds[c + 1]]))
    (root / "property").write_text(f"{classes},{H},{W}")
    return root


def reference_image(fs: FaceRecordSet, i: int, epoch: int) -> torch.Tensor:
    """The old path, written out: decode, mirror when ``hash(seed, epoch, i) < 0.5``, HWC -> CHW."""
    image = decode_image(fs.parse(i, fs.read_raw(i))[1])
    if hash_uniform(SEED, epoch, np.array([i]))[0] < 0.5:
        image = image[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def epoch_batches(fs: FaceRecordSet, spec: PlanSpec, workers: int, on_device: bool, epoch: int, **kw) -> list:
    reader = BatchReader(fs, seed=SEED, on_corrupt="skip")
    dl = TrainLoader(reader, PlanSampler(fs, B, spec, epoch=epoch), layout_on_device=on_device, num_workers=workers, **kw)
    return list(dl)  # every batch held at once, as Lightning may hold one while it fetches the next


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_device_layout_gives_the_old_batches_bit_for_bit(noisy_set: Path, streaming: bool, workers: int) -> None:
    fs = FaceRecordSet(noisy_set)
    labels = torch.from_numpy(fs.labels())
    spec = PlanSpec(seed=SEED, streaming=streaming, chunk=4, window=20)
    for epoch in (0, 1):
        chw = epoch_batches(fs, spec, workers, False, epoch)
        hwc = epoch_batches(fs, spec, workers, True, epoch)
        plan = EpochPlan.start(spec, epoch, len(fs), 1, B).sequence(0)
        assert len(chw) == len(hwc) == len(plan) // B
        flips = 0
        for k, ((x, y, i), raw) in enumerate(zip(chw, hwc)):
            assert isinstance(raw[0], HWCImages) and raw[0].pixels.shape == (B, H, W, 3)
            assert x.shape == (B, 3, H, W) and x.is_contiguous()
            xd, yd, idd = to_training_batch(raw)
            assert torch.equal(xd, x) and torch.equal(yd, y) and torch.equal(idd, i)
            planned = plan[k * B: (k + 1) * B]
            for j, (got, want) in enumerate(zip(i.tolist(), planned.tolist())):
                assert got == want if want not in DAMAGED else got not in DAMAGED  # a damaged one is replaced
                assert torch.equal(x[j], reference_image(fs, got, epoch)) and int(y[j]) == int(labels[got])
            flips += int(raw[0].flip.sum())
        assert 0 < flips < len(chw) * B


def test_damaged_samples_raise_the_same_with_either_layout(noisy_set: Path) -> None:
    fs = FaceRecordSet(noisy_set)
    for on_device in (False, True):
        for workers in (0, 2):
            dl = TrainLoader(BatchReader(fs, seed=SEED), PlanSampler(fs, B, PlanSpec(seed=SEED)),
                             layout_on_device=on_device, num_workers=workers)
            with pytest.raises(ValueError, match=r"train.rec at offset \d+ \(key \d+\): corrupt image"):
                list(dl)


def test_workers_reuse_their_shared_slots(noisy_set: Path) -> None:
    """Persistent workers: an epoch left after 3 batches, resumed (a new iteration), then the next epoch: every
    batch came through a ring slot, none from an abandoned iteration."""
    fs = FaceRecordSet(noisy_set)
    spec = PlanSpec(seed=SEED)
    want = {e: epoch_batches(fs, spec, 0, False, e) for e in (0, 1)}
    dl = TrainLoader(BatchReader(fs, seed=SEED, on_corrupt="skip"), PlanSampler(fs, B, spec), num_workers=2,
                     persistent_workers=True, layout_on_device=True, prefetch_factor=2)
    for epoch, limit, first in ((0, 3, 0), (0, None, 3), (1, None, 0)):
        dl.sampler.set_epoch(epoch)
        got = []
        for batch in dl:
            got.append(to_training_batch(batch))
            if len(got) == limit:
                break
        assert len(got) == (limit or len(want[epoch]) - first)
        for (x, y, i), (xw, yw, iw) in zip(got, want[epoch][first:]):
            assert torch.equal(x, xw) and torch.equal(y, yw) and torch.equal(i, iw)
    assert dl.fresh_buffers == 0 and dl._ring is not None and dl._ring.slots == 2 + 4  # prefetch_factor + held


def test_close_stops_persistent_workers_and_the_next_epoch_starts_new_ones(noisy_set: Path) -> None:
    """``close()`` joins persistent workers (a benchmark counts their CPU time only once they exit);
    iterating again starts new workers that give the same batches."""
    fs = FaceRecordSet(noisy_set)
    spec = PlanSpec(seed=SEED)
    want = epoch_batches(fs, spec, 0, False, 1)
    dl = TrainLoader(BatchReader(fs, seed=SEED, on_corrupt="skip"), PlanSampler(fs, B, spec), num_workers=2,
                     persistent_workers=True, layout_on_device=True, prefetch_factor=2)
    assert len(list(dl)) == len(want)
    workers = list(dl._iterator._workers)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)  # persistent: alive after the epoch
    dl.close()
    assert not any(w.is_alive() for w in workers) and dl._iterator is None
    dl.sampler.set_epoch(1)
    got = [to_training_batch(b) for b in dl]
    assert dl._iterator._workers[0] is not workers[0] and len(got) == len(want)
    for (x, y, i), (xw, yw, iw) in zip(got, want):
        assert torch.equal(x, xw) and torch.equal(y, yw) and torch.equal(i, iw)
    dl.close()


def test_a_busy_slot_is_never_overwritten(noisy_set: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With one slot per worker for four batches in flight, workers send fresh buffers instead: same batches."""
    fs = FaceRecordSet(noisy_set)
    spec = PlanSpec(seed=SEED, streaming=True, chunk=4, window=20)
    want = epoch_batches(fs, spec, 0, False, 0)
    monkeypatch.setattr(loader_module, "SlotRing", lambda workers, slots, layout: SlotRing(workers, 1, layout))
    reader = BatchReader(fs, seed=SEED, on_corrupt="skip")
    dl = TrainLoader(reader, PlanSampler(fs, B, spec), num_workers=2, prefetch_factor=4, layout_on_device=True)
    got = [to_training_batch(b) for b in dl]
    assert len(got) == len(want) and 0 < dl.fresh_buffers < len(got)
    for (x, y, i), (xw, yw, iw) in zip(got, want):
        assert torch.equal(x, xw) and torch.equal(y, yw) and torch.equal(i, iw)


def test_batches_the_trainer_keeps_are_never_overwritten(noisy_set: Path) -> None:
    """Batches handed out in place stay intact while referenced, across epochs of persistent workers."""
    fs = FaceRecordSet(noisy_set)
    spec = PlanSpec(seed=SEED)
    want = {e: epoch_batches(fs, spec, 0, False, e) for e in (0, 1, 2)}
    dl = TrainLoader(BatchReader(fs, seed=SEED, on_corrupt="skip"), PlanSampler(fs, B, spec), num_workers=2,
                     persistent_workers=True, layout_on_device=True, prefetch_factor=2)
    kept = list(dl)  # 11 batches in 12 slots, all still referenced
    assert dl.fresh_buffers == 0
    dl.sampler.set_epoch(1)
    second = [to_training_batch(b) for b in dl]  # most slots busy: fresh buffers, nothing overwritten
    assert dl.fresh_buffers > 0
    for got, expected in ((kept, want[0]), (second, want[1])):
        assert len(got) == len(expected)
        for (x, y, i), (xw, yw, iw) in zip(map(to_training_batch, got), expected):
            assert torch.equal(x, xw) and torch.equal(y, yw) and torch.equal(i, iw)
    del kept, got
    gc.collect()
    fresh = dl.fresh_buffers
    dl.sampler.set_epoch(2)
    third = [to_training_batch(b) for b in dl]
    assert dl.fresh_buffers == fresh and all(torch.equal(a[0], b[0]) for a, b in zip(third, want[2]))


def test_slot_ring_never_hands_out_a_busy_slot() -> None:
    layout = PackedLayout(4, 3, 5)
    assert layout.nbytes % 64 == 0 and layout.pixels_at >= 17 * 4
    ring = SlotRing(2, 3, layout)
    ring.restart()
    assert ring.buffers.is_shared() and ring.buffers.shape == (2, 3, layout.nbytes)
    worker = copy.deepcopy(ring)  # a worker's copy (forked: the same memory), with its own counts

    def make() -> PackedBatch | None:
        slot = worker.claim(ring.ticket(), 1, layout)
        return None if slot is None else PackedBatch(layout, None, ring.id, 1, slot, worker.filled(slot))

    made = [make() for _ in range(4)]
    assert [b.slot for b in made[:3]] == [0, 1, 2] and made[3] is None  # all three written, none delivered yet
    held = ring.deliver(made[0], hold=True)  # handed out in place
    assert held.data_ptr() == ring.slot(1, 0).data_ptr() and make() is None  # slot 0 busy while referenced
    pixels = layout.views(held)[0]
    del held
    assert make() is None  # a view still holds it
    del pixels
    gc.collect()
    again = make()
    assert again is not None and again.slot == 0 and again.seq == 3
    ring.deliver(made[1], hold=False)  # copied out by the caller: free at once
    assert make().slot == 1
    kept = ring.deliver(made[2], hold=True)
    with pytest.raises(RuntimeError, match="got batch 2 .* expected batch 3"):
        ring.deliver(made[2], hold=False)  # out of order: never silently
    assert worker.claim(ring.ticket()._replace(ring=ring.id + 1), 1, layout) is None  # another ring's request
    assert worker.claim(ring.ticket(), 1, PackedLayout(5, 3, 5)) is None
    ring.restart()  # a new iteration: the undelivered batches were discarded, the held one is still in use
    assert [make().slot for _ in range(2)] == [0, 1] and make() is None and ring.ticket().delivered == (0, 0)
    del kept
    gc.collect()
    assert make().slot == 2
    pixels, labels, index, flip = layout.views(ring.slot(1, 2))
    assert (pixels.shape, labels.dtype, index.dtype, flip.dtype) == ((4, 3, 5, 3), torch.int64, torch.int64, torch.bool)


def test_layout_on_any_device_equals_the_numpy_copy() -> None:
    rng = np.random.default_rng(1)
    pixels = torch.from_numpy(rng.integers(0, 255, (6, 5, 7, 3), dtype=np.uint8))
    flip = torch.tensor([True, False, False, True, True, False])
    want = torch.stack([p.permute(2, 0, 1).flip(-1) if f else p.permute(2, 0, 1) for p, f in zip(pixels, flip)])
    assert torch.equal(to_training_layout(HWCImages(pixels, flip)), want)
    devices = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices[1:]:
        assert torch.equal(to_training_layout(HWCImages(pixels.to(device), flip)).cpu(), want)
    with pytest.raises(ValueError, match=r"expected uint8 \[B, H, W, 3\]"):
        to_training_layout(HWCImages(want, flip))


def test_one_header_parse_per_image(monkeypatch: pytest.MonkeyPatch) -> None:
    import facemargin.data.formats.image as image

    calls = []
    monkeypatch.setattr(image, "_jpeg_header", lambda data: calls.append(1) or (0, 0))
    good = simplejpeg.encode_jpeg(np.full((H, W, 3), 90, np.uint8), quality=90)
    out = np.empty((H, W, 3), np.uint8)
    decode_into(good, out)
    assert not calls and int(out.mean()) in range(85, 96)
    monkeypatch.undo()
    for h, w in ((H + 4, W), (H - 4, W - 8)):  # larger: refused before decoding; smaller: after
        other = simplejpeg.encode_jpeg(np.zeros((h, w, 3), np.uint8), quality=90)
        with pytest.raises(ImageSizeError, match=rf"image is {w}x{h} \(width x height\), the set's images are {W}x{H}"):
            decode_into(other, out)


class _Seen(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, _, index = batch
        self.batches.append((x.clone(), index.clone()))
        return self.lin(x.mean(dim=(2, 3))).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_trainer_gets_the_old_batches_through_the_transfer_hook(noisy_set: Path) -> None:
    kw = dict(batch_size=B, seed=SEED, on_corrupt="skip", num_workers=2)
    dm = FaceRecordDataModule(noisy_set, **kw)
    model = _Seen()
    pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
               num_sanity_val_steps=0).fit(model, dm)
    assert dm._train_loader is not None and dm._train_loader.layout_on_device
    plain = FaceRecordDataModule(noisy_set, **kw)
    want = list(plain.train_dataloader())  # no trainer: the usual CHW batches
    assert not plain._train_loader.layout_on_device and len(want) == len(model.batches) == 90 // B
    for (x, index), (xw, _, iw) in zip(model.batches, want):
        assert torch.equal(index, iw) and torch.equal(x, xw.float() / 127.5 - 1)
