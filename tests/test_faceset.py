"""FaceRecordSet: layouts, labels, label cache, bad input."""

from __future__ import annotations

import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_LABELS, tiny_jpeg

from facemargin.data.faceset import FaceRecordSet, read_property
from facemargin.data.recordio import IRHeader, RecordIOError, RecordIOWriter, pack_record


def write_set(root: Path, records: list[tuple[int, bytes]], prop: str | None = "3,8,8") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        for key, payload in records:
            w.write(key, payload)
    if prop is not None:
        (root / "property").write_text(prop)
    return root


def test_insightface_layout(tiny_recdir):
    fs = FaceRecordSet(tiny_recdir)
    assert fs.layout == "insightface"
    assert fs.num_classes == 3 and fs.image_size == (8, 8)
    assert fs.image_keys.dtype == np.int64 and fs.image_keys.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert fs.identity_range == (8, 11)
    assert len(fs) == 7
    for key, label in enumerate(TINY_LABELS, start=1):
        got_label, image = fs.read(key)
        assert type(got_label) is int and got_label == label
        assert image == tiny_jpeg(key)
        assert fs.label(key) == label
    labels = fs.labels()
    assert labels.dtype == np.int64 and labels.tolist() == TINY_LABELS


def test_im2rec_layout_every_key_is_an_image(tmp_path):
    records = [(k, pack_record(IRHeader(0, float(k % 2), k, 0), tiny_jpeg(k))) for k in range(4)]
    fs = FaceRecordSet(write_set(tmp_path / "s", records, "2,8,8"))
    assert fs.layout == "im2rec" and fs.identity_range is None
    assert fs.image_keys.tolist() == [0, 1, 2, 3]
    assert fs.labels().tolist() == [0, 1, 0, 1]
    assert fs.read(0) == (0, tiny_jpeg(0))


def test_multi_label_images_use_first_label(tmp_path):
    # record 0 carries labels *and* image bytes: an image (im2rec multi-label), not a meta record
    records = [(k, pack_record(IRHeader(0, 0.0, k, 0), tiny_jpeg(k), labels=[float(k), 0.25])) for k in range(3)]
    fs = FaceRecordSet(write_set(tmp_path / "s", records))
    assert fs.layout == "im2rec"
    assert fs.labels().tolist() == [0, 1, 2]
    assert fs.read(2) == (2, tiny_jpeg(2))


