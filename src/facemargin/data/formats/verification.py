"""Verification pair files, read safely: insightface ``.bin`` and LFW-style ``pairs.txt``.

A ``.bin`` is a pickle of ``(list_of_encoded_images, list_of_issame_bools)``; pair ``i`` is images
``2i`` and ``2i+1``. It is never loaded with plain ``pickle.load``: :func:`load_bin` uses an
unpickler that refuses every global (class, function, ``__reduce__`` target) except stand-ins for
the constructors such a file needs, which only type-check and convert what the file holds:

* ``_codecs.encode(str, 'latin1')``, ``bytearray(...)``, ``bytes()`` (protocol-2 ``bytes``);
* ``numpy.core.multiarray._reconstruct`` (also ``numpy._core``), ``numpy.ndarray`` and
  ``numpy.dtype``: insightface's own files store each image as a numpy ``uint8`` array of its
  encoded bytes. The stand-ins accept exactly a 1-D or ``(n, 1)`` ``uint8`` array whose raw data
  is in the file and return its bytes; numpy itself is never called.

Memory is bounded by what the loaded images really take, never by how often they are referenced:

* before unpickling, every size the pickle declares (a string, bytes, a frame) is checked against
  the bytes that follow it in the file, so a 20-byte file declaring a 2^62-byte string is refused
  with a message, not a ``MemoryError`` (the C unpickler allocates a declared size before reading);
* stand-ins may create at most twice as many bytes as the file holds (protocol 2 encodes a
  string, then copies it into a bytearray): a pickle that rebuilds a new image from one memoised
  string 20 000 times is refused while unpickling;
* an image object referenced many times (pickle's memo: deduplicating writers store each distinct
  image once, e.g. 300 pairs over 216 images) is one object in memory, referenced from the list,
  never copied per reference. The images then take at most what the file's distinct images take,
  plus one pointer per reference (a reference costs at least two bytes of the file).

Images of one file must all have the same size (read from the JPEG/PNG headers at load time).
Every problem raises :class:`VerificationFileError` naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from ...errors import UserError
from ..storage.cache import cached_copy

__all__ = ["VerificationFileError", "encoded_image_size", "load_bin", "read_pairs_txt", "write_bin"]


class VerificationFileError(UserError, ValueError):
    """A verification ``.bin`` that cannot be read as one: the message names the file."""


class _Budget:
    """Bytes the stand-ins may still create while one file is unpickled."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self, n: int, what: str) -> None:
        self.left -= n
        if self.left < 0:
            raise pickle.UnpicklingError(
                f"{what} would create more than twice the bytes the file holds (repeated references to one object?)"
            )


