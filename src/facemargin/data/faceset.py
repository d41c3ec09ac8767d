"""A face-recognition training set stored as ``train.rec`` / ``train.idx`` / ``property``.

Two layouts are recognised:

* **insightface**: record 0 is a meta record (``flag > 0``, no image) whose labels ``(a, b)``
  say images are keys ``1 .. a-1`` and per-identity ranges are keys ``a .. b-1``;
* **im2rec**: record 0 is an ordinary image (``flag == 0`` or it carries image bytes), so every key
  in the ``.idx`` is an image.

A sample's identity is its first label, cast to ``int`` here (RecordIO stores float32).
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from .recordio import RecordIOError, RecordIOReader, unpack_record

__all__ = ["FaceRecordSet", "read_property"]

_LABEL_CACHE_VERSION = 1
_HEAD_BYTES = 28  # IRHeader (24) + the first float32 label


def read_property(path: str | os.PathLike) -> tuple[int, int, int]:
    """Parse a ``property`` file: ``num_classes,height,width``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"property file not found: {path} (expected 'num_classes,height,width')")
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        fields = [int(x) for x in text.split(",")]
        if len(fields) != 3 or min(fields) <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,height,width' with positive integers, got {text[:80]!r}") from None
    return fields[0], fields[1], fields[2]