def test_labels_cache_written_reused_and_invalidated(tiny_recdir):
    fs = FaceRecordSet(tiny_recdir)
    cache = tiny_recdir / "train.idx.labels.npz"
    assert fs.labels_cache_path == cache and not cache.exists()
    assert fs.labels().tolist() == TINY_LABELS
    assert cache.is_file()
    # prove a fresh instance reads the cache: doctor the cached labels, keep the stamp
    with np.load(cache) as z:
        stamp, keys = z["stamp"], z["keys"]
    np.savez(cache, stamp=stamp, keys=keys, labels=np.array([2, 2, 2, 2, 2, 2, 2]))
    assert FaceRecordSet(tiny_recdir).labels().tolist() == [2] * 7
    # touching the index invalidates the cache: labels are re-read and the cache rewritten
    st = (tiny_recdir / "train.idx").stat()
    os.utime(tiny_recdir / "train.idx", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert FaceRecordSet(tiny_recdir).labels().tolist() == TINY_LABELS
    with np.load(cache) as z:
        assert z["labels"].tolist() == TINY_LABELS


def test_labels_kept_in_memory_when_cache_cannot_be_written(tiny_recdir):
    (tiny_recdir / "train.idx.labels.npz").mkdir()  # os.replace onto a directory fails
    fs = FaceRecordSet(tiny_recdir)
    assert fs.labels().tolist() == TINY_LABELS
    assert fs.labels() is fs.labels()
    assert sorted(p.name for p in tiny_recdir.iterdir()) == ["property", "train.idx", "train.idx.labels.npz", "train.rec"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_labels_read_only_directory(tiny_recdir):
    os.chmod(tiny_recdir, 0o555)
    try:
        assert FaceRecordSet(tiny_recdir).labels().tolist() == TINY_LABELS
        assert not (tiny_recdir / "train.idx.labels.npz").exists()
    finally:
        os.chmod(tiny_recdir, 0o755)


def test_pickle_round_trip(tiny_recdir):
    fs = FaceRecordSet(tiny_recdir)
    fs.read(1)
    clone = pickle.loads(pickle.dumps(fs))
    assert clone.read(5) == (1, tiny_jpeg(5)) and clone.image_keys.tolist() == fs.image_keys.tolist()


# --------------------------------------------------------------------------- bad input
def test_missing_property_names_path(tiny_recdir):
    (tiny_recdir / "property").unlink()
    with pytest.raises(FileNotFoundError, match=r"property file not found: .*tinyset/property"):
        FaceRecordSet(tiny_recdir)
    fs = FaceRecordSet(tiny_recdir, num_classes=3)  # explicit class count: size from the first image
    assert fs.num_classes == 3 and fs.image_size == (8, 8)


def test_num_classes_override(tiny_recdir):
    fs = FaceRecordSet(tiny_recdir, num_classes=2)
    assert fs.num_classes == 2
    with pytest.raises(RecordIOError, match=r"train\.rec \(key 6\): label 2 is outside \[0, 2\)"):
        fs.labels()


def test_bad_property_contents(tmp_path):
    (tmp_path / "property").write_text("abc,112")
    with pytest.raises(ValueError, match=r"property: expected 'num_classes,height,width'"):
        read_property(tmp_path / "property")
    (tmp_path / "property").write_text("10,112,96\n")
    assert read_property(tmp_path / "property") == (10, 112, 96)


def test_missing_idx_names_path(tiny_recdir):
    (tiny_recdir / "train.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"index not found: .*tinyset/train\.idx"):
        FaceRecordSet(tiny_recdir)


def test_label_out_of_range_names_file_and_key(tmp_path):
    records = [(0, pack_record(IRHeader(0, 0.0, 0, 0), b"", labels=[3, 3])),
               (1, pack_record(IRHeader(0, 0.0, 1, 0), tiny_jpeg(1))),
               (2, pack_record(IRHeader(0, 7.0, 2, 0), tiny_jpeg(2)))]
    fs = FaceRecordSet(write_set(tmp_path / "s", records))
    assert fs.read(1)[0] == 0
    with pytest.raises(RecordIOError, match=r"s/train\.rec \(key 2\): label 7 is outside \[0, 3\)"):
        fs.read(2)
    with pytest.raises(RecordIOError, match=r"\(key 2\): label 7 is outside"):
        fs.labels()


def test_negative_and_fractional_labels(tmp_path):
    records = [(0, pack_record(IRHeader(0, -1.0, 0, 0), tiny_jpeg(0))),
               (1, pack_record(IRHeader(0, 1.5, 1, 0), tiny_jpeg(1)))]
    fs = FaceRecordSet(write_set(tmp_path / "s", records))
    with pytest.raises(RecordIOError, match=r"\(key 0\): label -1 is outside"):
        fs.read(0)
    with pytest.raises(RecordIOError, match=r"\(key 1\): label 1.5 is not an integer"):
        fs.label(1)


def test_meta_record_pointing_at_absent_keys(tmp_path):
    records = [(0, pack_record(IRHeader(0, 0.0, 0, 0), b"", labels=[5, 6])),
               (1, pack_record(IRHeader(0, 0.0, 1, 0), tiny_jpeg(1)))]
    with pytest.raises(RecordIOError, match=r"train\.idx: meta record \(key 0\) lists image keys 1\.\.4, but key 2 is absent"):
        FaceRecordSet(write_set(tmp_path / "s", records))


def test_truncated_rec_surfaces_key(tiny_recdir):
    rec = tiny_recdir / "train.rec"
    data = rec.read_bytes()
    fs = FaceRecordSet(tiny_recdir)
    off7 = fs.reader.offset(7)
    rec.write_bytes(data[: off7 + 20])
    fresh = FaceRecordSet(tiny_recdir)
    with pytest.raises(RecordIOError, match=rf"train\.rec at offset {off7} \(key 7\): truncated record"):
        fresh.read(7)
    with pytest.raises(RecordIOError, match=r"\(key 7\): truncated"):
        fresh.labels()


def test_bad_magic_surfaces_key(tiny_recdir):
    shutil.copy(tiny_recdir / "train.idx", tiny_recdir / "orig.idx")
    lines = (tiny_recdir / "train.idx").read_text().splitlines()
    key, off = lines[3].split("\t")
    lines[3] = f"{key}\t{int(off) + 8}"
    (tiny_recdir / "train.idx").write_text("\n".join(lines) + "\n")
    fs = FaceRecordSet(tiny_recdir)
    with pytest.raises(RecordIOError, match=rf"train\.rec at offset {int(off) + 8} \(key 3\): bad magic"):
        fs.read(3)


def test_meta_header_bytes_match_insightface(tiny_recdir):
    # the hand-written fixture and pack_record agree on the meta record encoding
    fs = FaceRecordSet(tiny_recdir)
    assert fs.reader.read(0) == pack_record(IRHeader(0, 0.0, 0, 0), b"", labels=[8, 11])
    assert fs.reader.read(0) == struct.pack("<IfQQff", 2, 0.0, 0, 0, 8.0, 11.0)