def _latin1_encode(budget: _Budget, text: object, encoding: object = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed as encode(str, 'latin1')")
    budget.take(len(text), "_codecs.encode")
    return text.encode("latin1")


def _safe_bytearray(budget: _Budget, data: object = b"", encoding: object = None) -> bytearray:
    if isinstance(data, (bytes, bytearray)) and encoding is None:
        budget.take(len(data), "bytearray")
        return bytearray(data)
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
        budget.take(len(data), "bytearray")
        return bytearray(data.encode("latin1"))
    raise pickle.UnpicklingError("bytearray is only allowed from bytes or (str, 'latin1')")


def _safe_bytes(budget: _Budget, data: object = b"") -> bytes:
    if isinstance(data, (bytes, bytearray)):
        budget.take(len(data), "bytes")
        return bytes(data)
    raise pickle.UnpicklingError("bytes is only allowed from bytes")


def _text(value: object) -> object:
    """Python 2 pickles read with ``encoding='bytes'`` give their ``str`` as bytes."""
    return value.decode("latin1") if isinstance(value, bytes) else value


class _NdarrayClass:
    """What ``numpy.ndarray`` resolves to: only a marker for ``_reconstruct``'s first argument."""


class _Uint8Dtype:
    """What ``numpy.dtype('u1', False, True)`` resolves to; its pickled state must be plain uint8."""

    def __setstate__(self, state: object) -> None:
        if not (
            isinstance(state, tuple) and len(state) == 8 and state[0] in (3, 4) and _text(state[1]) == "|"
            and state[2:5] == (None, None, None) and state[5:7] == (-1, -1) and state[7] == 0
        ):
            raise pickle.UnpicklingError(f"numpy.dtype state {state!r} is not plain uint8")


def _dtype(obj: object, align: object = False, copy: object = True) -> _Uint8Dtype:
    if _text(obj) != "u1" or align not in (False, 0) or copy not in (True, 1):
        raise pickle.UnpicklingError(f"numpy.dtype{(obj, align, copy)!r} refused: only uint8 ('u1') arrays are allowed")
    return _Uint8Dtype()


class _Uint8Array:
    """What ``_reconstruct`` returns; ``__setstate__`` (pickle's BUILD) checks and keeps the raw bytes."""

    data: bytes | bytearray | None = None

    def __setstate__(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise pickle.UnpicklingError("numpy array state is not (1, shape, dtype, fortran, data)")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _Uint8Dtype):
            raise pickle.UnpicklingError("numpy array dtype is not uint8")
        ok_shape = isinstance(shape, tuple) and all(type(s) is int and s >= 0 for s in shape) and (
            len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)
        )
        if not ok_shape:
            raise pickle.UnpicklingError(f"numpy array of shape {shape!r} refused: only 1-D or (n, 1) uint8 arrays")
        if fortran not in (True, False, 0, 1) or not isinstance(raw, (bytes, bytearray)) or len(raw) != shape[0]:
            raise pickle.UnpicklingError(f"numpy array data is not {shape[0]} raw bytes")
        self.data = raw  # no copy here: load_bin bounds the total before converting


def _reconstruct(subtype: object, shape: object, typecode: object) -> _Uint8Array:
    if subtype is not _NdarrayClass or shape not in ((0,), [0]) or _text(typecode) != "b":
        raise pickle.UnpicklingError("numpy _reconstruct is only allowed as _reconstruct(ndarray, (0,), b'b')")
    return _Uint8Array()


_NUMPY = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NdarrayClass,
    ("numpy", "dtype"): _dtype,
}
_BYTES = {
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytearray"): _safe_bytearray,
    ("__builtin__", "bytearray"): _safe_bytearray,
    ("builtins", "bytes"): _safe_bytes,
    ("__builtin__", "bytes"): _safe_bytes,
}


class _BinUnpickler(pickle.Unpickler):
    """Admits bytes, bytearrays, uint8 arrays of encoded bytes, strings, numbers, bools, lists, tuples."""

    def __init__(self, data: bytes) -> None:
        # encoding="bytes": python2 ``str`` objects (old insightface files) load as bytes.
        super().__init__(io.BytesIO(data), encoding="bytes")
        # protocol 2 builds a bytearray from a string it first encodes: two stand-in calls per object
        self.budget = _Budget(2 * len(data))

    def find_class(self, module: str, name: str):  # noqa: D102 - see class docstring
        module, name = _text(module), _text(name)
        if (module, name) in _NUMPY:
            return _NUMPY[(module, name)]
        if (module, name) in _BYTES:
            stand_in = _BYTES[(module, name)]
            return lambda *args: stand_in(self.budget, *args)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid):  # noqa: D102
        raise pickle.UnpicklingError("refused persistent id")


def _fail(path: str, why: str) -> VerificationFileError:
    return VerificationFileError(f"{path}: not a valid insightface verification .bin: {why}")


#: how a counted argument declares its size: (bytes of the count, struct format)
_COUNTS = {
    pickletools.TAKEN_FROM_ARGUMENT1: (1, "<B"),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, "<i"),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, "<I"),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, "<Q"),
}


