"""Indexes and caches (issue 19 item 6): caches follow the .rec, every record has its .idx line,
num_classes= stands in for a missing property, one rank builds the cache while the others wait."""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_face_set
from range_http import RangeServer

from facemargin.data.formats.recordio import IRHeader, RecordIOError, RecordIOReader, RecordIOWriter, pack_record
from facemargin.data.formats.setfiles import SetFiles
from facemargin.data.sources.recordio import FaceRecordSet
from facemargin.data.tools.inspect import inspect_dir

LABELS = [0] * 5 + [1] * 5 + [2] * 5  # keys 1..15; identity records are keys 16, 17, 18


def move_last_image_of_identity_0(root: Path) -> None:
    """Edit the set in place, sizes unchanged: key 5 (the last image of identity 0) becomes identity 1's
    first -- its label and the two identity ranges that meet there change together."""
    reader = RecordIOReader(root / "train.rec", root / "train.idx")
    image, first, second = reader.offset(5), reader.offset(16), reader.offset(17)
    reader.close()
    with open(root / "train.rec", "r+b") as f:
        for offset, values in ((image + 12, [1.0]), (first + 32, [1.0, 5.0]), (second + 32, [5.0, 11.0])):
            f.seek(offset)
            f.write(struct.pack(f"<{len(values)}f", *values))


def test_an_edited_rec_is_not_read_through_a_stale_index_cache(tmp_path):
    """An edit in place keeps the .rec's size and its .idx: the cache key must still notice it (ctime)."""
    root = write_face_set(tmp_path / "s", LABELS)
    fs = FaceRecordSet(root)
    assert fs.labels().tolist() == LABELS and fs.read(5)[0] == 0
    move_last_image_of_identity_0(root)
    again = FaceRecordSet(root)
    assert again.read(5)[0] == 1  # with the old ranges: "label 1 does not match the identity ranges ... damaged"
    assert again.labels().tolist() == [0] * 4 + [1] * 6 + [2] * 5
    assert again.identity_range == fs.identity_range


