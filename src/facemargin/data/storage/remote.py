"""What every remote byte source shares: retries with back-off, concurrent reads, read-ahead, the final error.

Every remote source reads the same way (see :mod:`facemargin.data.storage`): ``pread`` is one ranged request,
``pread_many`` keeps up to ``concurrency`` of them in flight, ``iter_range`` streams large ranges in
a background thread that stays ``readahead`` blocks ahead of the caller. Failures that may pass -- refused or dropped connections, time-outs, HTTP 5xx /
408 / 429, a body shorter than announced -- are retried with exponential back-off
(:class:`RetryPolicy`); a stream that fails mid-range resumes at the first byte it has not yet
delivered. A source that stays down, or a permanent error (404, 403, random access on a server
without range requests), ends in :class:`RemoteReadError` naming the URL and the offset.

One version of a file, never two: the validators seen when the file is first asked about (its
size, and its ETag / Last-Modified / generation where the store has them) are compared with those
of every later answer -- each HTTP response's headers, or a fresh ``info`` after each read of an
fsspec back-end -- and any difference, weak ETags included, ends in :class:`RemoteFileChangedError`
naming the URL and what changed, before a byte of the new version is handed over. (A file
replaced by one of the same size on a server that sends neither ETag nor Last-Modified cannot
be told apart; nothing can.)

The sources: :class:`~facemargin.data.storage.http_source.HTTPSource` (standard library) and
:class:`~facemargin.data.storage.fsspec_source.FsspecSource` (``s3://``, ``gs://``, every fsspec protocol).

Back-off jitter uses a private :class:`random.Random`, never the global RNGs (their states are
part of exact resume).
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

from ...errors import UserError

__all__ = ["RetryPolicy", "RemoteReadError", "RemoteFileChangedError", "RemoteSource", "changed_validators"]

T = TypeVar("T")
_END = object()


class RemoteReadError(UserError, OSError):
    """A remote read that failed for good; the message names the URL and the byte offset."""


class RemoteFileChangedError(RemoteReadError):
    """The remote file is not the version that was opened; the message names the URL and what changed."""


def changed_validators(opened: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """What differs between the validators seen at open and ``now`` (``["ETag 'a' -> 'b'", ...]``).

    Every validator the file had at open must be there, unchanged; one the store adds later is ignored.
    """
    return [f"{key} {value!r} -> {now[key]!r}" if key in now else f"{key} {value!r} -> none"
            for key, value in opened.items() if now.get(key) != value]


class TransientError(Exception):
    """A failure worth retrying (raised by the remote sources, caught by their retry loops; never escapes them)."""


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


class RemoteSource:
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
        self._stat: tuple[int, dict[str, str]] | None = None
        self._jitter = random.Random()

    # ---- implemented by subclasses
    def _fetch_stat(self) -> tuple[int, dict[str, str]]:
        """``(size, validators)``: the validators always hold ``"size"``, and ETag & co. where known."""
        raise NotImplementedError

    def _confirm(self, offset: int) -> None:
        """Raise :class:`RemoteFileChangedError` if the file is no longer the opened version (sources
        whose answers carry no validators check here, after each read; HTTP checks every response)."""

    def _fetch(self, start: int, end: int) -> bytes:
        raise NotImplementedError

    def _stream(self, start: int, end: int, block_bytes: int) -> Iterator[bytes]:
        """Blocks of ``[start, end)`` in order; may raise :class:`TransientError` after yielding some."""
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
            except TransientError as exc:
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

    def _stat_once(self) -> tuple[int, dict[str, str]]:
        if self._stat is None:
            self._stat = self._retrying("asking the size", 0, self._fetch_stat)
        return self._stat

    def _check_version(self, now: Mapping[str, str], offset: int) -> None:
        """Refuse an answer whose validators differ from those seen at open."""
        if self._stat is None:
            return
        changes = changed_validators(self._stat[1], now)
        if changes:
            raise self._changed(f"{'; '.join(changes)}", offset)

    def _changed(self, what: str, offset: int) -> RemoteFileChangedError:
        return RemoteFileChangedError(
            f"{self.name}: the file changed since it was opened ({what}) at offset {offset}; "
            "nothing of the new version was used. Restart to read the new version from the start",
            hint="the file was replaced while a run read it: wait until it is complete, then restart")

    @property
    def size(self) -> int:
        """File size in bytes (asked once, then remembered; pickled with the source)."""
        return self._stat_once()[0]

    @property
    def validators(self) -> dict[str, str]:
        """What identifies the opened version of the file: ``size``, and ETag / Last-Modified / ... where known."""
        return dict(self._stat_once()[1])

    @property
    def version(self) -> str:
        """:attr:`validators` as one string (keys the local copies of :func:`~facemargin.data.storage.cache.cached_copy`)."""
        return "|".join(f"{k}={v}" for k, v in sorted(self._stat_once()[1].items()))

    def _read(self, n: int, offset: int) -> bytes:
        if n < 0 or offset < 0:
            raise ValueError(f"{self.name}: bad read of {n} bytes at offset {offset}")
        end = min(offset + n, self.size)
        if end <= offset:
            return b""
        return self._retrying(f"reading {end - offset} bytes", offset, lambda: self._fetch(offset, end))

    def pread(self, n: int, offset: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` in one request (fewer only at the end of the file)."""
        data = self._read(n, offset)
        self._confirm(offset)
        return data

    def pread_many(self, reads: Sequence[tuple[int, int]]) -> list[bytes]:
        """``[pread(n, offset) ...]`` in order, up to ``concurrency`` requests in flight (one connection each)."""
        if not reads:
            return []
        if len(reads) == 1 or self.concurrency == 1:
            out = [self._read(n, offset) for n, offset in reads]
        else:
            if self._executor is None or self._executor_pid != os.getpid():
                self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="facemargin-pread")
                self._executor_pid = os.getpid()
            out = list(self._executor.map(lambda r: self._read(*r), reads))
        self._confirm(reads[0][1])
        return out

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
                    self._confirm(pos)
                    pos += len(block)
                    failures, began = 0, time.monotonic()
                    yield block
                    if stop.is_set():
                        return
                if pos < end:
                    raise TransientError(f"stream ended at offset {pos}, expected {end}")
            except TransientError as exc:
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
