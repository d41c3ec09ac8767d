"""Byte sources over the network: HTTP(S) with the standard library, object storage through fsspec.

Both read the same way (see :mod:`facemargin.data.storage`): ``pread`` is one ranged request,
``pread_many`` keeps up to ``concurrency`` of them in flight, ``iter_range`` streams large ranges in
a background thread that stays ``readahead`` blocks ahead of the caller. Failures that may pass -- refused or dropped connections, time-outs, HTTP 5xx /
408 / 429, a body shorter than announced -- are retried with exponential back-off
(:class:`RetryPolicy`); a stream that fails mid-range resumes at the first byte it has not yet
delivered. A source that stays down, or a permanent error (404, 403, a server that ignores
``Range``, a file that changed while being read), ends in :class:`RemoteReadError` naming the URL
and the offset.

Why HTTP does not go through fsspec: its HTTP back-end needs aiohttp and runs an event-loop
thread, and retries, short-read detection and the offset in the error message would sit behind
its own caching layers. ``http.client`` with ``Range`` headers is ~150 lines, has no dependency,
and reconnects cleanly after a fork (DataLoader workers). ``s3://``, ``gs://`` and every other
fsspec protocol use fsspec (``pip install 'facemargin[s3]'`` / ``'facemargin[gcs]'``).

Back-off jitter uses a private :class:`random.Random`, never the global RNGs (their states are
part of exact resume).
"""

from __future__ import annotations

import base64
import http.client
import os
import queue
import random
import ssl
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

from ..errors import UserError

__all__ = ["RetryPolicy", "RemoteReadError", "HTTPSource", "FsspecSource"]

T = TypeVar("T")
_END = object()
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


class RemoteReadError(UserError, OSError):
    """A remote read that failed for good; the message names the URL and the byte offset."""


class _Transient(Exception):
    """A failure worth retrying (internal)."""


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries per request, waiting ``base_delay * 2**k`` (capped at ``max_delay``, +-25 % jitter) between them."""

    attempts: int = 8
    base_delay: float = 0.25
    max_delay: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(f"RetryPolicy needs attempts >= 1 and non-negative delays, got {self}")

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure."""
        return min(self.max_delay, self.base_delay * 2 ** (failures - 1)) * rng.uniform(0.75, 1.25)


