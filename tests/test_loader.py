"""The shared training loader on real .rec files through real DataLoaders (workers 0, 1, 2, 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import label_of, write_face_set

from facemargin.data.formats.image import CorruptImageError
from facemargin.data.loading.loader import BatchReader, PlanSampler, TrainLoader
from facemargin.data.loading.plan import PlanSpec, planned_samples
from facemargin.data.sources.recordio import FaceRecordSet
from facemargin.data.storage.local import LocalSource

MAP = PlanSpec(seed=7)
STREAM = PlanSpec(seed=7, streaming=True, chunk=4, window=24)


@pytest.fixture(scope="module")
def unique_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """103 images, label == sample index (coverage and duplicates are visible from labels)."""
    return write_face_set(tmp_path_factory.mktemp("unique") / "s", list(range(103)))


def loader(root, spec: PlanSpec, workers: int, batch: int = 8, rank: int = 0, world: int = 1, epoch: int = 0,
           **kw) -> TrainLoader:
    fs = root if isinstance(root, FaceRecordSet) else FaceRecordSet(root)
    sampler = PlanSampler(fs, batch, spec, rank=rank, world_size=world, epoch=epoch)
    return TrainLoader(BatchReader(fs, seed=spec.seed, **kw), sampler, num_workers=workers)


def run(dl: TrainLoader, limit: int | None = None) -> list[list[int]]:
    out = []
    for k, (images, labels, index) in enumerate(dl):
        assert images.dtype == torch.uint8 and images.is_contiguous() and labels.dtype == index.dtype == torch.long
        out.append(index.tolist())
        if limit is not None and k + 1 == limit:
            break
    return out


@pytest.mark.parametrize("spec", [MAP, STREAM], ids=["map", "stream"])
def test_batches_do_not_depend_on_workers(unique_set: Path, spec: PlanSpec) -> None:
    ref = run(loader(unique_set, spec, 0))
    assert len(ref) == 103 // 8 and all(len(b) == 8 for b in ref)
    for workers in (1, 2, 3):
        assert run(loader(unique_set, spec, workers)) == ref
    flat = sum(ref, [])
    assert len(set(flat)) == len(flat) and np.array_equal(np.sort(flat), planned_samples(spec, 0, 103, 1, 8))
    other = loader(unique_set, spec, 2, epoch=1)
    assert run(other) != ref


@pytest.mark.parametrize("layout", ["insightface", "im2rec"])
def test_labels_images_and_flips_match(tmp_path: Path, layout: str) -> None:
    labels = sorted(int(x) for x in np.random.default_rng(0).integers(0, 7, 60))
    root = write_face_set(tmp_path / "s", labels, layout=layout, num_classes=7)
    flips = 0
    for images, y, index in loader(root, STREAM, 2, flip_p=0.5):
        for img, lab, i in zip(images, y.tolist(), index.tolist()):
            got, flipped = label_of(img)
            assert lab == labels[i] and got == lab % 20
            flips += flipped
    assert 10 < flips < 50


def test_iterator_started_before_set_epoch_reads_the_new_epoch(unique_set: Path) -> None:
    """Lightning creates the iterator (and starts the workers) before calling set_epoch."""
    for spec in (MAP, STREAM):
        want = run(loader(unique_set, spec, 0, epoch=3))
        dl = loader(unique_set, spec, 2, epoch=0)
        it = iter(dl)
        dl.sampler.set_epoch(3)
        assert [b[2].tolist() for b in it] == want


def test_persistent_workers_follow_set_epoch(unique_set: Path) -> None:
    fs = FaceRecordSet(unique_set)
    dl = TrainLoader(BatchReader(fs), PlanSampler(fs, 8, MAP), num_workers=2, persistent_workers=True)
    e0 = run(dl)
    dl.sampler.set_epoch(1)
    e1 = run(dl)
    dl.sampler.set_epoch(0)
    assert e0 != e1 and run(dl) == e0


@pytest.mark.parametrize("spec", [MAP, STREAM], ids=["map", "stream"])
def test_resume_with_another_worker_count(unique_set: Path, spec: PlanSpec) -> None:
    full = run(loader(unique_set, spec, 0, epoch=1))
    first = loader(unique_set, spec, 2, epoch=1)
    seen = run(first, limit=5)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["segments"] == [[1, 8, 5]]
    for then in (3, 1, 0):  # 2 -> 3, 2 -> 1, 2 -> 0 workers
        resumed = loader(unique_set, spec, then)
        resumed.load_state_dict(state)
        assert seen + run(resumed) == full  # the very batches of the uninterrupted epoch


def test_end_of_epoch_state_starts_the_next_epoch(unique_set: Path) -> None:
    dl = loader(unique_set, MAP, 2)
    run(dl)
    resumed = loader(unique_set, MAP, 2)
    resumed.load_state_dict(dl.state_dict())
    assert resumed.sampler.epoch == 1 and run(resumed) == run(loader(unique_set, MAP, 0, epoch=1))


@pytest.mark.parametrize("spec", [MAP, STREAM], ids=["map", "stream"])
def test_resume_with_another_world_size(unique_set: Path, spec: PlanSpec) -> None:
    """Two ranks stop after 3 batches; three ranks finish the epoch: nothing twice, only a tail left out."""
    two = [loader(unique_set, spec, 2, rank=r, world=2, batch=4, epoch=2) for r in range(2)]
    seen = sum((sum(run(dl, limit=3), []) for dl in two), [])
    state = two[0].state_dict()
    assert two[1].state_dict() == state  # every rank saves the same state
    rest = []
    for r in range(3):
        dl = loader(unique_set, spec, 1, rank=r, world=3, batch=4)
        dl.load_state_dict(state)
        assert len(dl) == max(3 + dl.sampler.plan.num_batches(), 103 // 12)
        rest += sum(run(dl), [])
    both = seen + rest
    assert len(both) == len(set(both)) and len(set(range(103)) - set(both)) < 3 * 4


def test_map_style_reads_each_record_with_one_pread(unique_set: Path) -> None:
    class Counting(LocalSource):
        calls = 0

        def pread(self, n: int, offset: int) -> bytes:
            Counting.calls += 1
            return super().pread(n, offset)

    fs = FaceRecordSet(unique_set)
    fs.reader.source = Counting(fs.rec_path)
    batches = run(loader(fs, MAP, 0))
    # at most one read per record (neighbours drawn into one batch share a read)
    assert 90 <= Counting.calls <= sum(len(b) for b in batches) == 96
    Counting.calls = 0
    stream = run(loader(fs, STREAM, 0))
    assert Counting.calls <= (96 // 4) + 12 and len(stream) == 12  # one read per block (runs of 4)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_raise_names_file_and_key_and_skip_substitutes(tmp_path: Path, workers: int) -> None:
    labels = [i // 4 for i in range(60)]
    corrupt = (0, 7, 8, 30, 59)
    root = write_face_set(tmp_path / "s", labels, corrupt=corrupt)
    with pytest.raises(CorruptImageError, match=r"train\.rec at offset \d+ \(key (1|8|9|31|60)\): corrupt image"):
        run(loader(root, MAP, workers, batch=10))
    dl = loader(root, MAP, workers, batch=10, on_corrupt="skip")
    n = 0
    for images, y, index in dl:
        assert images.shape[0] == 10 and not set(index.tolist()) & set(corrupt)
        for img, lab, i in zip(images, y.tolist(), index.tolist()):
            assert lab == labels[i] and label_of(img)[0] == lab % 20  # the substitute's own label
        n += 10
    assert n == 60 and dl.dataset.num_skipped >= len(corrupt)
