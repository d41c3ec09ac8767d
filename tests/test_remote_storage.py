"""Remote byte sources against a real HTTP server on 127.0.0.1 (tests/range_http.py, the `served` fixture): no mocks."""

from __future__ import annotations

import os
import pickle
import time

import pytest
import torch

from facemargin.data.storage.cache import cached_copy
from facemargin.data.storage.fsspec_source import FsspecSource
from facemargin.data.storage.http_source import HTTPSource
from facemargin.data.storage.local import LocalSource
from facemargin.data.storage.remote import RemoteReadError, RetryPolicy
from facemargin.data.storage.source import is_remote, open_source

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.02)


def test_is_remote_and_open_source_dispatch(tmp_path):
    assert is_remote("http://h/x") and is_remote("s3://b/k") and is_remote("gs://b/k")
    assert not is_remote(tmp_path / "x") and not is_remote("relative/x.rec") and not is_remote("/abs/x.rec")
    assert isinstance(open_source("http://127.0.0.1:9/x"), HTTPSource)
    with pytest.raises(TypeError, match="apply only to URLs"):
        open_source(tmp_path, retry=FAST)


def test_http_reads_are_byte_exact_and_streams_are_one_request(served, tmp_path):
    server, data = served
    url = server.url + "data.bin"
    src = open_source(url, retry=FAST)
    local = LocalSource(server.root / "data.bin")
    assert src.size == local.size == len(data) and src.name == url
    for n, off in [(1, 0), (4096, 12_345), (100, len(data) - 40), (10, len(data)), (0, 5)]:
        assert src.pread(n, off) == local.pread(n, off) == data[off:off + n]
    n_get = len(server.requests("/data.bin"))
    blocks = list(src.iter_range(1000, 250_001, 65_536))
    assert b"".join(blocks) == data[1000:250_001]
    assert [len(b) for b in blocks] == [65_536] * 3 + [249_001 - 3 * 65_536]  # full blocks but the last
    assert server.requests("/data.bin")[n_get:] == ["bytes=1000-250000"]  # one sequential request
    assert b"".join(src.iter_range(299_990, 10**9, 4)) == data[299_990:]  # end clamped to the size
    with pytest.raises(RemoteReadError, match=rf"{server.url}missing\.bin: HTTP 404 .* at offset 0"):
        open_source(server.url + "missing.bin", retry=FAST).size
    assert len(server.requests("/missing.bin")) == 1  # permanent errors are not retried


def test_pread_many_reads_concurrently_in_order(served):
    server, data = served
    reads = [(1000 + 7 * k, 31_000 * k) for k in range(9)] + [(50, len(data) - 20)]
    src = open_source(server.url + "data.bin", retry=FAST, concurrency=4)
    local = LocalSource(server.root / "data.bin")
    want = [data[o:o + n] for n, o in reads]
    server.latency = 0.05  # requests overlap only if they are in flight together
    assert src.pread_many(reads) == local.pread_many(reads) == want
    assert len(server.clients) >= 3  # several connections, one per reading thread
    assert open_source(server.url + "data.bin", concurrency=1).pread_many(reads[:2]) == want[:2]


def test_dropped_connections_and_5xx_are_retried(served):
    server, data = served
    src = open_source(server.url + "data.bin", retry=FAST)
    assert src.size == len(data)
    server.cut_next, server.cut_after = 2, 700  # the next two bodies are cut after 700 bytes
    assert src.pread(5000, 20_000) == data[20_000:25_000]
    assert server.requests("/data.bin")[-3:] == ["bytes=20000-24999"] * 3

    server.fail_next = 2
    assert src.pread(10, 7) == data[7:17]

    before = len(server.requests("/data.bin"))
    server.cut_next, server.cut_after = 1, 150_000  # a stream dropped mid-way resumes where it stopped
    assert b"".join(src.iter_range(0, len(data), 50_000)) == data
    assert server.requests("/data.bin")[before:] == [f"bytes=0-{len(data) - 1}", f"bytes=150000-{len(data) - 1}"]


def test_idle_keep_alive_connections_closed_by_the_server_are_reopened_at_once(served):
    server, data = served
    src = open_source(server.url + "data.bin", retry=RetryPolicy(attempts=1))  # no retry allowed
    assert src.size == len(data)
    server.drop_idle = True
    for off in (0, 1000, 2000):
        assert src.pread(100, off) == data[off:off + 100]


def test_a_source_that_stays_down_ends_in_a_clear_error(served):
    server, data = served
    url = server.url + "data.bin"
    src = open_source(url, retry=FAST)
    assert src.size == len(data)
    server.down = True
    with pytest.raises(RemoteReadError, match=rf"^{url}: reading 100 bytes at offset 5000 failed 4 times .* HTTP 503"):
        src.pread(100, 5000)
    server.down = False
    server.cut_next, server.cut_after, server.down_after_cut = 1, 150_000, True  # dies mid-stream
    stream = src.iter_range(0, len(data), 100_000)
    assert next(stream) == data[:100_000]
    with pytest.raises(RemoteReadError, match=rf"^{url}: streaming bytes up to 300000 at offset 100000 failed 4 times"):
        list(stream)
    server.stop()  # gone: refused connections
    with pytest.raises(RemoteReadError, match=rf"^{url}: reading 8 bytes at offset 64 failed 4 times .*(Connection|refused)"):
        src.pread(8, 64)