def test_an_edited_label_is_not_read_from_a_stale_label_cache(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    labels = [k % 3 for k in range(24)]
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:  # im2rec layout: labels are read and cached
        for key, label in enumerate(labels):
            w.write(key, pack_record(IRHeader(0, float(label), key, 0), bytes([key]) * 3000))
    (root / "property").write_text("3,8,8")
    assert FaceRecordSet(root).labels().tolist() == labels
    offset = RecordIOReader(root / "train.rec", root / "train.idx").offset(13)
    with open(root / "train.rec", "r+b") as f:
        f.seek(offset + 12)
        f.write(struct.pack("<f", 2.0))
    labels[13] = 2
    assert FaceRecordSet(root).labels().tolist() == labels


def test_a_remote_set_is_keyed_on_its_validators(tmp_path, monkeypatch):
    """A remote .rec edited on the server (new ETag / Last-Modified, same size, same .idx) is indexed again."""
    monkeypatch.setenv("FACEMARGIN_CACHE", str(tmp_path / "cache"))
    root = write_face_set(tmp_path / "www" / "s", LABELS)
    with RangeServer(tmp_path / "www") as server:
        url = server.url + "s"
        assert FaceRecordSet(url).read(5)[0] == 0
        st = (root / "train.rec").stat()
        move_last_image_of_identity_0(root)
        os.utime(root / "train.rec", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the server's validators change
        again = FaceRecordSet(url)
        assert again.read(5)[0] == 1
        assert again.labels().tolist() == [0] * 4 + [1] * 6 + [2] * 5


# --------------------------------------------------------------------------- deleted .idx lines
def im2rec_set(root: Path, n: int = 6) -> Path:
    return write_face_set(root, [k % 3 for k in range(n)], layout="im2rec")


def delete_idx_line(root: Path, key: int) -> None:
    lines = (root / "train.idx").read_text().splitlines(keepends=True)
    (root / "train.idx").write_text("".join(line for line in lines if int(line.split()[0]) != key))


def test_a_deleted_idx_line_is_an_error_where_the_record_before_it_is_read(tmp_path):
    root = im2rec_set(tmp_path / "s")
    delete_idx_line(root, 3)
    fs = FaceRecordSet(root)  # opening reads no image record: the gap shows when the record before it is read
    assert len(fs) == 5 and fs.index.keys.tolist() == [0, 1, 2, 4, 5]
    gap = (r"train\.rec at offset \d+ \(key 2\): the record ends at offset (\d+), but the next indexed record at "
           r"offset \d+ is \d+ bytes further: those bytes are in no \.idx line")
    with pytest.raises(RecordIOError, match=gap):
        fs.parse(2, fs.read_raw(2))  # the training path (fast path of parse)
    with pytest.raises(RecordIOError, match=gap):
        fs.read(2)
    with pytest.raises(RecordIOError, match=r"the record at offset \d+ \(after key 2 at offset \d+, before key 4 at "
                       r"offset \d+\) is in no \.idx line"):
        fs.labels()
    assert fs.parse(1, fs.read_raw(1))[0] == 1 and fs.parse(3, fs.read_raw(3))[0] == 1  # the others read
    info = inspect_dir(root, decode=5)
    assert not info["ok"]
    assert any("is in no .idx line" in p and "after key 2" in p for p in info["problems"])
    assert any("(key 2): the record ends at offset" in p for p in info["problems"])  # --decode reads it too


def test_a_deleted_last_idx_line_leaves_bytes_up_to_the_end_of_the_file(tmp_path):
    root = im2rec_set(tmp_path / "s")
    delete_idx_line(root, 5)
    fs = FaceRecordSet(root)
    with pytest.raises(RecordIOError, match=r"\(key 4\): the record ends at offset \d+, but the end of the file is \d+ "
                       r"bytes further"):
        fs.parse(4, fs.read_raw(4))
    info = inspect_dir(root)
    assert not info["ok"] and any("(after key 4 at offset" in p and "no .idx line" in p for p in info["problems"])


def test_a_multi_part_record_before_a_deleted_line_is_caught_too(tmp_path):
    """The slow path (a record split at a magic number) checks the span as the fast path does."""
    root = tmp_path / "s"
    root.mkdir()
    magic = struct.pack("<I", 0xCED7230A)
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        for key in range(4):
            w.write(key, pack_record(IRHeader(0, float(key % 2), key, 0), b"ab" + b"\0\0" + magic + b"xyzw"))
    (root / "property").write_text("2,8,8")
    delete_idx_line(root, 2)
    fs = FaceRecordSet(root)
    with pytest.raises(RecordIOError, match=r"\(key 1\): the record ends at offset \d+, but the next indexed record"):
        fs.parse(1, fs.read_raw(1))
    assert fs.read(3) == (1, b"ab\0\0" + magic + b"xyzw")
    delete_idx_line(root, 1)  # record 0 is read at open (is it a meta record?): the gap is found there
    with pytest.raises(RecordIOError, match=r"\(key 0\): the record ends at offset \d+, but the next indexed record"):
        FaceRecordSet(root)


def test_a_subset_index_declared_as_such_leaves_records_out_on_purpose(tmp_path):
    """facemargin.clean writes an index of the kept records over the same .rec, and says so in train.idx.subset."""
    root = im2rec_set(tmp_path / "s", 9)
    for key in (0, 3, 4, 8):
        delete_idx_line(root, key)
    with pytest.raises(RecordIOError, match=r"\(key 2\): the record ends at offset"):
        FaceRecordSet(root).read(2)
    (root / "train.idx.subset").write_text("train.idx lists 5 of the records of train.rec on purpose\n")
    fs = FaceRecordSet(root)
    assert fs.subset and [fs.parse(i, raw)[0] for i, raw in enumerate(fs.read_raws(np.arange(5)))] == [1, 2, 2, 0, 1]
    assert fs.read(2)[0] == 2 and fs.labels().tolist() == [1, 2, 2, 0, 1]
    assert inspect_dir(root, decode=5)["ok"]


def test_an_intact_set_reads_and_inspects_clean(tmp_path):
    root = im2rec_set(tmp_path / "s", 9)
    fs = FaceRecordSet(root)
    assert [fs.parse(i, raw)[0] for i, raw in enumerate(fs.read_raws(np.arange(9)))] == [k % 3 for k in range(9)]
    assert fs.labels().tolist() == [k % 3 for k in range(9)]
    assert inspect_dir(root, decode=9)["ok"]


# --------------------------------------------------------------------------- num_classes without property
def test_num_classes_stands_in_for_a_missing_property(tmp_path):
    from facemargin.data.module import FaceRecordDataModule

    root = write_face_set(tmp_path / "s", [0, 1, 2, 0, 1, 2, 3, 3], layout="im2rec")
    (root / "property").unlink()
    with pytest.raises(FileNotFoundError, match=r"property file not found: .*or pass num_classes= explicitly"):
        FaceRecordDataModule(root, val_sets=[])
    dm = FaceRecordDataModule(root, num_classes=6, batch_size=4, num_workers=0, val_sets=[])
    assert (dm.num_classes, dm.image_size) == (6, (16, 16))
    assert FaceRecordSet.peek(root, num_classes=6) == (6, (16, 16))
    dm.setup("fit")
    images, labels, index = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [[0, 1, 2, 0, 1, 2, 3, 3][i] for i in index.tolist()]
    (root / "property").write_text("4,16,16")
    assert FaceRecordSet.peek(root, num_classes=6) == (6, (16, 16))  # given wins over property, as in the constructor


# --------------------------------------------------------------------------- the cache
def test_implicit_keys_are_not_stored_and_the_cache_is_mapped(tmp_path):
    from facemargin.data.formats.stamped import load_stamped

    root = write_face_set(tmp_path / "s", LABELS)
    fs = FaceRecordSet(root)
    offsets, keys, first = load_stamped(root / "train.idx.facemargin.npy", fs._stamp, 7)[:3]
    assert fs.index.implicit_keys and keys.size == 0 and first.tolist() == [0]  # keys 0..18: not stored
    assert offsets.tolist() == fs.index.offsets.tolist() and len(offsets) == 19
    assert fs.index.positions(np.array([0, 18, 19, -1])).tolist() == [0, 18, -1, -1]
    assert fs.image_keys.tolist() == list(range(1, 16))


def test_lines_out_of_offset_order_and_explicit_keys(tmp_path):
    records = [(k, pack_record(IRHeader(0, float(k % 3), k, 0), bytes([k]) * (4 + k))) for k in (7, 3, 11, 5, 2)]
    root = tmp_path / "s"
    root.mkdir()
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        for key, payload in records:
            w.write(key, payload)
    (root / "property").write_text("3,8,8")
    lines = (root / "train.idx").read_text().splitlines(keepends=True)
    (root / "train.idx").write_text("".join(lines[::-1]))  # same entries, offsets descending
    for _ in range(2):  # built, then mapped from the cache
        fs = FaceRecordSet(root)
        assert not fs.index.implicit_keys and fs.index.keys.tolist() == [7, 3, 11, 5, 2]
        assert [fs.read(k) for k, _ in records] == [(k % 3, bytes([k]) * (4 + k)) for k, _ in records]


def test_one_process_builds_the_cache_while_the_others_wait(tmp_path, monkeypatch):
    import facemargin.data.sources.recordio as sources

    root = write_face_set(tmp_path / "s", LABELS)
    real, calls = sources.build_index, []

    def slow_build(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.3)  # long enough for every other opener to find no cache yet
        return real(*args, **kwargs)

    monkeypatch.setattr(sources, "build_index", slow_build)
    opened: list[FaceRecordSet] = []
    threads = [threading.Thread(target=lambda: opened.append(FaceRecordSet(SetFiles.at(root)))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(opened) == 3 and len(calls) == 1
    assert all(fs.read(7) == opened[0].read(7) for fs in opened)