class _RemoteSource:
    """Retry loop, read-ahead thread and pickling shared by the remote sources."""

    name: str

    def __init__(self, url: str, retry: RetryPolicy | None, readahead: int, concurrency: int) -> None:
        if readahead < 1 or concurrency < 1:
            raise ValueError(f"readahead and concurrency must be >= 1, got {readahead} and {concurrency}")
        self.name = url
        self.retry = retry or RetryPolicy()
        self.readahead = int(readahead)
        self.concurrency = int(concurrency)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid: int | None = None
        self._stat: tuple[int, str] | None = None
        self._jitter = random.Random()

    # ---- implemented by subclasses
    def _fetch_stat(self) -> tuple[int, str]:
        raise NotImplementedError

    def _fetch(self, start: int, end: int) -> bytes:
        raise NotImplementedError

    def _stream(self, start: int, end: int, block_bytes: int) -> Iterator[bytes]:
        """Blocks of ``[start, end)`` in order; may raise :class:`_Transient` after yielding some."""
        pos = start
        while pos < end:
            data = self._fetch(pos, min(pos + block_bytes, end))
            yield data
            pos += len(data)

    # ---- shared
    def _retrying(self, what: str, offset: int, call: Callable[[], T]) -> T:
        failures, began = 0, time.monotonic()
        while True:
            try:
                return call()
            except _Transient as exc:
                failures += 1
                self._reset()
                if failures >= self.retry.attempts:
                    raise self._gave_up(what, offset, failures, began, exc) from None
                time.sleep(self.retry.delay(failures, self._jitter))

    def _gave_up(self, what: str, offset: int, failures: int, began: float, exc: BaseException) -> RemoteReadError:
        return RemoteReadError(
            f"{self.name}: {what} at offset {offset} failed {failures} times over "
            f"{time.monotonic() - began:.1f}s; last error: {exc}"
        )

    def _reset(self) -> None:
        """Drop cached connections after a failure (subclasses)."""

    def _stat_once(self) -> tuple[int, str]:
        if self._stat is None:
            self._stat = self._retrying("asking the size", 0, self._fetch_stat)
        return self._stat

    @property
    def size(self) -> int:
        """File size in bytes (asked once, then remembered; pickled with the source)."""
        return self._stat_once()[0]

    @property
    def version(self) -> str:
        """What identifies this version of the file: ETag / Last-Modified / mtime, and the size."""
        return self._stat_once()[1]

    def pread(self, n: int, offset: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` in one request (fewer only at the end of the file)."""
        if n < 0 or offset < 0:
            raise ValueError(f"{self.name}: bad read of {n} bytes at offset {offset}")
        end = min(offset + n, self.size)
        if end <= offset:
            return b""
        return self._retrying(f"reading {end - offset} bytes", offset, lambda: self._fetch(offset, end))

    def pread_many(self, reads: Sequence[tuple[int, int]]) -> list[bytes]:
        """``[pread(n, offset) ...]`` in order, up to ``concurrency`` requests in flight (one connection each)."""
        if len(reads) <= 1 or self.concurrency == 1:
            return [self.pread(n, offset) for n, offset in reads]
        if self._executor is None or self._executor_pid != os.getpid():
            self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="facemargin-pread")
            self._executor_pid = os.getpid()
        return list(self._executor.map(lambda r: self.pread(*r), reads))

    def iter_range(self, start: int, end: int, block_bytes: int) -> Iterator[bytes]:
        """``[start, end)`` in blocks of ``block_bytes`` (the last may be shorter), read ahead in a thread."""
        if block_bytes < 1:
            raise ValueError(f"block_bytes must be >= 1, got {block_bytes}")
        end = min(end, self.size)
        if start >= end:
            return
        blocks: queue.Queue = queue.Queue(maxsize=self.readahead)
        stop = threading.Event()

        def put(item: object) -> None:
            while not stop.is_set():
                try:
                    blocks.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def produce() -> None:
            try:
                for block in self._resuming_stream(start, end, block_bytes, stop):
                    put(block)
                put(_END)
            except BaseException as exc:  # handed to the consumer, raised there
                put(exc)

        worker = threading.Thread(target=produce, name=f"facemargin-readahead {self.name}", daemon=True)
        worker.start()
        try:
            while True:
                item = blocks.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    def _resuming_stream(self, start: int, end: int, block_bytes: int, stop: threading.Event) -> Iterator[bytes]:
        """:meth:`_stream` that restarts at the first undelivered byte after a transient failure."""
        pos, failures, began = start, 0, time.monotonic()
        while pos < end and not stop.is_set():
            try:
                for block in self._stream(pos, end, block_bytes):
                    pos += len(block)
                    failures, began = 0, time.monotonic()
                    yield block
                    if stop.is_set():
                        return
                if pos < end:
                    raise _Transient(f"stream ended at offset {pos}, expected {end}")
            except _Transient as exc:
                failures += 1
                self._reset()
                if failures >= self.retry.attempts:
                    raise self._gave_up(f"streaming bytes up to {end}", pos, failures, began, exc) from None
                time.sleep(self.retry.delay(failures, self._jitter))

    def close(self) -> None:
        if self._executor is not None and self._executor_pid == os.getpid():
            self._executor.shutdown(wait=False)
        self._executor = None
        self._reset()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_jitter=None, _executor=None, _executor_pid=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._jitter = random.Random()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class HTTPSource(_RemoteSource):
    """A file behind an ``http(s)://`` URL, read with ``Range`` requests (one connection per thread and process).

    Honours ``http_proxy`` / ``https_proxy`` / ``no_proxy``, user:password in the URL (basic auth)
    and redirects. A strong ETag is sent as ``If-Match``, so a file replaced while being read fails
    clearly instead of mixing two versions.
    """

    def __init__(self, url: str, retry: RetryPolicy | None = None, readahead: int = 4, concurrency: int = 8,
                 timeout: float = 60.0) -> None:
        super().__init__(url, retry, readahead, concurrency)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        self.timeout = float(timeout)
        self._headers = {"User-Agent": "facemargin", "Accept-Encoding": "identity"}
        if parts.username is not None:
            cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_local": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._local = threading.local()

    # ---- connections
    def _connect(self, url: str) -> tuple[http.client.HTTPConnection, str]:
        """A connection for ``url`` (a fresh one; the caller closes it) and the request target."""
        parts = urllib.parse.urlsplit(url)
        host, port, https = parts.hostname or "", parts.port, parts.scheme.lower() == "https"
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        proxy = urllib.request.getproxies().get(parts.scheme.lower())
        if proxy and not urllib.request.proxy_bypass(host):
            p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
            conn: http.client.HTTPConnection = http.client.HTTPConnection(p.hostname or "", p.port, timeout=self.timeout)
            if https:
                conn = http.client.HTTPSConnection(p.hostname or "", p.port, timeout=self.timeout,
                                                   context=ssl.create_default_context())
                conn.set_tunnel(host, port)
            else:
                target = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path or "/", parts.query, ""))
        elif https:
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        return conn, target

    def _pool(self) -> dict:
        """This thread's connections; forgotten (not closed: the parent owns them) after a fork."""
        local = self._local.__dict__
        if local.get("pid") != os.getpid():
            local.update(pid=os.getpid(), pool={})
        return local["pool"]

    def _pooled(self, url: str) -> tuple[http.client.HTTPConnection, str]:
        pool = self._pool()
        if url not in pool:
            pool[url] = self._connect(url)
        return pool[url]

    def _reset(self) -> None:
        pool = self._pool()
        for conn, _ in pool.values():
            conn.close()
        pool.clear()

    # ---- requests
    def _get(self, start: int, end: int, pooled: bool) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        """Send ``GET`` for ``[start, end)`` following redirects; returns a 200/206/416 response."""
        headers = {**self._headers, "Range": f"bytes={start}-{end - 1}"}
        etag = self._stat[1].split("|", 1)[0] if self._stat else ""
        if etag.startswith('"'):
            headers["If-Match"] = etag
        url = self.name
        for _ in range(6):
            conn, target = self._pooled(url) if pooled else self._connect(url)
            reused = conn.sock is not None
            try:
                try:
                    conn.request("GET", target, headers=headers)
                    resp = conn.getresponse()
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    if not reused:
                        raise
                    conn.close()  # the server closed an idle keep-alive connection: reconnect at once
                    conn.request("GET", target, headers=headers)
                    resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                if isinstance(exc, ssl.SSLCertVerificationError):
                    raise RemoteReadError(f"{self.name}: {exc}") from None
                conn.close()
                raise _Transient(f"{type(exc).__name__}: {exc}") from None
            if resp.status in _REDIRECTS and resp.getheader("Location"):
                resp.read()
                url = urllib.parse.urljoin(url, resp.getheader("Location"))
                continue
            if resp.status in (200, 206, 416):
                return resp, conn
            resp.read()
            if resp.status in _RETRY_STATUS:
                raise _Transient(f"HTTP {resp.status} {resp.reason}")
            why = {412: " (the file changed since it was opened)"}.get(resp.status, "")
            raise RemoteReadError(f"{self.name}: HTTP {resp.status} {resp.reason}{why} at offset {start}")
        raise RemoteReadError(f"{self.name}: too many redirects at offset {start}")

    def _fetch_stat(self) -> tuple[int, str]:
        resp, conn = self._get(0, 1, pooled=True)
        if resp.status == 206:
            total = (resp.getheader("Content-Range") or "").rpartition("/")[2]
            resp.read()
        elif resp.status == 416:  # an empty file
            total = (resp.getheader("Content-Range") or "*/0").rpartition("/")[2]
            resp.read()
        else:  # 200: the server ignores Range; do not download the body to learn the size
            total = resp.getheader("Content-Length") or ""
            self._reset()
        if not total.isdigit():
            raise RemoteReadError(f"{self.name}: the server does not report the file size")
        tag = resp.getheader("ETag") or resp.getheader("Last-Modified") or ""
        return int(total), f"{tag}|{total}"

    def _read_body(self, resp: http.client.HTTPResponse, n: int, offset: int) -> bytes:
        try:
            first = resp.read(n)
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(f"{type(exc).__name__} after 0 of {n} bytes at offset {offset}") from None
        if len(first) == n:
            return first  # the usual case: no copy
        buf = bytearray(first)
        while len(buf) < n:
            try:
                chunk = resp.read(n - len(buf))
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(f"{type(exc).__name__} after {len(buf)} of {n} bytes at offset {offset}") from None
            if not chunk:
                raise _Transient(f"short read: {len(buf)} of {n} bytes at offset {offset}")
            buf += chunk
        return bytes(buf)

    def _check_range(self, resp: http.client.HTTPResponse, start: int) -> None:
        if resp.status == 200 and start == 0:
            return
        if resp.status == 200:
            raise RemoteReadError(
                f"{self.name}: the server ignored the Range header (HTTP 200) at offset {start}; "
                "random access and streaming need a server with range requests"
            )
        got = (resp.getheader("Content-Range") or "").partition(" ")[2].partition("-")[0]
        if resp.status != 206 or got != str(start):
            raise RemoteReadError(f"{self.name}: HTTP {resp.status} with Content-Range "
                                  f"{resp.getheader('Content-Range')!r} for a read at offset {start}")

    def _fetch(self, start: int, end: int) -> bytes:
        resp, conn = self._get(start, end, pooled=True)
        self._check_range(resp, start)
        data = self._read_body(resp, end - start, start)
        if resp.status == 200:  # a whole-file answer: do not read the rest over this connection
            self._reset()
        else:
            resp.read()  # nothing left; keeps the connection reusable
        return data

    def _stream(self, start: int, end: int, block_bytes: int) -> Iterator[bytes]:
        """One request for the whole range, read block by block (no per-block round trip)."""
        resp, conn = self._get(start, end, pooled=False)
        try:
            self._check_range(resp, start)
            pos = start
            while pos < end:
                n = min(block_bytes, end - pos)
                yield self._read_body(resp, n, pos)
                pos += n
        finally:
            conn.close()


class FsspecSource(_RemoteSource):
    """A file on any fsspec file system (``s3://``, ``gs://``, ``az://``, ...): ranged ``cat_file`` calls."""

    def __init__(self, url: str, retry: RetryPolicy | None = None, readahead: int = 4, concurrency: int = 8,
                 storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, retry, readahead, concurrency)
        scheme = url.split("://", 1)[0].lower()
        try:
            import fsspec

            self._fs, self._path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except ImportError as exc:
            package, extra = _EXTRAS.get(scheme, (f"the fsspec back-end for {scheme}://", ""))
            hint = f"pip install 'facemargin[{extra}]'" if extra else "see fsspec's list of implementations"
            raise ImportError(f"reading {url} needs {package}: {hint} ({exc})") from None
        except ValueError as exc:
            raise ValueError(f"cannot open {url}: {exc}") from None

    @staticmethod
    def _call(fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except (OSError, TimeoutError) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None

    def _fetch_stat(self) -> tuple[int, str]:
        try:
            info = self._call(lambda: self._fs.info(self._path))
        except FileNotFoundError:
            raise FileNotFoundError(f"file not found: {self.name}") from None
        if info.get("type") == "directory":
            raise IsADirectoryError(f"{self.name} is a directory, not a file")
        size = int(info["size"])
        keys = ("ETag", "etag", "md5Hash", "generation", "LastModified", "last_modified", "updated", "mtime")
        tag = next((str(info[k]) for k in keys if info.get(k) is not None), "")
        return size, f"{tag}|{size}"

    def _fetch(self, start: int, end: int) -> bytes:
        data = self._call(lambda: self._fs.cat_file(self._path, start=start, end=end))
        if len(data) != end - start:
            raise _Transient(f"short read: {len(data)} of {end - start} bytes at offset {start}")
        return bytes(data)
