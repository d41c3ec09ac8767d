"""RecordIO payload packing, writer bytes, reader and its errors."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from facemargin.data.formats.recordio import (
    MAGIC,
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    pack_record,
    unpack_record,
)

M = struct.pack("<I", 0xCED7230A)


def lrec(cflag: int, length: int) -> bytes:
    return struct.pack("<I", (cflag << 29) | length)


def write_raw(tmp_path: Path, rec: bytes, idx: str) -> RecordIOReader:
    (tmp_path / "x.rec").write_bytes(rec)
    (tmp_path / "x.idx").write_text(idx)
    return RecordIOReader(tmp_path / "x.rec", tmp_path / "x.idx")


def write_records(tmp_path: Path, records: list[tuple[int, bytes]]) -> tuple[Path, Path]:
    rec, idx = tmp_path / "r.rec", tmp_path / "r.idx"
    with RecordIOWriter(rec, idx) as w:
        for key, payload in records:
            w.write(key, payload)
    return rec, idx


# --------------------------------------------------------------------------- pack / unpack
def test_magic_constant():
    assert MAGIC == 0xCED7230A
    assert struct.calcsize("<IfQQ") == 24


def test_pack_scalar_label_exact_bytes():
    payload = pack_record(IRHeader(0, 3.0, 7, 9), b"JPEG")
    assert payload == struct.pack("<IfQQ", 0, 3.0, 7, 9) + b"JPEG"
    header, label, image = unpack_record(payload)
    assert header == IRHeader(0, 3.0, 7, 9) and label == 3.0 and image == b"JPEG"


def test_pack_scalar_forces_flag_zero_like_mxnet():
    assert pack_record(IRHeader(5, 1.0, 0, 0), b"x")[:4] == struct.pack("<I", 0)


def test_pack_label_array_exact_bytes():
    payload = pack_record(IRHeader(0, 9.0, 1, 0), b"img", labels=[2.0, 5.5])
    assert payload == struct.pack("<IfQQ", 2, 0.0, 1, 0) + struct.pack("<ff", 2.0, 5.5) + b"img"
    header, labels, image = unpack_record(payload)
    assert header.flag == 2 and header.label == 0.0
    assert labels.dtype == np.float32 and labels.tolist() == [2.0, 5.5] and image == b"img"
    # MXNet style: a sequence in header.label is the label vector
    assert pack_record(IRHeader(0, [2.0, 5.5], 1, 0), b"img") == payload


def test_unpack_truncated_payloads():
    with pytest.raises(ValueError, match="truncated: 10 bytes"):
        unpack_record(b"\0" * 10)
    with pytest.raises(ValueError, match="flag=3 labels need 36 bytes"):
        unpack_record(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0" * 8)


def test_pack_empty_labels_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        pack_record(IRHeader(0, 0.0, 0, 0), b"", labels=[])


# --------------------------------------------------------------------------- writer bytes
def test_writer_splits_at_aligned_magic_only(tmp_path):
    payload = (
        b"\x01\x02\x03\x04"  # 0..3
        + M  # 4..7 aligned: split
        + b"efg" + M + b"h"  # 8..15, magic at 11 is unaligned: no split
        + M  # 16..19 aligned: split
        + b"tail!"  # 20..24, length 25
    )
    first = b"short"
    expected = (
        M + lrec(0, 5) + first + b"\0\0\0"  # record key 3 at offset 0
        + M + lrec(1, 4) + payload[0:4]  # record key 8 at offset 16
        + M + lrec(2, 8) + payload[8:16]
        + M + lrec(3, 5) + payload[20:25] + b"\0\0\0"
    )
    rec, idx = write_records(tmp_path, [(3, first), (8, payload)])
    assert rec.read_bytes() == expected
    assert idx.read_text() == "3\t0\n8\t16\n"
    reader = RecordIOReader(rec, idx)
    assert reader.read(8) == payload and reader.read(3) == first


def test_writer_magic_at_start_and_end(tmp_path):
    payload = M + b"abcd" + M  # splits at 0 and 8: empty first and last parts
    expected = M + lrec(1, 0) + M + lrec(2, 4) + b"abcd" + M + lrec(3, 0)
    rec, idx = write_records(tmp_path, [(0, payload)])
    assert rec.read_bytes() == expected
    assert RecordIOReader(rec, idx).read(0) == payload


def test_writer_magic_in_unaligned_tail_not_split(tmp_path):
    payload = b"ab" + M  # length 6: magic at 2 is unaligned
    rec, idx = write_records(tmp_path, [(1, payload)])
    assert rec.read_bytes() == M + lrec(0, 6) + payload + b"\0\0"


def test_writer_empty_payload(tmp_path):
    rec, idx = write_records(tmp_path, [(0, b"")])
    assert rec.read_bytes() == M + lrec(0, 0)
    assert RecordIOReader(rec, idx).read(0) == b""


def test_writer_rejects_huge_and_duplicate(tmp_path):
    huge = memoryview(np.zeros(1 << 29, dtype=np.uint8))  # lazily zeroed pages, never copied
    with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        with pytest.raises(ValueError, match="too large"):
            w.write(0, huge)
        w.write(1, b"x")
        with pytest.raises(ValueError, match="duplicate key 1"):
            w.write(1, b"y")
    assert (tmp_path / "a.idx").read_text() == "1\t0\n"


def test_round_trip_random_payloads(tmp_path):
    rng = np.random.default_rng(123)
    records = []
    for key in rng.permutation(300).tolist():
        n = int(rng.integers(0, 200))
        data = bytearray(rng.integers(0, 256, size=n, dtype=np.uint8).tobytes())
        for _ in range(int(rng.integers(0, 4))):  # inject magic numbers, aligned or not
            if n >= 4:
                pos = int(rng.integers(0, n - 3))
                data[pos:pos + 4] = M
        records.append((key, bytes(data)))
    rec, idx = write_records(tmp_path, records)
    reader = RecordIOReader(rec, idx)
    assert reader.keys == [k for k, _ in records]
    assert len(reader) == 300 and 5 in reader and 300 not in reader
    for key, payload in records:
        assert reader.read(key) == payload
        assert reader.read_at(reader.offset(key)) == payload
    scanned = list(reader.scan())
    assert [p for _, p in scanned] == [p for _, p in records]
    assert [o for o, _ in scanned] == [reader.offset(k) for k, _ in records]
    assert rec.stat().st_size % 4 == 0
    # a window of the file: records starting in [offset(k10), offset(k20))
    k10, k20 = records[10][0], records[20][0]
    window = list(reader.scan(reader.offset(k10), reader.offset(k20)))
    assert [p for _, p in window] == [p for _, p in records[10:20]]


# --------------------------------------------------------------------------- index parsing
def test_idx_tolerates_spaces_crlf_and_blank_lines(tmp_path):
    rec = M + lrec(0, 4) + b"aaaa" + M + lrec(0, 4) + b"bbbb"
    reader = write_raw(tmp_path, rec, "7 0\r\n\r\n2\t12\r\n")
    assert reader.keys == [7, 2]
    assert reader.read(2) == b"bbbb" and reader.read(7) == b"aaaa"


@pytest.mark.parametrize(
    "idx, msg",
    [
        ("0\t0\n1\tabc\n", r"line 2 is not 'key<TAB>offset' \(unexpected 'a'\): '1\\tabc'"),
        ("0\t0\n1\t\n2\t8\n", r"line 2 is not 'key<TAB>offset' \(1 fields\)"),  # empty field: no mis-pairing
        ("0\t0\n\t8\n", r"line 2 is not 'key<TAB>offset' \(1 fields\)"),
        ("0\t0\n1 2 3\n", r"line 2 is not 'key<TAB>offset' \(3 fields\)"),
        ("0\t-8\n", r"line 1 is not 'key<TAB>offset' \(unexpected '-'\)"),
        ("0\t0\n1\t99999999999999999999\n", r"line 2 has a number of more than 18 digits"),
        ("", r"the index is empty"),
        ("\n \n", r"the index is empty"),
        ("0\t0\n0\t8\n", r"key 0 appears more than once"),
        ("0\t0\n1\t0\n", r"keys 0 and 1 both point at offset 0 \(one record would be read twice\)"),
        ("0\t0\n1\t4096\n", r"key 1 -> offset 4096 is past the end of .*x\.rec \(16 bytes\)"),
        ("0\t0\n1\t6\n", r"key 1 -> offset 6 is not a multiple of 4"),
    ],
)
def test_idx_defects_name_file_and_line_or_key(tmp_path, idx, msg):
    with pytest.raises(RecordIOError, match=r"x\.idx: " + msg):
        write_raw(tmp_path, M + lrec(0, 8) + b"abcdefgh", idx)


def _idx_by_lines(text: bytes) -> tuple[list[int], list[int]]:
    """The reference reading of an .idx: Python's int() per field, line by line."""
    pairs = [line.split() for line in text.splitlines() if line.strip()]
    assert all(len(p) == 2 for p in pairs)
    return [int(k) for k, _ in pairs], [int(o) for _, o in pairs]


