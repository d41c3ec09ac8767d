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
                raise TransientError(f"{type(exc).__name__}: {exc}") from None
            if resp.status in _REDIRECTS and resp.getheader("Location"):
                resp.read()
                url = urllib.parse.urljoin(url, resp.getheader("Location"))
                continue
            if resp.status in (200, 206, 416):
                return resp, conn
            resp.read()
            if resp.status in _RETRY_STATUS:
                raise TransientError(f"HTTP {resp.status} {resp.reason}")
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
            raise TransientError(f"{type(exc).__name__} after 0 of {n} bytes at offset {offset}") from None
        if len(first) == n:
            return first  # the usual case: no copy
        buf = bytearray(first)
        while len(buf) < n:
            try:
                chunk = resp.read(n - len(buf))
            except (OSError, http.client.HTTPException) as exc:
                raise TransientError(f"{type(exc).__name__} after {len(buf)} of {n} bytes at offset {offset}") from None
            if not chunk:
                raise TransientError(f"short read: {len(buf)} of {n} bytes at offset {offset}")
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
