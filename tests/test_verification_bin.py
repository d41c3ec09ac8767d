"""insightface .bin reading (restricted unpickler) and writing."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from facemargin.data.verification import load_bin, write_bin

IMAGES = [b"\xff\xd8\xff\xe0first", b"second\x00\xff", b"", bytes(range(256))]


def test_round_trip_exact(tmp_path):
    path = write_bin(tmp_path / "v.bin", IMAGES, [True, False])
    images, issame = load_bin(path)
    assert images == IMAGES and all(type(im) is bytes for im in images)
    assert issame.dtype == np.bool_ and issame.tolist() == [True, False]


def test_written_file_is_protocol2_and_plain_pickle_compatible(tmp_path):
    path = write_bin(tmp_path / "v.bin", IMAGES, np.array([1, 0]))
    data = path.read_bytes()
    assert data[:2] == b"\x80\x02"
    assert pickle.loads(data) == (IMAGES, [True, False])  # what insightface's loader sees


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_reads_python3_pickles_of_any_protocol(tmp_path, protocol):
    path = tmp_path / "v.bin"
    path.write_bytes(pickle.dumps((IMAGES, [False, True]), protocol=protocol))
    images, issame = load_bin(path)
    assert images == IMAGES and issame.tolist() == [False, True]


@pytest.mark.parametrize("protocol", [2, 5])
def test_reads_bytearray_images(tmp_path, protocol):
    path = tmp_path / "v.bin"
    path.write_bytes(pickle.dumps(([bytearray(b"ab\xff"), b"cd"], (True,)), protocol=protocol))
    images, issame = load_bin(path)
    assert images == [b"ab\xff", b"cd"] and all(type(im) is bytes for im in images)
    assert issame.tolist() == [True]


def test_reads_python2_str_pickle(tmp_path):
    # What python2's pickle.dump((["ab\xff", "z"], [True]), f, protocol=2) writes: SHORT_BINSTRING
    data = (b"\x80\x02" b"]q\x00(U\x03ab\xffq\x01U\x01zq\x02e" b"]q\x03\x88a" b"\x86q\x04.")
    path = tmp_path / "py2.bin"
    path.write_bytes(data)
    images, issame = load_bin(path)
    assert images == [b"ab\xff", b"z"] and issame.tolist() == [True]


def test_reads_python2_protocol0_pickle(tmp_path):
    # python2 protocol 0: STRING opcodes and I01/I00 booleans
    data = b"((lp0\nS'ab'\np1\naS'c\\xff'\np2\na(lp3\nI01\natp4\n."
    path = tmp_path / "p0.bin"
    path.write_bytes(data)
    assert pickle.loads(data, encoding="bytes") == ([b"ab", b"c\xff"], [True])
    images, issame = load_bin(path)
    assert images == [b"ab", b"c\xff"] and issame.tolist() == [True]


class _Hostile:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_hostile_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(([_Hostile(f"touch {marker}"), b"x"], [True]), protocol=2)
    # the payload is live: plain pickle in a separate process runs it
    live = tmp_path / "live"
    live_payload = pickle.dumps(([_Hostile(f"touch {live}"), b"x"], [True]), protocol=2)
    subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=live_payload, check=True)
    assert live.exists()
    path = tmp_path / "evil.bin"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=r"evil\.bin: not a valid insightface verification \.bin: refused global (posix|os|nt)\.system"):
        load_bin(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "obj, msg",
    [
        (([np.frombuffer(b"ab", np.uint8), b"x"], [True]), r"refused global numpy"),
        (([b"a", b"b"], [np.bool_(True)]), r"refused global numpy"),
        ((["text", b"b"], [True]), r"image 0 is str, expected bytes"),
        (([b"a", b"b"], ["yes"]), r"issame\[0\] is 'yes', expected a bool"),
        (([b"a", b"b"], [2]), r"issame\[0\] is 2, expected a bool"),
        (([b"a", b"b", b"c"], [True, False]), r"3 images for 2 pairs \(expected 4\)"),
        ({"images": []}, r"expected a pair \(images, issame\), got dict"),
        (([b"a"], [True], 3), r"expected a pair"),
        ((b"ab", [True]), r"images and issame must be lists"),
        ((([b"a", b"b"]), [{1}]), r"refused global (__builtin__|builtins)\.set"),
    ],
)
def test_bad_contents_name_the_file(tmp_path, obj, msg):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(ValueError, match=r"bad\.bin: not a valid insightface verification \.bin: .*" + msg):
        load_bin(path)


def test_codecs_encode_only_latin1(tmp_path):
    # _codecs.encode('ab', 'utf-16') -- permitted name, refused arguments
    data = b"\x80\x02]q\x00(c_codecs\nencode\nq\x01X\x02\x00\x00\x00abX\x06\x00\x00\x00utf-16\x86R" \
           b"h\x01X\x01\x00\x00\x00bX\x06\x00\x00\x00latin1\x86Re]\x88a\x86."
    path = tmp_path / "codec.bin"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=r"codec\.bin: .*only allowed as encode\(str, 'latin1'\)"):
        load_bin(path)
    path.write_bytes(data.replace(b"\x06\x00\x00\x00utf-16", b"\x06\x00\x00\x00latin1"))
    assert load_bin(path)[0] == [b"ab", b"b"]


def test_truncated_and_garbage(tmp_path):
    good = pickle.dumps((IMAGES, [True, False]), protocol=2)
    path = tmp_path / "cut.bin"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"cut\.bin: not a valid insightface verification \.bin"):
        load_bin(path)
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match=r"cut\.bin: not a valid"):
        load_bin(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"verification file not found: .*nope\.bin"):
        load_bin(tmp_path / "nope.bin")


def test_write_bin_count_mismatch(tmp_path):
    with pytest.raises(ValueError, match=r"3 images for 1 pairs"):
        write_bin(tmp_path / "v.bin", IMAGES[:3], [True])
    assert not (tmp_path / "v.bin").exists()
