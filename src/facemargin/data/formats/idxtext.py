"""The text of an ``.idx``: strict parsing in NumPy over the raw bytes, streamed from the file in chunks.

An ``.idx`` is text, one ``key<TAB>offset`` line per record. Any blank/space/CR layout is accepted;
each non-blank line must hold exactly two decimal integers of at most 18 digits (every one fits in
int64). A defect -- an empty field, a sign or other character, a 19-digit number, an empty file --
raises :class:`RecordIOError` naming the file and the line. No Python object is made per line:

* the fast path takes a run of lines of one length -- ``key<TAB>offset\\n`` with fixed digit counts,
  what every writer produces; the length changes only when a key or an offset gains a digit -- as a
  2-D byte array, checks its tab and newline columns and that every other byte is a digit, and
  converts eight digits at a time with SWAR arithmetic on uint64 words;
* the general path (any layout) finds the numbers by their digit runs and reads them with NumPy's
  text reader; it takes over wherever the fast path sees anything else, and names the line of a defect.

The file is read in chunks of whole lines into one reused buffer: parsing a 1 GB ``.idx`` holds
8 MB of text at a time.
"""

from __future__ import annotations

import io
import os
from typing import Callable, Iterator

import numpy as np

__all__ = ["RecordIOError", "iter_idx", "parse_idx"]

_MAX_DIGITS = 18  # every 18-digit decimal fits in int64
_CHUNK = 8 << 20
_SLACK = 8  # bytes before the text in the buffer: an 8-byte word may start before the first line
_BLOCK = 1 << 14  # rows converted at once (the temporaries stay in the CPU cache)
_DIGIT, _TAB, _LF, _CR, _SPACE = 48, 9, 10, 13, 32
_U = np.uint64
_FULL = 0xFFFFFFFFFFFFFFFF
_ZEROS, _TOO_BIG, _HIGH = _U(0x3030303030303030), _U(0x7676767676767676), _U(0x8080808080808080)
_PAIRS = _U(0x000000FF000000FF)
_MUL_02, _MUL_13 = _U(100 + (1000000 << 32)), _U(1 + (10000 << 32))


class RecordIOError(ValueError):
    """A malformed .rec/.idx file; the message names the file and the line, key or offset."""


# --------------------------------------------------------------------------- general path
def _fail(buf: bytearray, lo: int, pos: int, line_base: int, name: str, why: str) -> RecordIOError:
    line = line_base + buf.count(b"\n", lo, pos) + 1
    start = max(buf.rfind(b"\n", lo, pos) + 1, lo)
    stop = buf.find(b"\n", pos)
    shown = bytes(buf[start: stop if stop >= 0 else len(buf)][:80]).decode("latin1")
    return RecordIOError(f"{name}: line {line} {why}: {shown!r}")