class FaceRecordSet:
    """An insightface/im2rec RecordIO face set directory.

    Args:
        root: directory holding ``train.rec``, ``train.idx`` and ``property``.
        num_classes: override (or replace a missing) ``property`` class count.
        image_size: ``(h, w)`` override; needed only when ``property`` is missing
            (otherwise it is read from the first image's header).
        name: base name of the record files (``train``).

    Attributes: ``num_classes``, ``image_size``, ``image_keys`` (int64 array), ``layout``
    (``"insightface"`` or ``"im2rec"``), ``identity_range`` (``(a, b)`` or ``None``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        num_classes: int | None = None,
        image_size: tuple[int, int] | None = None,
        name: str = "train",
    ) -> None:
        self.root = Path(root)
        self.rec_path = self.root / f"{name}.rec"
        self.idx_path = self.root / f"{name}.idx"
        self.property_path = self.root / "property"
        self.reader = RecordIOReader(self.rec_path, self.idx_path)
        if self.property_path.is_file():
            prop_classes, h, w = read_property(self.property_path)
            self.num_classes = int(num_classes) if num_classes is not None else prop_classes
            self.image_size = tuple(image_size) if image_size is not None else (h, w)
        elif num_classes is not None:
            self.num_classes = int(num_classes)
            self.image_size = tuple(image_size) if image_size is not None else None
        else:
            raise FileNotFoundError(
                f"property file not found: {self.property_path} (expected 'num_classes,height,width'; "
                "or pass num_classes= explicitly)"
            )
        self.layout, self.image_keys, self.identity_range = self._detect_layout()
        if self.image_size is None:
            self.image_size = self._first_image_size()
        self._labels: np.ndarray | None = None

    # ---- layout
    def _detect_layout(self) -> tuple[str, np.ndarray, tuple[int, int] | None]:
        keys = self.reader.key_array
        if 0 in self.reader:
            header, labels, image = unpack_record(self.reader.read(0))
            if header.flag > 0 and len(image) == 0:
                a = _as_key(labels[0], self.rec_path, 0)
                b = _as_key(labels[1], self.rec_path, 0) if header.flag > 1 else None
                if a < 1:
                    raise RecordIOError(f"{self.rec_path} (key 0): meta record says images end at key {a}")
                image_keys = np.arange(1, a, dtype=np.int64)
                present = np.isin(image_keys, keys)
                if not present.all():
                    missing = int(image_keys[~present][0])
                    raise RecordIOError(
                        f"{self.idx_path}: meta record (key 0) lists image keys 1..{a - 1}, "
                        f"but key {missing} is absent from the index"
                    )
                return "insightface", image_keys, (a, b) if b is not None else None
        return "im2rec", np.array(keys, dtype=np.int64), None

    def _first_image_size(self) -> tuple[int, int] | None:
        if self.image_keys.size == 0:
            return None
        from PIL import Image  # local: only needed without a property file
        import io

        _, image = self.read(int(self.image_keys[0]))
        with Image.open(io.BytesIO(image)) as im:
            return (im.height, im.width)

    # ---- samples
    def __len__(self) -> int:
        return int(self.image_keys.size)

    def check_label(self, value: float, key: int) -> int:
        """Validate a stored float label of ``key``: an integer in ``[0, num_classes)``; returns it as int."""
        if not math.isfinite(value) or value != int(value):
            raise RecordIOError(f"{self.rec_path} (key {key}): label {value!r} is not an integer")
        label = int(value)
        if not 0 <= label < self.num_classes:
            raise RecordIOError(
                f"{self.rec_path} (key {key}): label {label} is outside [0, {self.num_classes}) "
                f"(num_classes from {self.property_path})"
            )
        return label

    _check_label = check_label  # older spelling, kept for callers

    def read(self, key: int) -> tuple[int, bytes]:
        """``(identity label, encoded image bytes)`` for the record under ``key``."""
        key = int(key)
        try:
            header, labels, image = unpack_record(self.reader.read(key))
        except RecordIOError:
            raise
        except ValueError as exc:
            raise RecordIOError(f"{self.rec_path} (key {key}): {exc}") from None
        value = float(labels) if header.flag == 0 else float(labels[0])
        return self.check_label(value, key), image

    def label(self, key: int) -> int:
        """Identity label of ``key`` (reads only the record header)."""
        key = int(key)
        return self.label_from_head(self.reader.read_head(key, _HEAD_BYTES), key)

    def label_from_head(self, head: bytes, key: int) -> int:
        """Identity label from the first 28 bytes of ``key``'s payload (validated)."""
        if len(head) < 24:
            raise RecordIOError(f"{self.rec_path} (key {key}): record payload truncated ({len(head)} bytes)")
        flag, value = struct.unpack_from("<If", head, 0)
        if flag > 0:
            if len(head) < _HEAD_BYTES:
                raise RecordIOError(f"{self.rec_path} (key {key}): record payload truncated ({len(head)} bytes)")
            (value,) = struct.unpack_from("<f", head, 24)
        return self.check_label(float(value), key)

    # ---- label table
    @property
    def labels_cache_path(self) -> Path:
        """Where :meth:`labels` caches the label table."""
        return self.idx_path.with_name(self.idx_path.name + ".labels.npz")

    def _stamp(self) -> np.ndarray:
        idx, rec = self.idx_path.stat(), self.rec_path.stat()
        return np.array(
            [_LABEL_CACHE_VERSION, idx.st_size, idx.st_mtime_ns, rec.st_size, rec.st_mtime_ns, self.num_classes],
            dtype=np.int64,
        )

    def _load_cached_labels(self, stamp: np.ndarray) -> np.ndarray | None:
        try:
            with np.load(self.labels_cache_path, allow_pickle=False) as z:
                if np.array_equal(z["stamp"], stamp) and np.array_equal(z["keys"], self.image_keys):
                    return z["labels"].astype(np.int64)
        except (OSError, KeyError, ValueError):
            pass
        return None

    def _save_cached_labels(self, stamp: np.ndarray, labels: np.ndarray) -> None:
        try:
            fd, tmp = tempfile.mkstemp(prefix=self.labels_cache_path.name, suffix=".tmp", dir=self.root)
        except OSError:
            return  # read-only directory: keep the table in memory only
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, stamp=stamp, keys=self.image_keys, labels=labels)
            os.replace(tmp, self.labels_cache_path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def labels(self) -> np.ndarray:
        """Identity label of every image key (int64, aligned with ``image_keys``).

        Read from the record headers once, then cached in memory and in
        ``train.idx.labels.npz`` next to the index (validated by the .idx/.rec sizes and mtimes).
        """
        if self._labels is not None:
            return self._labels
        stamp = self._stamp()
        labels = self._load_cached_labels(stamp)
        if labels is None:
            labels = np.fromiter((self.label(k) for k in self.image_keys.tolist()), dtype=np.int64, count=len(self))
            self._save_cached_labels(stamp, labels)
        self._labels = labels
        return labels

    def __getstate__(self) -> dict:
        return self.__dict__.copy()

    def __repr__(self) -> str:
        return (
            f"FaceRecordSet({str(self.root)!r}, images={len(self)}, num_classes={self.num_classes}, "
            f"image_size={self.image_size}, layout={self.layout!r})"
        )


def _as_key(value: float, rec_path: Path, key: int) -> int:
    value = float(value)
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise RecordIOError(f"{rec_path} (key {key}): meta label {value!r} is not a valid key")
    return int(value)
