"""A remote file replaced mid-read is refused whatever the server's validators; short bodies; servers without Range.

Real HTTP servers on 127.0.0.1: ``tests/range_http.py`` (validators and faults set per test) and the
standard library's ``http.server`` (no range requests, no ETag).
"""

from __future__ import annotations

import functools
import os
import struct
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from range_http import RangeServer

from facemargin.data.formats.recordio import IRHeader, RecordIOWriter, pack_record
from facemargin.data.loading.loader import BatchReader, PlanSampler, TrainLoader
from facemargin.data.loading.plan import PlanSpec
from facemargin.data.sources.recordio import FaceRecordSet
from facemargin.data.storage.cache import cached_copy
from facemargin.data.storage.fsspec_source import FsspecSource
from facemargin.data.storage.remote import RemoteFileChangedError, RemoteReadError, RetryPolicy
from facemargin.data.storage.source import open_source
from facemargin.errors import UserError

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.02)

#: server validators -> what the error must say changed
MODES = {
    "strong ETag, If-Match honoured": ({}, r"its ETag is no longer \"[0-9a-f-]+\": HTTP 412"),
    "strong ETag, If-Match ignored": ({"if_match": False}, r"ETag '\"[0-9a-f-]+\"' -> '\"[0-9a-f-]+\"'"),
    "weak ETag": ({"etag": "weak"}, r"ETag 'W/\"[0-9a-f-]+\"' -> 'W/\"[0-9a-f-]+\"'"),
    "Last-Modified only": ({"etag": None}, r"Last-Modified '[^']+' -> '[^']+'"),
    "no validators: the size": ({"etag": None, "last_modified": False}, r"size '300000' -> '300008'"),
}