@pytest.mark.parametrize("seed", range(4))
def test_idx_parser_agrees_with_int_per_field_in_any_layout_and_chunking(seed, monkeypatch):
    """Runs of equal-length lines take the vectorised path, anything else the general one; both, and the
    seams between them and between chunks, read exactly what int() reads."""
    import facemargin.data.formats.idxtext as idxtext

    rng = np.random.default_rng(seed)
    for trial in range(40):
        n = int(rng.integers(1, 2500))
        digits = int(rng.integers(1, 19))
        keys = np.sort(rng.integers(0, 10 ** min(digits, 18), n)) if trial % 2 else rng.integers(0, 10 ** 18, n)
        offsets = rng.integers(0, 10 ** int(rng.integers(1, 19)), n)
        lines = [b"%d\t%d\n" % (k, o) for k, o in zip(keys.tolist(), offsets.tolist())]
        for i in rng.integers(0, n, int(rng.integers(0, 4))).tolist():  # odd lines among regular ones
            odd = rng.choice([b"  %d \t %d\r\n", b"%d %d\n", b"\n%d\t%d\n", b"00%d\t0%d\n"])  # leading zeros: <= 18 digits
            lines[i] = odd % (keys[i] % 10 ** 15, offsets[i] % 10 ** 15)
        text = b"".join(lines)[: None if trial % 5 else -1]  # sometimes no final newline
        monkeypatch.setattr(idxtext, "_CHUNK", int(rng.integers(48, 4096)) if trial % 3 else 8 << 20)
        k, o = idxtext.parse_idx(text, "x.idx")
        want_k, want_o = _idx_by_lines(text)
        assert k.tolist() == want_k and o.tolist() == want_o, trial


