"""Write a face set (``train.rec``, ``train.idx``, ``property``) in the insightface layout, all or nothing.

Key 0 is the meta record (labels ``(a, b)``, ``a = 1 + num_images``, ``b = a + C``), images are
keys ``1 .. a-1`` with their identity as label, identity ``c`` is key ``a + c`` with labels
``(first_key, last_key + 1)``. The files are written under temporary names in the output folder
and renamed at the end (``train.rec`` last): an error leaves no partial set behind and an old set
untouched. They get the permissions any new file gets under the process's umask (``0644`` under
umask ``022``), not the ``0600`` of a temporary file. A write that fails -- a full disk, a file
size limit -- names the set's file it was writing, not a temporary one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..formats.image import CorruptImageError, declared_size
from ..formats.recordio import IRHeader, RecordIOWriter, pack_record

__all__ = ["new_file_mode", "write_faceset"]

_MAX_EXACT_KEY = 1 << 24  # float32 labels hold integer keys exactly only below 2**24
SET_FILES = ("train.rec", "train.idx", "property")


def new_file_mode() -> int:
    """The permissions an ordinary new file gets under the process's umask (``0644`` under ``022``)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def temporary_files(out: Path, names: Sequence[str]) -> Iterator[dict[str, Path]]:
    """``{name: temporary path in out}``; on exit the temporaries that were not renamed are removed,
    and an ``OSError`` naming a temporary is raised again naming ``out / name`` instead."""
    tmp: dict[str, Path] = {}
    try:
        for name in names:
            fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=out)
            os.close(fd)
            tmp[name] = Path(path)
        yield tmp
    except OSError as exc:
        final = next((out / name for name, path in tmp.items() if exc.filename in (str(path), path)), None)
        if final is None or exc.errno is None:
            raise
        raise OSError(exc.errno, f"cannot write {final}: {exc.strerror}; nothing was written") from None
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)


def publish(out: Path, files: dict[str, Path]) -> None:
    """Rename finished temporaries to their final names (``train.rec`` last: readers look for it),
    with the umask's permissions (``mkstemp`` creates them ``0600``: readable by their owner only)."""
    mode = new_file_mode()
    for final in sorted(files, key=lambda name: name == "train.rec"):
        os.chmod(files[final], mode)
        os.replace(files[final], out / final)


def _size_of(data: bytes, key: int) -> tuple[int, int]:
    try:
        return declared_size(data)
    except CorruptImageError as exc:
        raise ValueError(f"cannot read image {key}: {exc}") from None


def write_faceset(
    out_dir: str | os.PathLike,
    labels: Sequence[int],
    images: Iterable[bytes],
    num_classes: int,
    image_size: tuple[int, int] | None,
    progress: bool = False,
) -> Path:
    """Write ``train.rec/.idx/property`` in the insightface layout, under temporary names renamed at the end.

    ``labels`` (known up front, sorted, every class ``0 .. num_classes-1`` present) gives the
    identity of each image; ``images`` yields the encoded bytes in the same order (may be lazy; an
    exception it raises aborts the write and removes the temporaries). ``image_size=None`` reads
    the size from the first image's header.
    """
    out = Path(out_dir)
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = int(lab.size)
    if n == 0:
        raise ValueError("write_faceset: no images")
    if np.any(np.diff(lab) < 0) or lab[0] != 0 or lab[-1] != num_classes - 1 or np.any(np.diff(lab) > 1):
        raise ValueError("write_faceset: labels must be sorted and cover every class 0 .. num_classes-1")
    a, b = 1 + n, 1 + n + num_classes
    if b > _MAX_EXACT_KEY:
        raise ValueError(f"write_faceset: {n} images + {num_classes} classes exceed 2**24 keys (float32 labels)")
    starts = np.searchsorted(lab, np.arange(num_classes), side="left") + 1
    ends = np.searchsorted(lab, np.arange(num_classes), side="right") + 1
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="img", desc=f"packing {out}")
    try:
        with temporary_files(out, SET_FILES) as tmp:
            with RecordIOWriter(tmp["train.rec"], tmp["train.idx"]) as writer:
                writer.write(0, pack_record(IRHeader(0, 0.0, 0, 0), b"", labels=[a, b]))
                count = 0
                for key, (label, data) in enumerate(zip(lab.tolist(), images), start=1):
                    if image_size is None:
                        image_size = _size_of(data, key)
                    writer.write_image(key, float(label), data)
                    count += 1
                    if bar is not None:
                        bar.update(1)
                if count != n:
                    raise ValueError(f"write_faceset: {n} labels but {count} images")
                for c in range(num_classes):
                    writer.write(a + c, pack_record(IRHeader(0, 0.0, a + c, 0), b"", labels=[starts[c], ends[c]]))
            assert image_size is not None
            with open(tmp["property"], "w", encoding="ascii") as f:
                try:
                    f.write(f"{num_classes},{image_size[0]},{image_size[1]}")
                    f.flush()
                except OSError as exc:
                    raise OSError(exc.errno, exc.strerror, str(tmp["property"])) from None
            publish(out, tmp)
    finally:
        if bar is not None:
            bar.close()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    return out
