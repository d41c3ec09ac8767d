"""The files of one face set under its root (a local folder or a URL), resolved once and handed down.

``data.root`` is turned into a :class:`SetFiles` in one place (:meth:`SetFiles.at`): the paths or
URLs of ``train.rec``, ``train.idx``, ``property`` and the verification ``.bin`` files, whether they
are remote, and the checked remote options. Everything that reads the set --
:class:`~facemargin.data.sources.recordio.FaceRecordSet` (its ``peek`` and its index cache), the
DataModule, ``inspect`` -- receives this object instead of the root, so no module joins the root
with a file name again or decides local-vs-remote again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..storage.cache import cached_copy
from ..storage.source import ByteSource, is_remote, open_source, remote_options
from .faceset import read_property
from .stamped import cache_dir_for, file_stamp, text_stamp

__all__ = ["SetFiles"]

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass(frozen=True)
class SetFiles:
    """Where the files of one set are. Build it with :meth:`at`.

    Attributes: ``root`` (an expanded local ``Path`` or a URL ``str``), ``rec``, ``idx``,
    ``property`` (paths or URLs under ``root``), ``remote`` (checked options of
    :func:`~facemargin.data.storage.source.open_source` for URLs under ``root``; ``{}`` when local),
    ``options`` (the remote options as configured, for URLs elsewhere).
    """

    root: Path | str
    rec: Path | str
    idx: Path | str
    property: Path | str
    remote: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def at(cls, root: str | os.PathLike, remote: Mapping[str, Any] | None = None, name: str = "train") -> "SetFiles":
        """The set under ``root`` (``name``: base name of the record files). ``remote`` is checked
        now (an unknown key raises ``ValueError`` before any file is read); nothing is opened."""
        checked = remote_options(root, remote)
        base: Path | str = str(root) if is_remote(root) else Path(root).expanduser()
        return cls(base, _under(base, f"{name}.rec"), _under(base, f"{name}.idx"), _under(base, "property"),
                   checked, dict(remote or {}))

    @property
    def is_remote(self) -> bool:
        return isinstance(self.root, str)

    # ---- verification files
    def verification_file(self, v: str | os.PathLike) -> Path | str:
        """A verification set: a URL, a local file, or a name / relative path inside ``root``
        (``"lfw"`` -> ``root/lfw.bin``)."""
        if is_remote(v):
            return str(v)
        p = Path(v).expanduser()
        if self.is_remote and not (p.is_absolute() or p.is_file()):  # inside the remote set
            name = p.as_posix()
            return _under(self.root, name if p.suffix == ".bin" else name + ".bin")
        if p.suffix == ".bin" or p.is_file() or len(p.parts) > 1:
            return p if p.is_absolute() or p.is_file() else _under(self.root, str(p))
        return _under(self.root, f"{p}.bin")

    def fetch(self, path: str | os.PathLike) -> Path:
        """A local path with the bytes of ``path`` (a URL is downloaded once, with the remote options)."""
        return cached_copy(path, **remote_options(path, self.options))

    # ---- the RecordIO files
    def refuse_image_folder(self) -> None:
        """A folder of identity sub-folders given where a RecordIO set is expected: say what to do."""
        root = self.root
        if self.is_remote or not Path(root).is_dir() or Path(self.idx).exists() or Path(self.rec).exists():
            return
        folders = [p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")]
        with_images = [f for f in folders[:50] if any(c.suffix.lower() in _IMAGE_SUFFIXES for c in f.iterdir())]
        if with_images:
            raise FileNotFoundError(
                f"{root} is an image folder ({len(folders)} identity sub-folders), not a RecordIO set "
                f"(no {Path(self.rec).name} / {Path(self.idx).name}). Train from it directly with "
                f"data=folder data.root={root}, or pack it once for faster reads with "
                f"python -m facemargin.data.pack {root} OUT_DIR and use data.root=OUT_DIR"
            )

    @property
    def subset_marker(self) -> Path | str:
        """``<idx>.subset``: present when the ``.idx`` lists a subset of the ``.rec``'s records on purpose
        (what ``facemargin.clean`` writes): then records no line points at are skipped, not refused."""
        return Path(f"{self.idx}.subset") if isinstance(self.idx, Path) else f"{self.idx}.subset"

    def lists_subset(self) -> bool:
        """Whether :attr:`subset_marker` exists (a remote one is asked for once)."""
        if not self.is_remote:
            return Path(self.subset_marker).is_file()
        try:
            return Path(cached_copy(self.subset_marker, **self.remote)).is_file()
        except OSError:  # absent (404) or unreachable: a full index, whose gaps are errors
            return False

    def has_property(self) -> bool:
        """Whether the set has a ``property`` file (a remote one is assumed; reading it tells)."""
        return self.is_remote or Path(self.property).is_file()

    def read_property(self) -> tuple[int, int, int]:
        """``(num_classes, height, width)`` from ``property`` (see :func:`~facemargin.data.formats.faceset.read_property`)."""
        return read_property(self.property, **self.remote)

    def local_index(self) -> Path:
        """The ``.idx`` as a local file (a remote one is downloaded once into the cache)."""
        local = Path(cached_copy(self.idx, **self.remote))
        if not local.is_file():
            raise FileNotFoundError(f"RecordIO index not found: {self.idx}")
        return local

    def open_rec(self) -> ByteSource:
        """The ``.rec`` as a :class:`~facemargin.data.storage.source.ByteSource`."""
        try:
            return open_source(self.rec, **self.remote)
        except FileNotFoundError:
            raise FileNotFoundError(f"RecordIO file not found: {self.rec}") from None

    # ---- caches derived from the index
    @staticmethod
    def cache_file(local_index: Path, kind: str) -> Path:
        """Where a cache of ``kind`` (``"facemargin"``: the index and layout, ``"labels"``: an im2rec
        set's label table) derived from ``local_index`` lives: next to it when writable, else under
        ``$FACEMARGIN_CACHE``."""
        return cache_dir_for(local_index) / f"{local_index.name}.{kind}.npy"

    def stamp(self, source: ByteSource, local_index: Path) -> list[int]:
        """What the caches are keyed on: anything that changes with either file.

        The ``.idx``'s stat (size, ``mtime_ns``, inode, ``ctime_ns``; a remote one's local copy is
        fetched again, into a new file, when it changes) and the ``.rec``'s: its stat when local
        (an edit in place changes its ctime, ``cp -p`` / ``rsync -t`` its inode), else its size, its
        validators (ETag / Last-Modified, as ``source.version`` reports them) and a hash of 16 sampled
        64-byte reads (for servers that send no validator).
        """
        index = file_stamp(local_index)
        if not self.is_remote:
            return [*index, *file_stamp(self.rec)]
        size = source.size
        samples = source.pread_many([(64, (size * k // 16) & ~3) for k in range(16)])
        return [*index, size, text_stamp(str(getattr(source, "version", ""))), text_stamp(b"".join(samples))]


def _under(root: Path | str, name: str) -> Path | str:
    """``root/name``: the one place a set's root is joined with a file name."""
    return f"{root.rstrip('/')}/{name}" if isinstance(root, str) else root / name