def test_idx_defects_are_named_by_line_across_chunks(monkeypatch):
    import facemargin.data.formats.idxtext as idxtext

    rng = np.random.default_rng(7)
    bad_lines = [b"%d\tx%d\n", b"%d\t\n", b"1 2 3\n", b"%d\t-8\n", b"%d\t1234567890123456789\n"]
    for trial in range(30):
        n = int(rng.integers(50, 3000))
        lines = [b"%d\t%d\n" % (i, 8 * i) for i in range(n)]
        bad = int(rng.integers(0, n))
        lines[bad] = bad_lines[trial % len(bad_lines)].replace(b"%d", b"%d" % bad)
        monkeypatch.setattr(idxtext, "_CHUNK", int(rng.integers(64, 5000)))
        with pytest.raises(RecordIOError, match=rf"^x\.idx: line {bad + 1} "):
            idxtext.parse_idx(b"".join(lines), "x.idx")


# --------------------------------------------------------------------------- reader errors
def test_missing_idx_and_rec(tmp_path):
    (tmp_path / "x.rec").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"index not found: .*x\.idx"):
        RecordIOReader(tmp_path / "x.rec", tmp_path / "x.idx")
    with pytest.raises(FileNotFoundError, match=r"file not found: .*y\.rec"):
        RecordIOReader(tmp_path / "y.rec", tmp_path / "x.rec")


def test_key_absent(tmp_path):
    reader = write_raw(tmp_path, M + lrec(0, 0), "0\t0\n")
    with pytest.raises(KeyError, match=r"key 42 is not in the index .*x\.idx"):
        reader.read(42)


def test_bad_magic_names_file_key_offset(tmp_path):
    rec = M + lrec(0, 8) + b"abcdefgh"
    reader = write_raw(tmp_path, rec, "0\t0\n1\t4\n")
    with pytest.raises(RecordIOError, match=r"x\.rec at offset 4 \(key 1\): bad magic 0x00000008"):
        reader.read(1)


def test_truncated_record_names_file_key_offset(tmp_path):
    rec = M + lrec(0, 4) + b"abcd" + M + lrec(0, 40) + b"short"
    reader = write_raw(tmp_path, rec, "0\t0\n1\t12\n")
    assert reader.read(0) == b"abcd"
    with pytest.raises(RecordIOError, match=r"x\.rec at offset 12 \(key 1\): truncated record: .*needs 40 bytes"):
        reader.read(1)
    reader2 = write_raw(tmp_path, M + lrec(0, 4) + b"abcd" + M[:3], "0\t0\n1\t12\n")
    with pytest.raises(RecordIOError, match=r"offset 12 \(key 1\): truncated record \(part header"):
        reader2.read(1)


