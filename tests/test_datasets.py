"""datasets.py on real .rec files in tmp_path, through real DataLoaders (workers 0 and 2)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from torch.utils.data import DataLoader

from facemargin.data.datasets import (
    EpochDistributedSampler,
    RecordDataset,
    RecordStream,
    StreamDataLoader,
    shard_span,
)
from facemargin.data.decode import CorruptImageError
from facemargin.data.recordio import IRHeader, RecordIOWriter, pack_record

SIZE = 16


def face_image(label: int) -> np.ndarray:
    """Left half grey level encodes the label, right half black: flips and labels are visible."""
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[:, : SIZE // 2] = 20 + 10 * (label % 20)
    return img


def label_of(image: torch.Tensor) -> tuple[int, bool]:
    """Recover ``(label % 20, flipped)`` from a normalised tensor made from :func:`face_image`."""
    x = (image + 1) * 127.5
    left, right = float(x[:, :, 1:6].mean()), float(x[:, :, -6:-1].mean())
    flipped = right > left
    return round((max(left, right) - 20) / 10), flipped


def write_set(
    root: Path,
    labels: list[int],
    num_classes: int | None = None,
    meta: bool = True,
    corrupt: tuple[int, ...] = (),
) -> Path:
    """An insightface-layout set (meta record 0, images 1..N, identity records after) or im2rec."""
    root.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    num_classes = num_classes or (max(labels) + 1)
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        first = 1 if meta else 0
        if meta:
            w.write(0, pack_record(IRHeader(0, 0.0, 0, 0), b"", labels=[n + 1, n + 1 + num_classes]))
        for i, lab in enumerate(labels):
            data = simplejpeg.encode_jpeg(face_image(lab), quality=95, colorspace="RGB")
            if i in corrupt:
                data = data[:10] + b"\x00garbage"
            w.write(first + i, pack_record(IRHeader(0, float(lab), first + i, 0), data))
        if meta:  # per-identity range records (no image), as insightface writes them
            for c in range(num_classes):
                w.write(n + 1 + c, pack_record(IRHeader(0, 0.0, 0, 0), b"", labels=[1, 1]))
    (root / "property").write_text(f"{num_classes},{SIZE},{SIZE}")
    return root


@pytest.fixture()
def unique_set(tmp_path: Path) -> Path:
    """203 images, label == sample id (so coverage/duplicates are visible from labels)."""
    return write_set(tmp_path / "unique", list(range(203)))


# --------------------------------------------------------------------------- map-style
@pytest.mark.parametrize("meta", [True, False], ids=["insightface", "im2rec"])
@pytest.mark.parametrize("workers", [0, 2])
def test_map_labels_long_and_equal(tmp_path: Path, meta: bool, workers: int) -> None:
    labels = [int(x) for x in np.random.default_rng(0).integers(0, 7, 37)]
    root = write_set(tmp_path / "s", labels, num_classes=7, meta=meta)
    ds = RecordDataset(root, train=False)
    assert len(ds) == 37 and ds.num_classes == 7
    loader = DataLoader(ds, batch_size=8, num_workers=workers, shuffle=False)
    got_labels, got_images = [], []
    for images, y in loader:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, SIZE, SIZE)
        assert y.dtype == torch.long
        got_labels += y.tolist()
        got_images += [label_of(im) for im in images]
    assert got_labels == labels
    assert [lab for lab, _ in got_images] == [lab % 20 for lab in labels]  # image content matches
    assert not any(f for _, f in got_images)  # train=False: no flips


def test_map_flip_deterministic_with_seed(tmp_path: Path) -> None:
    root = write_set(tmp_path / "s", [i % 5 for i in range(64)])
    plain = RecordDataset(root, train=False)
    a, b, c = (RecordDataset(root, seed=s) for s in (3, 3, 4))

    def flips(ds: RecordDataset) -> list[bool]:
        out = []
        for i in range(len(ds)):
            img, _ = ds[i]
            ref, _ = plain[i]
            if torch.equal(img, ref):
                out.append(False)
            else:
                assert torch.equal(img, torch.flip(ref, dims=[2]))
                out.append(True)
        return out

    fa = flips(a)
    assert fa == flips(b)  # same seed, same epoch
    assert fa != flips(c)  # other seed
    assert 16 < sum(fa) < 48  # ~ p = 0.5
    a.set_epoch(1)
    assert flips(a) != fa  # reshuffled per epoch
    a.set_epoch(0)
    assert flips(a) == fa  # reproducible
    assert not any(flips(RecordDataset(root, flip_p=0.0)))


def test_map_flip_independent_of_workers(tmp_path: Path) -> None:
    root = write_set(tmp_path / "s", [i % 5 for i in range(24)])
    ds = RecordDataset(root, seed=1)
    ds.set_epoch(2)
    ref = torch.cat([x for x, _ in DataLoader(ds, batch_size=5, num_workers=0)])
    got = torch.cat([x for x, _ in DataLoader(ds, batch_size=5, num_workers=2)])
    assert torch.equal(ref, got)


def test_map_corrupt_raise_names_file_and_key(tmp_path: Path) -> None:
    root = write_set(tmp_path / "s", list(range(10)), corrupt=(4,))
    ds = RecordDataset(root)
    ds[3]
    with pytest.raises(CorruptImageError) as info:
        ds[4]
    msg = str(info.value)
    assert str(root / "train.rec") in msg and "key 5" in msg  # meta layout: sample 4 is key 5
    it = iter(DataLoader(ds, batch_size=10, num_workers=2))
    with pytest.raises(CorruptImageError, match="key 5"):
        next(it)
    del it  # shut the workers down now


@pytest.mark.parametrize("workers", [0, 2])
def test_map_corrupt_skip_counts_and_never_mislabels(tmp_path: Path, workers: int, caplog) -> None:
    labels = [i % 13 for i in range(60)]
    corrupt = (0, 7, 8, 30, 59)
    root = write_set(tmp_path / "s", labels, corrupt=corrupt)
    ds = RecordDataset(root, on_corrupt="skip", train=False)
    loader = DataLoader(ds, batch_size=16, num_workers=workers, drop_last=True)
    seen = 0
    with caplog.at_level("WARNING"):
        for images, y in loader:
            assert images.shape[0] == 16  # batches keep their size
            for im, lab in zip(images, y.tolist()):
                assert label_of(im)[0] == lab % 20  # the image is that label's image
            seen += y.numel()
    # every corrupt sample read is counted (a substitute can itself be corrupt: counted too)
    assert ds.num_skipped >= sum(1 for i in corrupt if i < seen)
    if workers == 0:
        warned = {int(m.split("(key ")[1].split(")")[0]) for m in (r.getMessage() for r in caplog.records)}
        assert warned == {i + 1 for i in corrupt}  # meta layout: sample i is key i + 1
        assert ds.num_skipped == len(warned) + 1  # 5 corrupt samples + one corrupt substitute (seed 0)


def test_epoch_distributed_sampler_forwards_epoch(tmp_path: Path) -> None:
    root = write_set(tmp_path / "s", list(range(20)))
    ds = RecordDataset(root)
    samplers = [EpochDistributedSampler(ds, num_replicas=2, rank=r, seed=5) for r in (0, 1)]
    idx = [list(s) for s in samplers]
    assert len(idx[0]) == len(idx[1]) == 10 and not set(idx[0]) & set(idx[1])
    samplers[0].set_epoch(3)
    assert ds.epoch == 3 and list(samplers[0]) != idx[0]


# --------------------------------------------------------------------------- sharding math
@pytest.mark.parametrize("drop_last", [True, False])
def test_shard_span_partitions(drop_last: bool) -> None:
    for total in (0, 1, 7, 100, 257, 1000):
        for world in (1, 2, 3, 8):
            for bs in (1, 4, 32):
                for nw in (1, 2, 3):
                    covered = []
                    nbs = set()
                    for rank in range(world):
                        rank_samples = 0
                        for w in range(nw):
                            start, count, nb = shard_span(total, world, rank, bs, drop_last, nw, w)
                            nbs.add(nb)
                            covered += list(range(start, start + count))
                            rank_samples += count
                            # every worker yields whole batches except the one holding the rank's last batch
                            if not nb or (nb - 1) % nw != w:
                                assert count == len(range(w, nb, nw)) * bs
                        if drop_last:
                            assert rank_samples == (total // (world * bs)) * bs
                        else:
                            assert rank_samples == -(-total // world)
                    assert len(nbs) == 1  # every rank has the same number of batches
                    assert covered == list(range(len(covered)))  # contiguous, disjoint spans
                    if drop_last:
                        assert len(covered) == total - total % (world * bs)
                    else:
                        assert total <= len(covered) < total + world


# --------------------------------------------------------------------------- streaming
def _stream_epoch(root: Path, rank: int, world: int, workers: int, epoch: int = 0, **kw) -> list[list[int]]:
    stream = RecordStream(root, rank=rank, world_size=world, **kw)
    stream.set_epoch(epoch)
    loader = StreamDataLoader(stream, num_workers=workers)
    batches = [y.tolist() for _, y in loader]
    assert len(batches) == len(loader) == stream.num_batches()
    return batches


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_ranks_cover_without_duplicates(unique_set: Path, workers: int) -> None:
    kw = dict(batch_size=8, shuffle_buffer=32, chunk_bytes=2048, seed=7)
    per_rank = [_stream_epoch(unique_set, r, 2, workers, **kw) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 203 // 16
    flat = [lab for batches in per_rank for b in batches for lab in b]
    assert all(len(b) == 8 for batches in per_rank for b in batches)
    assert len(flat) == len(set(flat)) == 192  # only the drop_last tail (11) is missing
    assert set(flat) <= set(range(203))


def test_stream_no_drop_last_covers_all(unique_set: Path) -> None:
    kw = dict(batch_size=8, shuffle_buffer=16, chunk_bytes=2048, drop_last=False)
    per_rank = [_stream_epoch(unique_set, r, 2, 2, **kw) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 13
    flat = [lab for batches in per_rank for b in batches for lab in b]
    assert set(flat) == set(range(203)) and len(flat) == 204  # one wrap-around duplicate


def test_stream_reshuffles_per_epoch_and_is_reproducible(unique_set: Path) -> None:
    kw = dict(batch_size=8, shuffle_buffer=32, chunk_bytes=2048, seed=3)
    e0 = _stream_epoch(unique_set, 0, 2, 2, epoch=0, **kw)
    assert e0 == _stream_epoch(unique_set, 0, 2, 2, epoch=0, **kw)  # same seed + epoch
    e1 = _stream_epoch(unique_set, 0, 2, 2, epoch=1, **kw)
    assert e0 != e1
    assert set(sum(e0, [])) != set(sum(e1, []))  # different block split between ranks, too
    assert e0 != _stream_epoch(unique_set, 0, 2, 2, epoch=0, **{**kw, "seed": 4})


def test_stream_labels_and_flips_match_images(tmp_path: Path) -> None:
    labels = [i % 17 for i in range(150)]
    root = write_set(tmp_path / "s", labels)
    stream = RecordStream(root, batch_size=10, shuffle_buffer=20, chunk_bytes=1024, rank=0, world_size=1)
    n_flip = total = 0
    for images, y in StreamDataLoader(stream, num_workers=2):
        assert images.dtype == torch.float32 and y.dtype == torch.long
        for im, lab in zip(images, y.tolist()):
            got, flipped = label_of(im)
            assert got == lab % 20
            n_flip += flipped
            total += 1
    assert total == 150 and 40 < n_flip < 110


def test_stream_persistent_workers_see_set_epoch(unique_set: Path) -> None:
    stream = RecordStream(unique_set, batch_size=8, shuffle_buffer=32, chunk_bytes=2048, rank=0, world_size=1)
    loader = StreamDataLoader(stream, num_workers=2, persistent_workers=True)
    loader.sampler.set_epoch(0)  # what Lightning calls each epoch
    e0 = [y.tolist() for _, y in loader]
    loader.sampler.set_epoch(1)
    e1 = [y.tolist() for _, y in loader]
    loader.sampler.set_epoch(0)
    again = [y.tolist() for _, y in loader]
    assert e0 != e1 and e0 == again


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resume_mid_epoch(unique_set: Path, workers: int) -> None:
    kw = dict(batch_size=8, shuffle_buffer=32, chunk_bytes=2048, seed=1, rank=0, world_size=1)
    full = _stream_epoch(unique_set, 0, 1, workers, epoch=2, **{k: v for k, v in kw.items() if k not in ("rank", "world_size")})
    stream = RecordStream(unique_set, **kw)
    stream.load_state_dict({**stream.state_dict(), "epoch": 2, "batches_consumed": 5})
    loader = StreamDataLoader(stream, num_workers=workers)
    loader.sampler.set_epoch(2)  # Lightning re-announces the restored epoch: keeps the resume point
    rest = [y.tolist() for _, y in loader]
    if workers == 0:
        assert rest == full[5:]
    else:
        assert sorted(map(sorted, rest)) == sorted(map(sorted, full[5:]))
    loader.sampler.set_epoch(3)  # the next epoch starts from its beginning
    assert len([y for _, y in loader]) == len(full)


def test_stream_corrupt_raise_and_skip(tmp_path: Path) -> None:
    labels = [i % 11 for i in range(80)]
    root = write_set(tmp_path / "s", labels, corrupt=(3, 40))
    kw = dict(batch_size=8, shuffle_buffer=10, chunk_bytes=1024, rank=0, world_size=1)
    with pytest.raises(CorruptImageError, match=r"train\.rec \(key (4|41)\)"):
        for _ in StreamDataLoader(RecordStream(root, **kw), num_workers=0):
            pass
    stream = RecordStream(root, on_corrupt="skip", **kw)
    n = 0
    for images, y in StreamDataLoader(stream, num_workers=2):
        assert images.shape[0] == 8
        for im, lab in zip(images, y.tolist()):
            assert label_of(im)[0] == lab % 20
        n += 8
    assert n == 80 and stream.num_skipped == 2


def test_stream_too_small_raises(unique_set: Path) -> None:
    with pytest.raises(ValueError, match="fewer than world_size"):
        RecordStream(unique_set, batch_size=128, rank=0, world_size=2)


def _ddp_worker(rank: int, root: str, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        stream = RecordStream(root, batch_size=8, shuffle_buffer=32, chunk_bytes=2048, seed=9)  # rank from dist
        labels: list[int] = []
        for _, y in StreamDataLoader(stream, num_workers=2):
            t = torch.ones(1)
            dist.all_reduce(t)  # would hang if one rank had more batches
            labels += y.tolist()
        gathered: list[list[int]] = [[], []]
        dist.all_gather_object(gathered, labels)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


def test_stream_real_two_process_gloo(unique_set: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    out = tmp_path / "gathered.pt"
    init = f"file://{tmp_path / 'store'}"
    mp.start_processes(_ddp_worker, args=(str(unique_set), init, str(out)), nprocs=2, start_method="fork")
    gathered = torch.load(out)
    assert len(gathered[0]) == len(gathered[1]) == 96
    flat = gathered[0] + gathered[1]
    assert len(set(flat)) == 192


def test_uint8_output_matches_float(tmp_path: Path) -> None:
    from facemargin.data.decode import normalize_uint8

    root = write_set(tmp_path / "s", [i % 5 for i in range(20)])
    f, u = RecordDataset(root, seed=2), RecordDataset(root, seed=2, output="uint8")
    for i in range(len(f)):
        (xf, yf), (xu, yu) = f[i], u[i]
        assert xu.dtype == torch.uint8 and torch.equal(normalize_uint8(xu), xf) and yf == yu
    sf = RecordStream(root, batch_size=4, shuffle_buffer=8, rank=0, world_size=1)
    su = RecordStream(root, batch_size=4, shuffle_buffer=8, rank=0, world_size=1, output="uint8")
    for (xf, yf), (xu, yu) in zip(sf, su):
        assert torch.equal(normalize_uint8(xu), xf) and yf == yu
    with pytest.raises(ValueError, match="output"):
        RecordDataset(root, output="half")  # type: ignore[arg-type]
