"""insightface .bin reading (restricted unpickler) and writing."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from facemargin.data.formats.verification import load_bin, write_bin

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
        (([b"a", b"b"], [np.bool_(True)]), r"refused global numpy\.(_)?core\.multiarray\.scalar"),
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


# --------------------------------------------------------------------------------------------
# insightface's real files: images as numpy uint8 arrays of encoded bytes
# --------------------------------------------------------------------------------------------


def _arrays(images, column: bool = False):
    return [np.frombuffer(im, np.uint8).reshape((-1, 1) if column else -1) for im in images]


@pytest.mark.parametrize("protocol", [2, 3, 4])
@pytest.mark.parametrize("column", [False, True])
def test_numpy_uint8_array_images_load(tmp_path, protocol, column):
    path = tmp_path / "small_lfw.bin"
    path.write_bytes(pickle.dumps((_arrays(IMAGES, column), [True, False]), protocol=protocol))
    images, issame = load_bin(path)
    assert images == IMAGES and all(type(im) is bytes for im in images)
    assert issame.tolist() == [True, False]


def test_python2_numpy_pickle_loads(tmp_path):
    # what python2 + numpy 1.x write for pickle.dump(([np.frombuffer('abc', np.uint8), 'z'], [True]), f, 2)
    data = (
        b"\x80\x02](cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85U\x01b\x87R"
        b"(K\x01K\x03\x85cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        b"\x89U\x03abctbU\x01ze]\x88a\x86."
    )
    path = tmp_path / "py2np.bin"
    path.write_bytes(data)
    images, issame = load_bin(path)
    assert images == [b"abc", b"z"] and issame.tolist() == [True]


def _numpy_global(module: str, name: str, args: bytes = b")") -> bytes:
    """A protocol-2 list holding ``module.name(*args)`` followed by a valid issame list."""
    return b"\x80\x02](c" + module.encode() + b"\n" + name.encode() + b"\n" + args + b"RU\x01ze]\x88a\x86."


@pytest.mark.parametrize(
    "data, msg",
    [
        (pickle.dumps((_arrays([b"ab", b"cd"]), [True]), protocol=5), r"refused global numpy\._core\.numeric\._frombuffer"),
        (_numpy_global("numpy", "frombuffer", b"U\x02ab\x85"), r"refused global numpy\.frombuffer"),
        (_numpy_global("numpy", "load", b"U\x01x\x85"), r"refused global numpy\.load"),
        (_numpy_global("numpy.core.multiarray", "scalar", b")"), r"refused global numpy\.core\.multiarray\.scalar"),
        (_numpy_global("numpy.testing", "assert_", b")"), r"refused global numpy\.testing\.assert_"),
        (pickle.dumps(([np.frombuffer(b"abcd", np.float32), b"x"], [True]), 2), r"numpy\.dtype\('f4'.* only uint8"),
        (pickle.dumps(([np.array([b"a", b"b"], dtype=object), b"x"], [True]), 2), r"numpy\.dtype\('O8'.* only uint8"),
        (pickle.dumps(([np.zeros((2, 3), np.uint8), b"x"], [True]), 2), r"shape \(2, 3\) refused: only 1-D or \(n, 1\)"),
        (pickle.dumps(([np.zeros((1, 2, 3), np.uint8), b"x"], [True]), 3), r"shape \(1, 2, 3\) refused"),
        (pickle.dumps(([np.frombuffer(b"ab", ">u2"), b"x"], [True]), 2), r"numpy\.dtype\('u2'.* only uint8"),
    ],
    ids=["protocol5-frombuffer", "frombuffer", "load", "scalar", "testing", "float", "object", "2d", "3d", "uint16"],
)
def test_other_numpy_content_is_refused(tmp_path, data, msg):
    path = tmp_path / "np.bin"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=r"np\.bin: not a valid insightface verification \.bin: .*" + msg):
        load_bin(path)


def test_numpy_stand_ins_check_their_arguments(tmp_path):
    # a uint8 dtype whose state claims a big-endian 2-byte layout; an array whose data is too short
    bad_state = pickle.dumps((_arrays([b"ab"]) + [b"x"], [True]), 2).replace(b"X\x01\x00\x00\x00|", b"X\x01\x00\x00\x00>")
    short = pickle.dumps((_arrays([b"abc"]) + [b"x"], [True]), 3).replace(b"K\x03\x85", b"K\x09\x85", 1)
    ndarray_arg = pickle.dumps((_arrays([b"ab"]) + [b"x"], [True]), 3).replace(b"K\x00\x85", b"K\x05\x85", 1)
    for data, msg in [
        (bad_state, r"dtype state .* is not plain uint8"),
        (short, r"numpy array data is not 9 raw bytes"),
        (ndarray_arg, r"only allowed as _reconstruct\(ndarray, \(0,\), b'b'\)"),
    ]:
        path = tmp_path / "stand_in.bin"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=r"stand_in\.bin: .*" + msg):
            load_bin(path)


class _Eval:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


def test_eval_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "eval.bin"
    path.write_bytes(pickle.dumps(([_Eval(f"open({str(marker)!r}, 'w')"), b"x"], [True]), protocol=2))
    with pytest.raises(ValueError, match=r"eval\.bin: .*refused global (__builtin__|builtins)\.eval"):
        load_bin(path)
    assert not marker.exists()


def _peak_mib(fn) -> float:
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            fn()
        return tracemalloc.get_traced_memory()[1] / 2**20, str(info.value)
    finally:
        tracemalloc.stop()


def test_memo_references_are_shared_not_copied_and_rebuilt_copies_are_refused(tmp_path):
    big = bytearray(b"\xff\xd8\xff" + bytes(2**20))
    # 1: the list references one bytearray 20 000 times: one object in memory, 20 000 references
    shared = tmp_path / "shared.bin"
    shared.write_bytes(pickle.dumps(([big] * 20000, [True] * 10000), protocol=2))
    assert shared.stat().st_size < 2**20 + 2**17
    import tracemalloc

    tracemalloc.start()
    try:
        images, issame = load_bin(shared)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert len(images) == 20000 and images[0] == bytes(big) and all(im is images[0] for im in images)
    assert peak < 8, peak  # file (1 MiB) + its string + one bytes copy + pointers: not 20 GiB of copies
    # 2: each image is a *new* bytearray(...) built from one memoised string: refused while unpickling
    blob = b"B" + len(big).to_bytes(4, "little") + bytes(big) + b"q\x01"  # BINBYTES, memo 1
    call = b"cbuiltins\nbytearray\nh\x01\x85R"  # bytearray(memo[1])
    data = b"\x80\x03](" + blob + call * 19999 + b"e](" + b"\x88" * 10000 + b"e\x86."
    path = tmp_path / "rebuilt.bin"
    path.write_bytes(data)
    peak, msg = _peak_mib(lambda: load_bin(path))
    assert "rebuilt.bin" in msg and "more than twice the bytes the file holds" in msg
    assert peak < 16, peak


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("as_arrays", [False, True])
def test_a_deduplicating_writer_s_file_loads(tmp_path, protocol, as_arrays):
    """300 pairs over 216 distinct image objects: pickle's memo stores each once, then references it."""
    rng = np.random.default_rng(0)
    distinct = [_jpeg(16, 16) + bytes([k % 256, k // 256]) for k in range(216)]  # same header size, distinct bytes
    objects = _arrays(distinct) if as_arrays else distinct
    order = np.concatenate([np.arange(216), rng.integers(0, 216, size=600 - 216)])
    rng.shuffle(order)
    issame = (np.arange(300) % 2 == 0).tolist()
    path = tmp_path / "dedup.bin"
    path.write_bytes(pickle.dumps(([objects[k] for k in order], issame), protocol=protocol))
    total = sum(len(distinct[k]) for k in order)
    assert path.stat().st_size < total  # each image stored once: the references add up to more than the file
    plain = pickle.loads(path.read_bytes())  # what pickle itself reads
    images, got = load_bin(path)
    assert images == [bytes(im) for im in plain[0]] == [distinct[k] for k in order]
    assert got.tolist() == issame
    first = {}
    for k, im in zip(order, images):  # one object per distinct image, however often it is referenced
        assert first.setdefault(int(k), im) is im


def test_an_empty_file_and_a_huge_declared_size_name_the_file(tmp_path):
    import struct

    from facemargin.errors import UserError

    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.bin: not a valid insightface verification \.bin: the file is empty \(0 bytes\)$"):
        load_bin(empty)
    # BINBYTES8 / BINUNICODE8 / BYTEARRAY8 declaring 2**62 bytes: the C unpickler would try to allocate them
    for opcode, what in ((b"\x8e", "BINBYTES8"), (b"\x8d", "BINUNICODE8"), (b"\x96", "BYTEARRAY8")):
        huge = tmp_path / "huge.bin"
        huge.write_bytes(b"\x80\x04" + opcode + struct.pack("<Q", 2**62) + b"abc")
        with pytest.raises(UserError, match=rf"huge\.bin: not a valid insightface verification \.bin: byte 2: {what} "
                                            r"declares 4611686018427387904 bytes but only 3 follow in the 14-byte file"):
            load_bin(huge)


# --------------------------------------------------------------------------------------------
# image sizes read from headers
# --------------------------------------------------------------------------------------------


def _jpeg(h: int, w: int, **kw) -> bytes:
    import simplejpeg

    return simplejpeg.encode_jpeg(np.zeros((h, w, 3), np.uint8), **kw)


def _pil(h: int, w: int, fmt: str, **kw) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_encoded_image_size_reads_headers():
    from facemargin.data.formats.verification import encoded_image_size

    assert encoded_image_size(_jpeg(112, 96)) == (112, 96)
    assert encoded_image_size(_pil(50, 70, "JPEG", progressive=True, exif=b"Exif\x00\x00" + bytes(300))) == (50, 70)
    assert encoded_image_size(_pil(33, 17, "PNG")) == (33, 17)
    assert encoded_image_size(b"\xff\xd8\xffjunk") is None and encoded_image_size(b"") is None
    assert encoded_image_size(_pil(8, 8, "BMP")) is None


def test_images_of_different_sizes_are_refused_at_load(tmp_path):
    images = [_jpeg(112, 112), _jpeg(112, 112), _jpeg(112, 112), _pil(112, 96, "PNG")]
    path = write_bin(tmp_path / "mixed.bin", images, [True, False])
    with pytest.raises(ValueError, match=r"mixed\.bin: images differ in size: image 3 is 96x112 but image 0 is 112x112"):
        load_bin(path)
    path.write_bytes(pickle.dumps((_arrays(images[:2] + [_jpeg(100, 100), images[0]]), [True, False]), 3))
    with pytest.raises(ValueError, match=r"image 2 is 100x100 but image 0 is 112x112"):
        load_bin(path)


def test_write_bin_stores_repeated_images_in_full(tmp_path):
    im = _jpeg(16, 16)
    path = write_bin(tmp_path / "rep.bin", [im, im, im, im], [True, True])
    images, _ = load_bin(path)
    assert images == [im] * 4


def test_pairs_txt_lfw_and_generic_layouts(tmp_path):
    from facemargin.data.formats.verification import read_pairs_txt

    root = tmp_path / "lfw"
    for person, n in [("Ann_A", 2), ("Bob_B", 1)]:
        (root / person).mkdir(parents=True)
        for k in range(1, n + 1):
            (root / person / f"{person}_{k:04d}.jpg").write_bytes(_jpeg(8, 8))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\t2\nAnn_A\t1\t2\nAnn_A\t2\tBob_B\t1\n\nAnn_A/Ann_A_0001.jpg Bob_B/Bob_B_0001.jpg 0\n")
    paths, issame = read_pairs_txt(pairs, root)
    assert issame.tolist() == [True, False, False]
    assert [p.relative_to(root).as_posix() for p in paths] == [
        "Ann_A/Ann_A_0001.jpg", "Ann_A/Ann_A_0002.jpg", "Ann_A/Ann_A_0002.jpg", "Bob_B/Bob_B_0001.jpg",
        "Ann_A/Ann_A_0001.jpg", "Bob_B/Bob_B_0001.jpg",
    ]
    pairs.write_text("Ann_A\t1\t3\n")
    with pytest.raises(FileNotFoundError, match=r"pairs\.txt:1: image not found: .*Ann_A_0003\.jpg"):
        read_pairs_txt(pairs, root)
    pairs.write_text("Ann_A 1 2\nAnn_A x\n")
    with pytest.raises(ValueError, match=r"pairs\.txt:2: expected 'name i j'"):
        read_pairs_txt(pairs, root)
    with pytest.raises(FileNotFoundError, match=r"image folder not found"):
        read_pairs_txt(pairs, tmp_path / "nope")
