"""A real HTTP/1.1 file server on 127.0.0.1 for remote-read tests and benchmarks (standard library only).

Serves the files under ``root`` with ``Range`` requests (206 / 416), ``ETag`` (strong: mtime and
size), ``Last-Modified``, ``If-Match`` (412 when the file changed) and keep-alive. Faults to inject,
set on the instance while it runs:

* ``fail_next = k``: the next ``k`` requests get ``503``;
* ``down = True``: every request gets ``503``;
* ``cut_next = k`` with ``cut_after = n``: the next ``k`` bodies stop after ``n`` bytes and the
  connection is closed (a dropped connection mid-record); with ``down_after_cut = True`` the
  server then stays down;
* ``ranges = False``: ``Range`` is ignored (always 200 with the whole file);
* ``drop_idle = True``: the connection is closed after each reply without saying so, as a
  server does when a keep-alive connection has been idle too long.

Validators, as servers differ: ``etag = "strong"`` (default), ``"weak"`` (``W/"..."``, never
matches ``If-Match``) or ``None`` (no ETag); ``last_modified = False`` drops Last-Modified;
``if_match = False`` ignores ``If-Match`` (serves whatever the file is now).

``latency = seconds`` delays every reply (a network round trip). ``log`` records ``(method, path,
range header)`` of every request and ``clients`` the client ports seen (one per connection). The server runs in a daemon
thread and stops by itself after ``lifetime`` seconds, if the test has not stopped it already.
``python tests/range_http.py ROOT [LIFETIME [LATENCY]]`` serves ``ROOT`` from its own process (benchmarks:
no GIL shared with the client) and prints the URL.
"""

from __future__ import annotations

import email.utils
import os
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # injected faults break pipes on purpose
        pass


class RangeServer:
    def __init__(self, root: str | os.PathLike, lifetime: float = 120.0) -> None:
        self.root = Path(root)
        self.log: list[tuple[str, str, str | None]] = []
        self.fail_next = 0
        self.down = False
        self.cut_next = 0
        self.cut_after = 0
        self.down_after_cut = False
        self.ranges = True
        self.drop_idle = False
        self.latency = 0.0
        self.etag: str | None = "strong"
        self.last_modified = True
        self.if_match = True
        self.clients: set[int] = set()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as production servers do: no 40 ms delayed-ACK stalls

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                server._serve(self, body=False)

            def do_GET(self) -> None:
                server._serve(self, body=True)
                if server.drop_idle:
                    self.close_connection = True

        self.httpd = _Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        self._stopped = False

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "RangeServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def requests(self, path: str, method: str = "GET") -> list[str | None]:
        """Range headers of the requests for ``path`` (``"/name"``) so far."""
        with self._lock:
            return [r for m, p, r in self.log if m == method and p == path]

    def _take(self, name: str) -> bool:
        with self._lock:
            left = getattr(self, name)
            if left > 0:
                setattr(self, name, left - 1)
            return left > 0

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        rng = h.headers.get("Range")
        with self._lock:
            self.log.append((h.command, h.path, rng))
            self.clients.add(h.client_address[1])
        if self.latency:
            time.sleep(self.latency)
        if self.down or self._take("fail_next"):
            return self._reply(h, 503, b"")
        path = self.root / h.path.lstrip("/").split("?", 1)[0]
        if not path.is_file():
            return self._reply(h, 404, b"")
        st = path.stat()
        size = st.st_size
        etag = f'"{st.st_mtime_ns:x}-{size:x}"'
        headers = {"Accept-Ranges": "bytes" if self.ranges else "none"}
        if self.etag:
            headers["ETag"] = etag if self.etag == "strong" else "W/" + etag
        if self.last_modified:
            headers["Last-Modified"] = email.utils.formatdate(st.st_mtime, usegmt=True)
        match = h.headers.get("If-Match")
        if self.if_match and match is not None and match != headers.get("ETag"):  # strong comparison
            return self._reply(h, 412, b"")
        start, end, status = 0, size, 200
        m = _RANGE.match(rng or "") if self.ranges else None
        if m:
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            if start >= size:
                return self._reply(h, 416, b"", {"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        cut = self.cut_after if body and self._take("cut_next") else None
        if cut is not None and self.down_after_cut:
            self.down = True
        self._reply(h, status, data if body else b"", headers, length=end - start, cut=cut)

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict | None = None,
               length: int | None = None, cut: int | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data) if length is None else length))
        h.end_headers()
        if cut is not None:
            h.wfile.write(data[:cut])
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        view = memoryview(data)
        for i in range(0, len(view), 1 << 16):
            h.wfile.write(view[i:i + (1 << 16)])


if __name__ == "__main__":
    server = RangeServer(sys.argv[1], lifetime=float(sys.argv[2]) if len(sys.argv) > 2 else 3600.0)
    server.latency = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    print(server.url, flush=True)
    server._thread.join()