def test_truncated_multipart_record(tmp_path):
    rec = M + lrec(1, 4) + b"abcd"  # first part, continuation missing
    reader = write_raw(tmp_path, rec, "5\t0\n")
    with pytest.raises(RecordIOError, match=r"x\.rec at offset 0 \(key 5\): truncated record"):
        reader.read(5)


def test_offset_past_end(tmp_path):
    reader = write_raw(tmp_path, M + lrec(0, 4) + b"abcd", "0\t0\n")
    with pytest.raises(RecordIOError, match=r"x\.rec at offset 4096: offset is past the end of the file \(12 bytes\)"):
        reader.read_at(4096)
    with pytest.raises(RecordIOError, match=r"offset 4096"):
        list(reader.scan(4096))


def test_index_pointing_inside_a_record(tmp_path):
    rec = M + lrec(0, 8) + b"abcdefgh" + M + lrec(0, 4) + b"ijkl"
    reader = write_raw(tmp_path, rec, "0\t0\n1\t8\n2\t16\n")  # key 1 points into key 0's payload
    with pytest.raises(RecordIOError, match=r"x\.rec at offset 0 \(key 0\): the record needs 16 bytes but the next "
                       r"indexed record starts 8 bytes after it"):
        reader.read(0)
    assert reader.read(2) == b"ijkl"


def test_one_pread_per_record(tmp_path):
    from facemargin.data.storage.local import LocalSource

    records = [(k, bytes([k]) * (10 + 7 * k)) for k in range(20)] + [(20, b"x" + M + b"yz" * 5)]
    rec, idx = write_records(tmp_path, records)

    class Counting(LocalSource):
        calls = 0

        def pread(self, n, offset):
            Counting.calls += 1
            return super().pread(n, offset)

    reader = RecordIOReader(rec, idx, source=Counting(rec))
    for key, payload in records[::-1]:
        before = Counting.calls
        assert reader.read(key) == payload and Counting.calls == before + 1


@pytest.mark.parametrize(
    "rec, msg",
    [
        (M + lrec(2, 4) + b"abcd", r"bad continuation flag 2 at offset 0 \(a record must start with flag 0 or 1\)"),
        (M + lrec(3, 0), r"bad continuation flag 3 at offset 0"),
        (M + lrec(1, 4) + b"abcd" + M + lrec(0, 4) + b"efgh", r"bad continuation flag 0 at offset 12 \(expected 2 or 3"),
        (M + lrec(1, 0) + M + lrec(1, 0), r"bad continuation flag 1 at offset 8"),
    ],
)
def test_bad_continuation_sequence(tmp_path, rec, msg):
    reader = write_raw(tmp_path, rec, "9\t0\n")
    with pytest.raises(RecordIOError, match=r"x\.rec at offset 0 \(key 9\): " + msg):
        reader.read(9)
    with pytest.raises(RecordIOError, match="bad continuation flag"):
        list(reader.scan())


def test_scan_reports_bad_magic_offset(tmp_path):
    rec = M + lrec(0, 4) + b"abcd" + b"JUNKJUNK"
    reader = write_raw(tmp_path, rec, "0\t0\n")
    it = reader.scan()
    assert next(it) == (0, b"abcd")
    with pytest.raises(RecordIOError, match=r"x\.rec at offset 12: bad magic"):
        next(it)


# --------------------------------------------------------------------------- processes
def test_pickle_drops_handle_and_reads(tmp_path):
    rec, idx = write_records(tmp_path, [(0, b"zero"), (1, b"one!" + M + b"more")])
    reader = RecordIOReader(rec, idx)
    assert reader.read(1) == b"one!" + M + b"more"  # opens the handle
    assert reader.source._fd is not None
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.source._fd is None
    assert clone.read(0) == b"zero" and clone.keys == [0, 1]


def test_handle_reopened_after_fork(tmp_path):
    rec, idx = write_records(tmp_path, [(0, b"parent"), (1, b"child-data")])
    reader = RecordIOReader(rec, idx)
    source = reader.source
    assert reader.read(0) == b"parent"
    parent_fd = source._fd
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must open its own descriptor
        try:
            data = reader.read(1)
            ok = source._fd != parent_fd or source._pid == os.getpid()
            os.write(w, data + (b"|reopened" if ok and source._pid == os.getpid() else b"|stale"))
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 100)
    os.waitpid(pid, 0)
    os.close(r)
    assert out == b"child-data|reopened"
    assert source._pid == os.getpid() and reader.read(0) == b"parent"