def test_a_file_replaced_while_open_is_refused(served):
    server, data = served
    src = open_source(server.url + "data.bin", retry=FAST)
    assert src.pread(4, 0) == data[:4]
    path = server.root / "data.bin"
    path.write_bytes(data[::-1])
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    with pytest.raises(RemoteReadError, match=r"changed since it was opened \(its ETag is no longer .*: HTTP 412 .*\) at offset 4"):
        src.pread(4, 4)


def test_server_without_range_support(served):
    server, data = served
    server.ranges = False
    src = open_source(server.url + "data.bin", retry=FAST)
    assert src.size == len(data) and src.pread(10, 0) == data[:10]
    with pytest.raises(RemoteReadError, match="does not support range requests .* at offset 10"):
        src.pread(10, 10)


def test_cached_copy_downloads_once_and_refetches_a_changed_file(served, tmp_path, monkeypatch):
    server, data = served
    monkeypatch.setenv("FACEMARGIN_CACHE", str(tmp_path / "cache"))
    url = server.url + "data.bin"
    first = cached_copy(url, retry=FAST)
    assert first.read_bytes() == data and first.name == "data.bin"
    assert str(first).startswith(str(tmp_path / "cache" / "remote"))
    n = len(server.requests("/data.bin"))
    assert cached_copy(url) == first and server.requests("/data.bin")[n:] == ["bytes=0-0"]  # size/version only

    path = server.root / "data.bin"
    path.write_bytes(data[::-1])  # same size, new content and mtime -> new ETag
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    second = cached_copy(url)
    assert second != first and second.read_bytes() == data[::-1] and not first.exists()
    assert [p.name for p in second.parent.iterdir()] == ["data.bin"]  # no partial files left
    assert cached_copy(path) == path  # local paths are used in place
    server.cut_next, server.cut_after = 100, 10  # a download that keeps failing leaves nothing behind
    path.write_bytes(data[:1000])
    with pytest.raises(RemoteReadError, match="failed 4 times"):
        cached_copy(url, retry=FAST)
    assert [p.name for p in second.parent.parent.rglob("*") if p.is_file()] == ["data.bin"]


class _Records(torch.utils.data.Dataset):
    def __init__(self, source, offsets):
        self.source, self.offsets = source, offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.source.pread(1000, self.offsets[i])), dtype=torch.uint8)


def test_sources_pickle_and_work_in_dataloader_workers(served):
    server, data = served
    src = open_source(server.url + "data.bin", retry=FAST)
    assert src.pread(3, 0) == data[:3]  # a pooled connection exists now
    clone = pickle.loads(pickle.dumps(src))
    assert clone.pread(5, 99) == data[99:104] and clone.retry == FAST
    offsets = list(range(0, 200_000, 25_000))
    loader = torch.utils.data.DataLoader(_Records(src, offsets), batch_size=2, num_workers=2)
    got = torch.cat([b.reshape(-1) for b in loader]).numpy().tobytes()
    assert got == b"".join(data[o:o + 1000] for o in offsets)


def test_fsspec_source_reads_ahead_a_bounded_number_of_blocks(served):
    pytest.importorskip("aiohttp")
    server, data = served
    src = FsspecSource(server.url + "data.bin", retry=FAST, readahead=2)  # fsspec's HTTP back-end
    assert src.size == len(data)
    blocks = [f"bytes={s}-{s + 9_999}" for s in range(0, 100_000, 10_000)]
    stream = src.iter_range(0, 100_000, 10_000)
    assert next(stream) == data[:10_000]
    deadline = time.monotonic() + 10
    while [r for r in server.requests("/data.bin") if r in blocks] != blocks[:4] and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the consumer holds block 0: the thread fetched blocks 1, 2 (queued) and 3 (waiting)
    assert [r for r in server.requests("/data.bin") if r in blocks] == blocks[:4]
    assert b"".join(stream) == data[10_000:100_000]
    assert pickle.loads(pickle.dumps(src)).pread(7, 1) == data[1:8]


def test_fsspec_local_urls_and_missing_back_ends(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"0123456789")
    src = open_source(path.as_uri())
    assert isinstance(src, FsspecSource) and src.size == 10 and src.pread(3, 4) == b"456"
    assert b"".join(src.iter_range(2, 10, 3)) == b"23456789"
    with pytest.raises(FileNotFoundError, match="file not found: file://"):
        open_source((tmp_path / "nope").as_uri()).size
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"reading s3://bucket/train\.rec needs s3fs: pip install 'facemargin\[s3\]'"):
            open_source("s3://bucket/train.rec")