def _general(buf: bytearray, lo: int, hi: int, line_base: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse the whole lines in ``buf[lo:hi]``, any blank layout."""
    raw = np.frombuffer(buf, dtype=np.uint8, count=hi - lo, offset=lo)
    digit = (raw - _DIGIT) < 10  # uint8 wrap-around: True for '0'..'9' only
    newline = raw == _LF
    bad = ~(digit | newline | (raw == _TAB) | (raw == _SPACE) | (raw == _CR))
    if bad.any():
        pos = int(np.argmax(bad))
        raise _fail(buf, lo, lo + pos, line_base, name, f"is not 'key<TAB>offset' (unexpected {chr(raw[pos])!r})")
    prev = np.concatenate(([False], digit[:-1]))
    nxt = np.concatenate((digit[1:], [False]))
    starts = np.flatnonzero(digit & ~prev)
    ends = np.flatnonzero(digit & ~nxt) + 1
    line_ends = np.flatnonzero(newline)
    per_line = np.bincount(np.searchsorted(line_ends, starts), minlength=line_ends.size + 1)
    odd = np.flatnonzero((per_line != 0) & (per_line != 2))
    if odd.size:
        first = int(odd[0])
        pos = int(line_ends[first - 1]) + 1 if first > 0 else 0
        raise _fail(buf, lo, lo + pos, line_base, name, f"is not 'key<TAB>offset' ({int(per_line[first])} fields)")
    lengths = ends - starts
    if lengths.size and int(lengths.max()) > _MAX_DIGITS:
        pos = int(starts[np.argmax(lengths > _MAX_DIGITS)])
        raise _fail(buf, lo, lo + pos, line_base, name, f"has a number of more than {_MAX_DIGITS} digits")
    if not starts.size:  # blank lines only
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # checked above: only digits and blanks, two numbers a line, none longer than int64 holds,
    # so NumPy's C text parser reads exactly these numbers
    values = np.fromstring(bytes(buf[lo:hi]).decode("ascii"), dtype=np.int64, sep=" ")
    if values.size != starts.size:  # pragma: no cover - defensive, the checks above make it impossible
        raise _fail(buf, lo, lo, line_base, name, "and the lines after it could not be read as numbers")
    return values[0::2], values[1::2]


# --------------------------------------------------------------------------- fast path
def _words(first: int, width: int) -> list[tuple[int, int]]:
    """``(column, digits)`` of the 8-byte words that end at digit columns of ``[first, first + width)``, rightmost first."""
    out, end = [], first + width
    while width > 0:
        out.append((end - 8, min(8, width)))
        end, width = end - 8, width - 8
    return out


class _Runs:
    """The SWAR conversion of runs of ``key<TAB>offset\n`` lines of one length, into reused buffers."""

    def __init__(self) -> None:
        self.words = np.empty((6, _BLOCK), np.uint64)
        self.temp = np.empty((6, _BLOCK), np.uint64)
        self.keys = np.empty(0, np.int64)
        self.offsets = np.empty(0, np.int64)
        self._plans: dict[tuple[int, int], tuple[list[tuple[int, int]], int]] = {}

    def reserve(self, rows: int) -> None:
        if self.keys.size < rows:
            self.keys, self.offsets = np.empty(rows, np.int64), np.empty(rows, np.int64)

    @staticmethod
    def line_at(buf: bytearray, p: int, hi: int) -> tuple[int, int] | None:
        """``(length, tab column)`` when the line at ``p`` is ``digits<TAB>digits\n`` (1..18 digits each)."""
        end = buf.find(b"\n", p, min(hi, p + 2 * _MAX_DIGITS + 3))
        tab = buf.find(b"\t", p, end) if end > 0 else -1
        if tab <= p or tab - p > _MAX_DIGITS or not 0 < end - tab - 1 <= _MAX_DIGITS:
            return None
        if not (buf[p:tab].isdigit() and buf[tab + 1:end].isdigit()):
            return None
        return end + 1 - p, tab - p

    def convert(self, buf: bytearray, base: int, length: int, tab: int, m: int, at: int) -> bool:
        """Keys and offsets of the ``m`` rows at ``buf[base:]`` into ``keys[at:]``, ``offsets[at:]``;
        ``False`` (nothing usable written) if a byte is not a digit."""
        if (length, tab) not in self._plans:
            self._plans[length, tab] = (_words(0, tab) + _words(tab + 1, length - tab - 2), len(_words(0, tab)))
        plan, nk = self._plans[length, tab]
        w, t = self.words[: len(plan), :m], self.temp[: len(plan), :m]
        for j, (col, digits) in enumerate(plan):  # each word as uint64, the bytes of other fields zeroed
            src = np.ndarray((m,), dtype="<u8", buffer=buf, offset=base + col, strides=(length,))
            if digits == 8:
                np.subtract(src, _ZEROS, out=w[j])
            else:
                keep = _U((_FULL << (8 * (8 - digits))) & _FULL)
                np.bitwise_and(src, keep, out=w[j])
                np.subtract(w[j], _ZEROS & keep, out=w[j])
        # every byte now 0..9, else the high bit of the byte or of byte + 0x76 is set
        np.add(w, _TOO_BIG, out=t)
        np.bitwise_or(t, w, out=t)
        if int(np.bitwise_or.reduce(t, axis=None)) & int(_HIGH):
            return False
        # 8 digits -> one number: pairs, then the four pairs at once (Lemire's multiplications)
        np.right_shift(w, _U(8), out=t)
        np.multiply(w, _U(10), out=w)
        np.add(w, t, out=w)
        np.right_shift(w, _U(16), out=t)
        np.bitwise_and(t, _PAIRS, out=t)
        np.multiply(t, _MUL_13, out=t)
        np.bitwise_and(w, _PAIRS, out=w)
        np.multiply(w, _MUL_02, out=w)
        np.add(w, t, out=w)
        np.right_shift(w, _U(32), out=w)
        _join(w[:nk], self.keys[at: at + m].view(np.uint64), t[0])
        _join(w[nk:], self.offsets[at: at + m].view(np.uint64), t[0])
        return True


def _join(w: np.ndarray, out: np.ndarray, temp: np.ndarray) -> None:
    """``out = w[0] + w[1] * 10**8 + ...`` (the words of one field, rightmost first)."""
    if w.shape[0] == 1:
        np.copyto(out, w[0])
        return
    np.multiply(w[1], _U(10 ** 8), out=out)
    np.add(out, w[0], out=out)
    for k in range(2, w.shape[0]):
        np.multiply(w[k], _U(10 ** (8 * k)), out=temp)
        np.add(out, temp, out=out)


def _lines(buf: bytearray, lo: int, hi: int, line_base: int, name: str, runs: _Runs) -> tuple[np.ndarray, np.ndarray, int]:
    """Keys, offsets (views of ``runs``' buffers) and the number of lines of the whole lines in
    ``buf[lo:hi]`` (``lo >= _SLACK``)."""
    runs.reserve((hi - lo) // 4 + 1)  # the shortest line is "0\t0\n"
    raw = np.frombuffer(buf, dtype=np.uint8)
    p, n = lo, 0
    while p < hi:  # fast path, a block of rows of one length at a time
        line = runs.line_at(buf, p, hi)
        if line is None:
            break
        length, tab = line
        b = min(_BLOCK, (hi - p) // length)
        rows = raw[p: p + b * length].reshape(b, length)
        sep = (rows[:, tab] == _TAB) & (rows[:, length - 1] == _LF)
        del rows
        if not sep.all():
            b = int(np.argmin(sep))  # >= 1: line_at checked the first row; the line length changes here
        if not runs.convert(buf, p, length, tab, b, n):  # a byte that is not a digit: the general path names the line
            break
        p += b * length
        n += b
    del raw  # no export of buf may outlive the call: the caller may grow it
    lines = n
    if p < hi:
        k, o = _general(buf, p, hi, line_base + lines, name)
        runs.keys[n: n + k.size] = k
        runs.offsets[n: n + o.size] = o
        n += k.size
        lines += buf.count(b"\n", p, hi)
    return runs.keys[:n], runs.offsets[:n], lines


def _chunks(readinto: Callable[[memoryview], int], name: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    buf = bytearray(_SLACK + _CHUNK)
    runs = _Runs()
    filled, line_base, seen = 0, 0, 0
    while True:
        if _SLACK + filled == len(buf):  # one line longer than the buffer
            buf.extend(bytes(len(buf)))
        got = readinto(memoryview(buf)[_SLACK + filled:])
        end = _SLACK + filled + got
        cut = end if got == 0 else buf.rfind(b"\n", _SLACK, end) + 1
        if cut > _SLACK:
            keys, offsets, lines = _lines(buf, _SLACK, cut, line_base, name, runs)
            line_base += lines
            seen += keys.size
            if keys.size:
                yield keys, offsets
            del keys, offsets
        if got == 0:
            break
        filled = max(end - cut, 0) if cut > _SLACK else end - _SLACK
        if cut > _SLACK:
            buf[_SLACK: _SLACK + filled] = buf[cut:end]
    if not seen:
        raise RecordIOError(f"{name}: the index is empty (no 'key<TAB>offset' lines)")


def iter_idx(path: str | os.PathLike, name: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(keys, offsets)`` int64 arrays of consecutive blocks of lines of the file ``path``, in line
    order (``name``: the file as messages show it). The arrays are buffers the next block reuses:
    copy what you keep."""
    with open(path, "rb", buffering=0) as f:
        yield from _chunks(f.readinto, name)


def parse_idx(text: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, offsets)`` int64 arrays of ``text`` in line order; :class:`RecordIOError` names the bad line."""
    parts = [(k.copy(), o.copy()) for k, o in _chunks(io.BytesIO(text).readinto, name)]
    return np.concatenate([k for k, _ in parts]), np.concatenate([o for _, o in parts])