def _replace(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` at once (a rename), its mtime 10 s after the last one (Last-Modified
    has 1-second resolution)."""
    later = max(time.time_ns(), path.stat().st_mtime_ns if path.exists() else 0) + 10 * 10**9
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.utime(tmp, ns=(later, later))
    os.replace(tmp, path)


@pytest.mark.parametrize("mode", list(MODES))
def test_a_replaced_file_is_refused_by_every_kind_of_read(served, mode: str) -> None:
    server, data = served
    settings, changed = MODES[mode]
    for key, value in settings.items():
        setattr(server, key, value)
    url = server.url + "data.bin"
    newer = data[::-1] + (b"\0" * 8 if "size" in mode else b"")
    for read in (lambda s: s.pread(100, 5000), lambda s: s.pread_many([(10, 0), (10, 200_000)]),
                 lambda s: b"".join(s.iter_range(1000, 200_000, 65_536))):
        _replace(server.root / "data.bin", data)
        src = open_source(url, retry=FAST, concurrency=2)
        assert src.pread(4, 0) == data[:4]
        _replace(server.root / "data.bin", newer)
        with pytest.raises(RemoteFileChangedError, match=rf"^{url}: the file changed since it was opened \({changed}"):
            read(src)


def _im2rec_set(root: Path, count: int = 224, classes: int = 8) -> list[int]:
    """An im2rec set of ``count`` 16 x 16 JPEGs (labels ``key % classes``) with a property file."""
    root.mkdir(parents=True)
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        for key in range(count):
            img = np.full((16, 16, 3), 10 * (key % classes), np.uint8)
            w.write(key, pack_record(IRHeader(0, float(key % classes), key, 0), simplejpeg.encode_jpeg(img)))
    (root / "property").write_text(f"{classes},16,16")
    return [key % classes for key in range(count)]


def _relabelled(rec: bytes, offsets: list[int], classes: int) -> bytes:
    """The same records, every label moved to the next class (same offsets: the old index still fits)."""
    out = bytearray(rec)
    for off in offsets:
        (label,) = struct.unpack_from("<f", out, off + 12)  # magic, length, IRHeader flag, label
        struct.pack_into("<f", out, off + 12, float((int(label) + 1) % classes))
    return bytes(out)


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
@pytest.mark.parametrize("mode", ["strong ETag, If-Match ignored", "weak ETag", "Last-Modified only",
                                  "no validators: the size"])
def test_training_never_mixes_in_a_replaced_rec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str,
                                                streaming: bool) -> None:
    monkeypatch.setenv("FACEMARGIN_CACHE", str(tmp_path / "cache"))
    labels = _im2rec_set(tmp_path / "www" / "set")
    rec = tmp_path / "www" / "set" / "train.rec"
    offsets = [int(line.split("\t")[1]) for line in (rec.parent / "train.idx").read_text().splitlines()]
    newer = _relabelled(rec.read_bytes(), offsets, 8) + (b"\0" * 8 if "size" in mode else b"")
    with RangeServer(tmp_path / "www") as server:
        for key, value in MODES[mode][0].items():
            setattr(server, key, value)
        fs = FaceRecordSet(server.url + "set", remote={"retry": {"attempts": 2, "base_delay": 0.01}})
        spec = PlanSpec(seed=1, streaming=streaming, chunk=4, window=16)
        loader = TrainLoader(BatchReader(fs, seed=1, on_corrupt="skip"), PlanSampler(fs, 8, spec), num_workers=0)
        seen: list[tuple[int, int]] = []
        with pytest.raises(RemoteFileChangedError, match=rf"{server.url}set/train\.rec: the file changed since it was opened"):
            for k, (_, y, index) in enumerate(loader):
                seen += zip(index.tolist(), y.tolist())
                if k == 0:
                    _replace(rec, newer)
        assert 8 <= len(seen) <= 64 and all(labels[i] == y for i, y in seen)  # nothing of the new file
        assert loader.dataset.num_skipped == 0  # a changed file is not a damaged sample


def test_short_bodies_are_retried_then_named_with_url_and_offset(served) -> None:
    server, data = served
    url = server.url + "data.bin"
    server.cut_next, server.cut_after = 2, 0  # the size request's 1-byte body never comes (IncompleteRead)
    src = open_source(url, retry=FAST)
    assert src.size == len(data) and server.cut_next == 0
    server.cut_next, server.cut_after = 2, 700
    assert src.pread(5000, 100) == data[100:5100]
    assert b"".join(src.iter_range(0, 100_000, 30_000)) == data[:100_000]
    server.cut_next = 3
    assert b"".join(src.iter_range(0, 100_000, 30_000)) == data[:100_000]  # resumes each time

    server.cut_next = 100  # for good
    with pytest.raises(RemoteReadError, match=rf"^{url}: reading 5000 bytes at offset 100 failed 4 times .*"
                                              r"short body: it ended after 700 of 5000 bytes, at offset 800$"):
        src.pread(5000, 100)
    with pytest.raises(RemoteReadError, match=rf"^{url}: streaming bytes up to 100000 at offset 0 failed 4 times "
                                              r".*ended after 700 of 30000 bytes, at offset 700$"):
        b"".join(src.iter_range(0, 100_000, 30_000))
    server.cut_after = 0
    with pytest.raises(RemoteReadError, match=rf"^{url}: asking the size at offset 0 failed 4 times .*IncompleteRead") as info:
        open_source(url, retry=FAST).size
    assert isinstance(info.value, UserError)


class _PlainServer:
    """Python's own ``http.server`` (no Range, no ETag: 200 with the whole file), recording each GET."""

    def __init__(self, root: Path) -> None:
        self.gets: list[str | None] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.gets.append(self.headers.get("Range"))
                super().do_GET()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def __enter__(self) -> "_PlainServer":
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_server_without_range_requests_streams_with_one_get_and_refuses_random_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEMARGIN_CACHE", str(tmp_path / "cache"))
    data = np.random.default_rng(1).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "data.bin").write_bytes(data)
    _im2rec_set(tmp_path / "www" / "set", count=40)
    with _PlainServer(tmp_path / "www") as server:
        url = server.url + "data.bin"
        src = open_source(url, retry=FAST)
        assert src.size == len(data)
        before = len(server.gets)
        assert b"".join(src.iter_range(0, len(data), 65_536)) == data
        assert b"".join(src.iter_range(123_456, 250_000, 65_536)) == data[123_456:250_000]
        assert len(server.gets) - before == 2  # one sequential GET per stream
        assert src.ranges is False and set(src.validators) == {"Last-Modified", "size"}
        assert cached_copy(url, retry=FAST).read_bytes() == data
        assert src.pread(10, 0) == data[:10]
        with pytest.raises(RemoteReadError, match=rf"^{url}: the server does not support range requests .* "
                                                  r"at offset 10; random access .* needs them"):
            src.pread(10, 10)
        with pytest.raises(RemoteReadError, match=r"set/train\.rec: the server does not support range requests"):
            FaceRecordSet(server.url + "set", remote={"retry": {"attempts": 2, "base_delay": 0.01}})


def test_fsspec_sources_confirm_the_version_after_each_read(served, tmp_path: Path) -> None:
    server, data = served
    path = tmp_path / "local.bin"
    _replace(path, data)
    sources = [open_source(path.as_uri(), readahead=1)]  # fsspec's local back-end: mtime and size
    try:
        import aiohttp  # noqa: F401

        sources.append(FsspecSource(server.url + "data.bin", retry=FAST, readahead=1))  # fsspec's HTTP back-end: ETag
    except ImportError:
        pass
    for src in sources:
        assert isinstance(src, FsspecSource) and src.pread(8, 0) == data[:8]
        stream = src.iter_range(0, 300_000, 25_000)  # 12 blocks, at most 2 read ahead
        assert next(stream) == data[:25_000]
        for p in (path, server.root / "data.bin"):
            _replace(p, data[::-1])
        with pytest.raises(RemoteFileChangedError, match=rf"^{src.name}: the file changed since it was opened \((mtime|ETag) "):
            b"".join(stream)
        with pytest.raises(RemoteFileChangedError):
            src.pread_many([(4, 0), (4, 8)])
        for p in (path, server.root / "data.bin"):
            _replace(p, data)
