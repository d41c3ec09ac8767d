"""insightface verification ``.bin`` files, read safely.

A ``.bin`` is a pickle of ``(list_of_encoded_images, list_of_issame_bools)``; pair ``i`` is images
``2i`` and ``2i+1``. It is never loaded with plain ``pickle.load``: :func:`load_bin` uses an
unpickler that refuses every global (class, function, ``__reduce__`` target), except three
stand-ins for the data constructors a protocol-2 pickle of ``bytes``/``bytearray`` needs
(``_codecs.encode(str, 'latin1')``, ``bytearray(...)``, ``bytes()``). The stand-ins only
type-check and convert strings; nothing from the file is ever executed.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["load_bin", "write_bin"]


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed as encode(str, 'latin1')")
    return text.encode("latin1")


def _safe_bytearray(data: object = b"", encoding: object = None) -> bytearray:
    if isinstance(data, (bytes, bytearray)) and encoding is None:
        return bytearray(data)
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
        return bytearray(data.encode("latin1"))
    raise pickle.UnpicklingError("bytearray is only allowed from bytes or (str, 'latin1')")


def _safe_bytes(data: object = b"") -> bytes:
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    raise pickle.UnpicklingError("bytes is only allowed from bytes")


_ALLOWED = {
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytearray"): _safe_bytearray,
    ("__builtin__", "bytearray"): _safe_bytearray,
    ("builtins", "bytes"): _safe_bytes,
    ("__builtin__", "bytes"): _safe_bytes,
}


class _BinUnpickler(pickle.Unpickler):
    """Unpickler that admits only bytes, bytearrays, strings, numbers, bools, lists and tuples."""

    def find_class(self, module: str, name: str):  # noqa: D102 - see class docstring
        if isinstance(module, bytes):
            module = module.decode("latin1")
        if isinstance(name, bytes):
            name = name.decode("latin1")
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None

    def persistent_load(self, pid):  # noqa: D102
        raise pickle.UnpicklingError("refused persistent id")


def _fail(path: Path, why: str) -> ValueError:
    return ValueError(f"{path}: not a valid insightface verification .bin: {why}")


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """Read an insightface verification ``.bin``: ``(encoded images, issame bool array)``.

    Raises ``FileNotFoundError`` if missing and ``ValueError`` naming the file for anything that
    is not a ``(list of bytes, list of bools)`` pickle with ``2 * len(issame)`` images.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification file not found: {path}")
    data = path.read_bytes()
    try:
        # encoding="bytes": python2 ``str`` objects (old insightface files) load as bytes.
        obj = _BinUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise _fail(path, str(exc)) from None
    except Exception as exc:  # truncated or garbage data: EOFError, struct/unicode/index errors...
        raise _fail(path, f"{type(exc).__name__}: {exc}") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise _fail(path, f"expected a pair (images, issame), got {type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise _fail(path, "images and issame must be lists")
    out_images: list[bytes] = []
    for i, im in enumerate(images):
        if not isinstance(im, (bytes, bytearray)):
            raise _fail(path, f"image {i} is {type(im).__name__}, expected bytes")
        out_images.append(bytes(im))
    flags = np.zeros(len(issame), dtype=bool)
    for i, v in enumerate(issame):
        if isinstance(v, bool) or (type(v) is int and v in (0, 1)):
            flags[i] = bool(v)
        else:
            raise _fail(path, f"issame[{i}] is {v!r}, expected a bool")
    if len(out_images) != 2 * len(flags):
        raise _fail(path, f"{len(out_images)} images for {len(flags)} pairs (expected {2 * len(flags)})")
    return out_images, flags


def write_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool] | np.ndarray) -> Path:
    """Write an insightface-compatible ``.bin`` (protocol-2 pickle of ``(list[bytes], list[bool])``)."""
    path = Path(path)
    imgs = [bytes(im) for im in images]
    flags = [bool(x) for x in np.asarray(issame, dtype=bool).reshape(-1)]
    if len(imgs) != 2 * len(flags):
        raise ValueError(f"write_bin({path}): {len(imgs)} images for {len(flags)} pairs (expected {2 * len(flags)})")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump((imgs, flags), f, protocol=2)
    os.replace(tmp, path)
    return path