def _check_declared_sizes(data: bytes, name: str) -> None:
    """Walk the pickle's opcodes (nothing is built, nothing decoded): every counted argument (a
    string, bytes, a long, a frame) must fit in the bytes that follow it."""
    pos, end = 0, len(data)
    while pos < end:
        op = pickletools.code2op.get(chr(data[pos]))
        if op is None:
            raise _fail(name, f"byte {pos}: {data[pos]:#04x} is not a pickle opcode")
        at, pos = pos, pos + 1
        if op.name == "STOP" or op.arg is None:
            if op.name == "STOP":
                return
            continue
        n = op.arg.n
        if n >= 0:
            if op.name == "FRAME" and pos + 8 <= end:
                (size,) = struct.unpack_from("<Q", data, pos)
                if size > end - pos - 8:
                    raise _fail(name, f"byte {at}: a frame declares {size} bytes but only {end - pos - 8} follow in the "
                                      f"{end}-byte file (truncated or corrupt)")
            pos += n
        elif n == pickletools.UP_TO_NEWLINE:
            for _ in range(2 if op.arg.name.endswith("_pair") else 1):
                newline = data.find(b"\n", pos)
                if newline < 0:
                    raise _fail(name, f"byte {at}: {op.name} without the end of its line (truncated)")
                pos = newline + 1
        else:
            width, fmt = _COUNTS[n]
            if pos + width > end:
                break  # the unpickler reports the truncation
            (size,) = struct.unpack_from(fmt, data, pos)
            pos += width
            if size < 0 or size > end - pos:
                raise _fail(name, f"byte {at}: {op.name} declares {size} bytes but only {end - pos} follow in the "
                                  f"{end}-byte file (truncated or corrupt)")
            pos += size


