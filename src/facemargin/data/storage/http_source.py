"""A file behind an ``http(s)://`` URL, read with ``Range`` requests over the standard library's client.

Why HTTP does not go through fsspec: its HTTP back-end needs aiohttp and runs an event-loop
thread, and retries, short-read detection and the offset in the error message would sit behind
its own caching layers. ``http.client`` with ``Range`` headers is ~150 lines, has no dependency,
and reconnects cleanly after a fork (DataLoader workers). Retries, concurrency and read-ahead
come from :class:`~facemargin.data.storage.remote.RemoteSource`.
"""

from __future__ import annotations

import base64
import http.client
import os
import ssl
import threading
import urllib.parse
import urllib.request
from typing import Iterator

from .remote import RemoteReadError, RemoteSource, RetryPolicy, TransientError

__all__ = ["HTTPSource"]

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class HTTPSource(RemoteSource):
    """A file behind an ``http(s)://`` URL, read with ``Range`` requests (one connection per thread and process).

    Honours ``http_proxy`` / ``https_proxy`` / ``no_proxy``, user:password in the URL (basic auth)
    and redirects. Every response's ETag, Last-Modified and size (Content-Range total, or the
    Content-Length of a whole-file answer) must equal those seen at open, so a file replaced while
    being read fails clearly (:class:`~facemargin.data.storage.remote.RemoteFileChangedError`)
    instead of mixing two versions, whatever validators the server sends; a strong ETag is also
    sent as ``If-Match``. A server without range requests (``python -m http.server``) serves
    :meth:`iter_range` and :func:`~facemargin.data.storage.cache.cached_copy` with one sequential
    GET; random reads there are refused, saying why (``ranges`` is ``False`` after the first request).
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
        self.ranges: bool | None = None  # whether the server honours Range (known after the first request)

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
        """Send ``GET`` for ``[start, end)`` following redirects; returns a 200/206/416 response of the opened version."""
        headers = {**self._headers, "Range": f"bytes={start}-{end - 1}"}
        etag = self._stat[1].get("ETag", "") if self._stat else ""
        if etag.startswith('"'):  # a strong ETag: the server may refuse a changed file itself (412)
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
                raise TransientError(f"{type(exc).__name__}: {exc}") from None
            if resp.status in _REDIRECTS and resp.getheader("Location"):
                self._drain(resp, conn, start)
                url = urllib.parse.urljoin(url, resp.getheader("Location"))
                continue
            if resp.status in (200, 206, 416):
                try:
                    self._check_version(_validators(resp), start)
                except RemoteReadError:
                    conn.close()
                    raise
                return resp, conn
            self._drain(resp, conn, start)
            if resp.status in _RETRY_STATUS:
                raise TransientError(f"HTTP {resp.status} {resp.reason}")
            if resp.status == 412:
                raise self._changed(f"its ETag is no longer {etag}: HTTP 412 Precondition Failed", start)
            raise RemoteReadError(f"{self.name}: HTTP {resp.status} {resp.reason} at offset {start}")
        raise RemoteReadError(f"{self.name}: too many redirects at offset {start}")

    @staticmethod
    def _drain(resp: http.client.HTTPResponse, conn: http.client.HTTPConnection, offset: int) -> None:
        """Read the rest of a small body (keeps the connection reusable); a short one is a dropped connection."""
        try:
            resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise TransientError(f"{type(exc).__name__}: {exc!r} at offset {offset}") from None

    def _fetch_stat(self) -> tuple[int, dict[str, str]]:
        resp, conn = self._get(0, 1, pooled=True)
        self.ranges = resp.status != 200
        if resp.status == 200:  # the server ignores Range; do not download the body to learn the size
            self._reset()
        else:
            self._drain(resp, conn, 0)
        found = _validators(resp)
        if "size" not in found:
            raise RemoteReadError(f"{self.name}: the server does not report the file size")
        return int(found["size"]), found

    def _read_body(self, resp: http.client.HTTPResponse, n: int, offset: int) -> bytes:
        try:
            first = resp.read(n)
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"{type(exc).__name__} after 0 of {n} bytes, at offset {offset}") from None
        if len(first) == n:
            return first  # the usual case: no copy
        buf = bytearray(first)
        while len(buf) < n:
            try:
                chunk = resp.read(n - len(buf))
            except (OSError, http.client.HTTPException) as exc:
                raise TransientError(f"{type(exc).__name__} after {len(buf)} of {n} bytes, at offset {offset + len(buf)}") from None
            if not chunk:
                raise TransientError(f"short body: it ended after {len(buf)} of {n} bytes, at offset {offset + len(buf)}")
            buf += chunk
        return bytes(buf)

    def _check_range(self, resp: http.client.HTTPResponse, start: int, end: int) -> None:
        if resp.status == 200 and start == 0:
            return
        if resp.status == 200:
            raise RemoteReadError(
                f"{self.name}: the server does not support range requests (it answered HTTP 200 with the "
                f"whole file to a request for bytes {start}-{end - 1}), at offset {start}; random access -- "
                "a training set's records, map-style or streaming -- needs them. Sequential reads work (one "
                "GET): download the file once, or serve it with a server that supports range requests"
            )
        got = (resp.getheader("Content-Range") or "").partition(" ")[2].partition("/")[0]
        if resp.status != 206 or got != f"{start}-{end - 1}":
            raise RemoteReadError(f"{self.name}: HTTP {resp.status} with Content-Range "
                                  f"{resp.getheader('Content-Range')!r} for a read of bytes {start}-{end - 1}")

    def _fetch(self, start: int, end: int) -> bytes:
        resp, conn = self._get(start, end, pooled=True)
        self._check_range(resp, start, end)
        data = self._read_body(resp, end - start, start)
        if resp.status == 200:  # a whole-file answer: do not read the rest over this connection
            self._reset()
        else:
            self._drain(resp, conn, end)  # nothing left; keeps the connection reusable
        return data

    def _stream(self, start: int, end: int, block_bytes: int) -> Iterator[bytes]:
        """One request for the whole range, read block by block (no per-block round trip).

        A server without range requests answers with the whole file: the bytes before ``start``
        are read and dropped (one sequential GET, resumed the same way after a drop)."""
        resp, conn = self._get(start, end, pooled=False)
        try:
            if resp.status == 200:
                pos = 0
                while pos < start:
                    pos += len(self._read_body(resp, min(block_bytes, start - pos, 1 << 20), pos))
            else:
                self._check_range(resp, start, end)
            pos = start
            while pos < end:
                n = min(block_bytes, end - pos)
                yield self._read_body(resp, n, pos)
                pos += n
        finally:
            conn.close()


def _validators(resp: http.client.HTTPResponse) -> dict[str, str]:
    """ETag, Last-Modified and the file's size (Content-Range total, or Content-Length of a 200) of a response."""
    found = {}
    for key in ("ETag", "Last-Modified"):
        value = resp.getheader(key)
        if value:
            found[key] = value
    if resp.status == 200:
        size = resp.getheader("Content-Length") or ""
    else:
        size = (resp.getheader("Content-Range") or "").rpartition("/")[2]
    if size.isdigit():
        found["size"] = size
    return found
