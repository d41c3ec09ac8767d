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

from facemargin.data.formats.faceset import read_property
from facemargin.data.formats.recordio import IRHeader, RecordIOError, RecordIOWriter, pack_record
from facemargin.data.sources.recordio import FaceRecordSet


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


def _im2rec(root: Path, labels: list[int]) -> Path:
    return write_set(root, [(k, pack_record(IRHeader(0, float(lab), k, 0), tiny_jpeg(k))) for k, lab in enumerate(labels)])


def test_insightface_labels_come_from_identity_ranges(tiny_recdir):
    fs = FaceRecordSet(tiny_recdir)
    assert fs.labels().tolist() == TINY_LABELS and not fs.labels_cache_path.exists()


def test_labels_cache_written_reused_and_invalidated(tmp_path):
    root = _im2rec(tmp_path / "s", [0, 1, 2, 0, 1, 2])
    fs = FaceRecordSet(root)
    cache = fs.labels_cache_path
    assert cache == root / "train.idx.labels.npy" and not cache.exists()
    assert fs.labels().tolist() == [0, 1, 2, 0, 1, 2] and cache.is_file()
    doctored = np.load(cache)
    doctored[-6:] = 2  # a fresh instance reads the cache: prove it by doctoring the cached labels
    np.save(cache, doctored)
    assert FaceRecordSet(root).labels().tolist() == [2] * 6
    st = (root / "train.idx").stat()
    os.utime(root / "train.idx", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: re-read
    assert FaceRecordSet(root).labels().tolist() == [0, 1, 2, 0, 1, 2]


def test_caches_do_not_survive_an_mtime_preserving_replace(tmp_path):
    """cp -p / rsync -t keep size and mtime: the caches must still notice the new files."""
    root = _im2rec(tmp_path / "a", [0, 1, 2, 0, 1, 2])
    other = _im2rec(tmp_path / "b", [2, 2, 1, 1, 0, 0])  # same sizes, other labels
    assert FaceRecordSet(root).labels().tolist() == [0, 1, 2, 0, 1, 2]
    stats = {n: (root / n).stat() for n in ("train.rec", "train.idx")}
    for name, st in stats.items():
        shutil.copy2(other / name, root / name)  # cp -p
        os.utime(root / name, ns=(st.st_atime_ns, st.st_mtime_ns))  # rsync -t: the old mtime
        assert (root / name).stat().st_size == st.st_size and (root / name).stat().st_mtime_ns == st.st_mtime_ns
    assert FaceRecordSet(root).labels().tolist() == [2, 2, 1, 1, 0, 0]


def _mapped(array: np.ndarray) -> bool:
    """Whether ``array`` views a memory-mapped file (not a private copy)."""
    import mmap

    base = array
    while base is not None and not isinstance(base, (np.memmap, mmap.mmap)):
        base = getattr(base, "base", None)
    return base is not None


def test_index_cache_is_mapped_and_reused(tiny_recdir, monkeypatch):
    fs = FaceRecordSet(tiny_recdir)
    cache = tiny_recdir / "train.idx.facemargin.npy"
    assert cache.is_file() and _mapped(fs.index.offsets)
    import facemargin.data.sources.recordio as faceset

    monkeypatch.setattr(faceset, "build_index", None)  # a second open must not parse the text again
    again = FaceRecordSet(tiny_recdir)
    assert again.read(3) == (0, tiny_jpeg(3)) and _mapped(again.index.offsets)
    clone = pickle.loads(pickle.dumps(again))  # DataLoader workers map the cache instead of copying it
    assert len(pickle.dumps(again)) < 4000 and _mapped(clone.index.offsets)
    assert clone.read(5) == (1, tiny_jpeg(5)) and clone.image_keys.tolist() == fs.image_keys.tolist()


def test_caches_kept_in_memory_when_they_cannot_be_written(tmp_path):
    root = _im2rec(tmp_path / "s", [0, 1, 2])
    (root / "train.idx.labels.npy").mkdir()  # os.replace onto a directory fails
    (root / "train.idx.facemargin.npy").mkdir()
    fs = FaceRecordSet(root)
    assert fs.labels().tolist() == [0, 1, 2] and fs.labels() is fs.labels()
    assert len(pickle.loads(pickle.dumps(fs)).labels()) == 3


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_caches_under_facemargin_cache(tmp_path, monkeypatch):
    root = _im2rec(tmp_path / "s", [0, 1, 2])
    monkeypatch.setenv("FACEMARGIN_CACHE", str(tmp_path / "cache"))
    os.chmod(root, 0o555)
    try:
        assert FaceRecordSet(root).labels().tolist() == [0, 1, 2]
        assert sorted(p.name for p in root.iterdir()) == ["property", "train.idx", "train.rec"]
        assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2
    finally:
        os.chmod(root, 0o755)


# --------------------------------------------------------------------------- bad input
def test_missing_property_names_path(tiny_recdir):
    (tiny_recdir / "property").unlink()
    with pytest.raises(FileNotFoundError, match=r"property file not found: .*tinyset/property"):
        FaceRecordSet(tiny_recdir)
    fs = FaceRecordSet(tiny_recdir, num_classes=3)  # explicit class count: size from the first image
    assert fs.num_classes == 3 and fs.image_size == (8, 8)


def test_num_classes_below_the_identity_count(tiny_recdir):
    with pytest.raises(RecordIOError, match=r"num_classes=2 \(given\), but the meta record of .*train\.rec lists 3 identities"):
        FaceRecordSet(tiny_recdir, num_classes=2)
    FaceRecordSet(tiny_recdir)  # the index cache now exists: the check must not depend on building it
    with pytest.raises(RecordIOError, match=r"num_classes=2 \(given\), but the meta record"):
        FaceRecordSet(tiny_recdir, num_classes=2)
    (tiny_recdir / "property").write_text("2,8,8")
    with pytest.raises(RecordIOError, match=r"property: 2 classes, but the meta record of .*train\.rec lists 3 identities"):
        FaceRecordSet(tiny_recdir)


@pytest.mark.parametrize(
    "text, msg",
    [
        ("abc,112", r"expected 'num_classes,height,width'"),
        ("1e20,112,112", r"expected 'num_classes,height,width'"),
        ("100000000000000000000,112,112", r"expected 'num_classes,height,width'"),
        ("20000000,112,112", r"20000000 classes is more than float32 labels can hold exactly \(16777216\)"),
        ("10,112,65500", r"image size 65500x112 is larger than 16384"),
        ("0,112,112", r"expected 'num_classes,height,width' with positive integers"),
    ],
)
def test_bad_property_contents(tmp_path, text, msg):
    (tmp_path / "property").write_text(text)
    with pytest.raises(ValueError, match=r"property: " + msg):
        read_property(tmp_path / "property")


def test_good_property(tmp_path):
    (tmp_path / "property").write_text("10,112,96\n")
    assert read_property(tmp_path / "property") == (10, 112, 96)


def test_missing_idx_names_path(tiny_recdir):
    (tiny_recdir / "train.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"index not found: .*tinyset/train\.idx"):
        FaceRecordSet(tiny_recdir)


def test_label_out_of_range_names_file_and_key(tmp_path):
    records = [(k, pack_record(IRHeader(0, float(lab), k, 0), tiny_jpeg(k))) for k, lab in enumerate([0, 7])]
    fs = FaceRecordSet(write_set(tmp_path / "s", records))
    assert fs.read(0)[0] == 0
    with pytest.raises(RecordIOError, match=r"s/train\.rec at offset \d+ \(key 1\): label 7 is outside \[0, 3\)"):
        fs.read(1)
    with pytest.raises(RecordIOError, match=r"\(key 1\): label 7 is outside"):
        fs.labels()


def test_bit_flipped_label_is_caught_by_the_identity_ranges(tiny_recdir):
    """A flipped float32 bit that lands on another valid class fails naming the key and its identity."""
    fs = FaceRecordSet(tiny_recdir)
    off = fs.reader.offset(2)  # key 2: identity 0 (keys 1..3)
    data = bytearray((tiny_recdir / "train.rec").read_bytes())
    label_at = off + 8 + 4  # magic, lrecord, then the IRHeader: flag (4 bytes), label (float32)
    assert struct.unpack_from("<f", data, label_at)[0] == 0.0
    struct.pack_into("<f", data, label_at, 2.0)  # 0.0 -> 2.0: sign/exponent bits flipped, class 2 exists
    (tiny_recdir / "train.rec").write_bytes(bytes(data))
    fs = FaceRecordSet(tiny_recdir)
    with pytest.raises(RecordIOError, match=r"\(key 2\): label 2 does not match the identity ranges of the meta "
                       r"record: key 2 belongs to identity 0 \(keys 1\.\.3\); the stored label is damaged"):
        fs.read(2)
    assert fs.read(1)[0] == 0


def test_negative_and_fractional_labels(tmp_path):
    records = [(0, pack_record(IRHeader(0, -1.0, 0, 0), tiny_jpeg(0))),
               (1, pack_record(IRHeader(0, 1.5, 1, 0), tiny_jpeg(1)))]
    fs = FaceRecordSet(write_set(tmp_path / "s", records))
    with pytest.raises(RecordIOError, match=r"\(key 0\): label -1 is outside"):
        fs.read(0)
    with pytest.raises(RecordIOError, match=r"\(key 1\): label 1.5 is not an integer"):
        fs.label(1)


def _meta_set(tmp_path, meta, images=3, ranges=((1, 3), (3, 4))):
    records = [(0, pack_record(IRHeader(0, 0.0, 0, 0), b"", labels=list(meta)))]
    records += [(k, pack_record(IRHeader(0, float(k > 2), k, 0), tiny_jpeg(k))) for k in range(1, images + 1)]
    first = images + 1
    records += [(first + c, pack_record(IRHeader(0, 0.0, first + c, 0), b"", labels=list(r))) for c, r in enumerate(ranges)]
    return write_set(tmp_path / "s", records, "2,8,8")


@pytest.mark.parametrize(
    "meta, images, ranges, msg",
    [
        ((1e9, 2e9), 3, ((1, 3), (3, 4)), r"\(key 0\): meta record lists 999999999 images and 1000000000 identities "
         r"\(keys 0\.\.1999999999\) but .*train\.idx has only 6 records"),
        ((3, 5), 3, ((1, 3), (3, 4)), r"train\.idx: 1 keys are not covered by the meta record \(key 0: images 1\.\.2, "
         r"identities 3\.\.4\), e\.g\. key 5; their images would be dropped silently"),
        ((4, 6), 3, ((1, 2), (3, 4)), r"\(key 4\): identity 0 claims image keys 1\.\.1; the identity ranges must split "
         r"keys 1\.\.3 in order"),
        ((4, 6), 3, ((1, 3), (3, 9)), r"identity 1 claims image keys 3\.\.8"),
        ((2.5, 6), 3, ((1, 3), (3, 4)), r"\(key 0\): meta label 2\.5 is not a valid key"),
    ],
)
def test_meta_record_defects(tmp_path, meta, images, ranges, msg):
    with pytest.raises(RecordIOError, match=msg):
        FaceRecordSet(_meta_set(tmp_path, meta, images, ranges))


def test_meta_record_image_key_absent(tmp_path):
    root = _meta_set(tmp_path, (4, 6))
    idx = root / "train.idx"
    idx.write_text(idx.read_text().replace("2\t", "7\t", 1))  # key 2's record indexed under key 7
    with pytest.raises(RecordIOError, match=r"train\.idx: meta record \(key 0\) lists image keys 1\.\.3, but key 2 is absent"):
        FaceRecordSet(root)


def test_truncated_rec_surfaces_key(tmp_path):
    root = _im2rec(tmp_path / "s", [0, 1, 2, 0, 1, 2, 0])
    rec = root / "train.rec"
    fs = FaceRecordSet(root)
    off6 = fs.reader.offset(6)
    rec.write_bytes(rec.read_bytes()[: off6 + 20])
    fresh = FaceRecordSet(root)
    with pytest.raises(RecordIOError, match=rf"train\.rec at offset {off6} \(key 6\): truncated record"):
        fresh.read(6)
    with pytest.raises(RecordIOError, match=r"offset \d+: truncated"):
        fresh.labels()
    rec.write_bytes(rec.read_bytes()[: off6 - 8])  # record 6 no longer starts inside the file
    with pytest.raises(RecordIOError, match=rf"train\.idx: key 6 -> offset {off6} is past the end of .*train\.rec"):
        FaceRecordSet(root)


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