def encoded_image_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` from a JPEG's SOF or a PNG's IHDR header; ``None`` if neither is readable."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return h, w
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            if i + 9 > len(data):
                return None
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return h, w
        if marker == 0xDA or length < 2:  # scan data before any frame header: not readable
            return None
        i += 2 + length
    return None


def check_same_size(images: Sequence[bytes], source: str, names: Sequence[str] | None = None) -> None:
    """Raise :class:`VerificationFileError` naming ``source`` and the first image whose header size differs.

    Images whose header is unreadable are left to the decoder (it names them when they are read).
    """
    first: tuple[int, tuple[int, int]] | None = None
    for i, data in enumerate(images):
        size = encoded_image_size(data)
        if size is None:
            continue
        if first is None:
            first = (i, size)
        elif size != first[1]:
            what = (lambda k: names[k]) if names is not None else (lambda k: f"image {k}")
            raise VerificationFileError(
                f"{source}: images differ in size: {what(i)} is {size[1]}x{size[0]} but {what(first[0])} is "
                f"{first[1][1]}x{first[1][0]} (width x height); every face of a verification set must be "
                "aligned to the same size"
            )


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """Read an insightface verification ``.bin``: ``(encoded images, issame bool array)``.

    Raises ``FileNotFoundError`` if missing and :class:`VerificationFileError` (a ``ValueError``)
    naming the file for anything that is not a ``(list of images, list of bools)`` pickle with
    ``2 * len(issame)`` images of one size, where an image is ``bytes`` or a 1-D ``uint8`` numpy
    array of encoded bytes. Images the pickle references several times are shared, not copied.
    """
    name = str(path)
    local = cached_copy(path)
    if not Path(local).is_file():
        raise FileNotFoundError(f"verification file not found: {name}")
    data = Path(local).read_bytes()
    if not data:
        raise _fail(name, "the file is empty (0 bytes)")
    _check_declared_sizes(data, name)
    try:
        obj = _BinUnpickler(data).load()
    except pickle.UnpicklingError as exc:
        raise _fail(name, str(exc)) from None
    except MemoryError:
        raise _fail(name, f"unpickling its {len(data)} bytes ran out of memory") from None
    except Exception as exc:  # truncated or garbage data: EOFError, struct/unicode/index errors...
        raise _fail(name, f"{type(exc).__name__}: {exc}") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise _fail(name, f"expected a pair (images, issame), got {type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise _fail(name, "images and issame must be lists")
    out_images: list[bytes] = []
    converted: dict[int, bytes] = {}  # id of a referenced object -> its bytes, converted once
    for i, im in enumerate(images):
        key = id(im)
        if key not in converted:
            if isinstance(im, _Uint8Array):
                if im.data is None:
                    raise _fail(name, f"image {i} is a numpy array without data")
                im = im.data
            if not isinstance(im, (bytes, bytearray)):
                raise _fail(name, f"image {i} is {type(im).__name__}, expected bytes")
            converted[key] = im if type(im) is bytes else bytes(im)
        out_images.append(converted[key])  # a reference repeated by the pickle's memo stays one object
    flags = np.zeros(len(issame), dtype=bool)
    for i, v in enumerate(issame):
        if isinstance(v, bool) or (type(v) is int and v in (0, 1)):
            flags[i] = bool(v)
        else:
            raise _fail(name, f"issame[{i}] is {v!r}, expected a bool")
    if len(out_images) != 2 * len(flags):
        raise _fail(name, f"{len(out_images)} images for {len(flags)} pairs (expected {2 * len(flags)})")
    check_same_size(out_images, name)
    return out_images, flags


def write_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool] | np.ndarray) -> Path:
    """Write an insightface-compatible ``.bin`` (protocol-2 pickle of ``(list[bytes], list[bool])``).

    Every image is written out in full, even when the same object appears twice (no pickle memo),
    so :func:`load_bin` reads back any file written here.
    """
    path = Path(path)
    imgs = [bytes(im) for im in images]
    flags = [bool(x) for x in np.asarray(issame, dtype=bool).reshape(-1)]
    if len(imgs) != 2 * len(flags):
        raise ValueError(f"write_bin({path}): {len(imgs)} images for {len(flags)} pairs (expected {2 * len(flags)})")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickler = pickle.Pickler(f, protocol=2)
        pickler.fast = True  # no memo: repeated images are stored, not referenced
        pickler.dump((imgs, flags))
    os.replace(tmp, path)
    return path


def read_pairs_txt(path: str | os.PathLike, root: str | os.PathLike, ext: str = ".jpg") -> tuple[list[Path], np.ndarray]:
    """``(image paths [2N], issame [N])`` from an LFW-style ``pairs.txt`` over the folder ``root``.

    Lines: ``name i j`` (same person: ``root/name/name_000i.jpg`` and ``..._000j.jpg``),
    ``name1 i name2 j`` (different people), or ``relpath1 relpath2 label`` (label 1 = same,
    0 = different; paths relative to ``root``). A first line of numbers only (LFW's
    ``folds pairs_per_fold``) and blank lines are skipped. Errors name the file and line.
    """
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    if not root.is_dir():
        raise FileNotFoundError(f"{path}: image folder not found: {root}")

    def lfw(person: str, number: str) -> Path:
        return root / person / f"{person}_{int(number):04d}{ext}"

    paths: list[Path] = []
    same: list[bool] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        f = line.split()
        if not f or (lineno == 1 and all(x.isdigit() for x in f)):
            continue
        if len(f) == 3 and f[1].isdigit() and f[2].isdigit():
            pair, is_same = (lfw(f[0], f[1]), lfw(f[0], f[2])), True
        elif len(f) == 4 and f[1].isdigit() and f[3].isdigit():
            pair, is_same = (lfw(f[0], f[1]), lfw(f[2], f[3])), False
        elif len(f) == 3 and f[2] in ("0", "1"):
            pair, is_same = (root / f[0], root / f[1]), f[2] == "1"
        else:
            raise ValueError(
                f"{path}:{lineno}: expected 'name i j', 'name1 i name2 j' or 'path1 path2 0|1', got {line!r}"
            )
        for p in pair:
            if not p.is_file():
                raise FileNotFoundError(f"{path}:{lineno}: image not found: {p}")
        paths += pair
        same.append(is_same)
    if not same:
        raise ValueError(f"{path}: no pairs")
    return paths, np.array(same, dtype=bool)
