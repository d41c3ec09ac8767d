"""IJB-B / IJB-C in insightface's release layout: reading and cross-checking the meta files.

``root`` is one set's folder of insightface's ``IJB_release`` (``IJB_release/IJBC``)::

    root/loose_crop/<image>                      the face crops (any size), e.g. 1.jpg
    root/meta/ijbc_name_5pts_score.txt           <image> x1 y1 ... x5 y5 <faceness score>   (one line per image)
    root/meta/ijbc_face_tid_mid.txt              <image> <template id> <media id>           (same lines, same order)
    root/meta/ijbc_template_pair_label.txt       <template id> <template id> <1 same | 0 different>
    root/meta/ijbc_1N_gallery_G1.csv, _G2.csv    1:N galleries (IJB-B: ijbb_1N_gallery_S1.csv, _S2.csv)
    root/meta/ijbc_1N_probe_mixed.csv            1:N probes; CSVs: a header, then TEMPLATE_ID,SUBJECT_ID,...

Everything is checked when it is read, and every error names the file (and line where there is
one): landmarks and faceness scores must be finite, faceness ``>= 0``; image names stay inside
``loose_crop/`` (no absolute path, no ``..``; symbolic links must resolve inside it: checked by
:func:`image_identity` before any image is read); the CSVs need their header line.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import numpy as np

from ..errors import UserError
from .base import stat_key

__all__ = ["IJBMeta", "IJBMetaError", "image_identity", "read_ijb_meta"]

GALLERIES = {"IJBB": ("S1", "S2"), "IJBC": ("G1", "G2")}


@dataclass
class IJBMeta:
    """The parsed meta files of one IJB set (arrays have one row per image unless said otherwise)."""

    root: Path
    target: str  # "IJBB" or "IJBC"
    names: list[str]
    landmarks: np.ndarray  # [N, 5, 2] float32, loose-crop pixels
    faceness: np.ndarray  # [N] float32
    templates: np.ndarray  # [N] int64
    medias: np.ndarray  # [N] int64
    pairs: np.ndarray  # [P, 3] int64: template, template, label
    galleries: list[tuple[np.ndarray, np.ndarray]]  # per gallery file: (template ids, subject ids) per row
    probes: tuple[np.ndarray, np.ndarray] | None  # (template ids, subject ids) per row, or None
    files: list[Path]  # the meta files read
    lines: list[int]  # per image: its line in the landmark file (for messages)
    meta_digest: str  # hash of the meta files' bytes (cache identity)


class IJBMetaError(UserError, ValueError):
    """An IJB meta file (or the images it lists) is malformed: the message names the file and line."""


def _read(path: Path, digest: "hashlib._Hash") -> str:
    """The text of a meta file; its bytes go into ``digest`` (the set's cache identity)."""
    if not path.is_file():
        raise FileNotFoundError(f"IJB meta file not found: {path}")
    data = path.read_bytes()
    digest.update(f"{path.name}\0{len(data)}\0".encode())
    digest.update(data)
    return data.decode("utf-8", errors="replace")


def _lines(path: Path, digest: "hashlib._Hash") -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of every non-blank line."""
    return [(n, line.split()) for n, line in enumerate(_read(path, digest).splitlines(), start=1) if line.strip()]


def _ints(path: Path, columns: int, digest: "hashlib._Hash", delimiter: str | None = None, csv: bool = False) -> np.ndarray:
    """The first ``columns`` integer columns of a text table (``np.loadtxt``: fast on 15 M lines).

    ``csv``: insightface's 1:N CSVs, whose first line is a header (``TEMPLATE_ID,SUBJECT_ID,...``);
    a file without one is refused (its first template would be skipped). The file is hashed in
    blocks into ``digest`` (IJB-C's pair list is ~200 MB: never held twice).
    """
    if not path.is_file():
        raise FileNotFoundError(f"IJB meta file not found: {path}")
    digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        first = fh.readline().decode("utf-8", errors="replace").strip()
        fh.seek(0)
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if csv:
        head = first.split(delimiter or None)[0].strip() if first else ""
        if not first or head.lstrip("+-").isdigit():
            raise IJBMetaError(
                f"{path}:1: expected the header line 'TEMPLATE_ID,SUBJECT_ID,...', got {first!r}: insightface's 1:N "
                "CSVs start with one (reading this file would skip its first template)"
            )
    try:
        table = np.loadtxt(path, dtype=np.int64, delimiter=delimiter, skiprows=1 if csv else 0,
                           usecols=range(columns), ndmin=2)
    except ValueError as exc:
        raise IJBMetaError(f"{path}: expected {columns} integer columns: {exc}") from None
    return table


def _name_error(name: str) -> str | None:
    """Why an image name would leave ``loose_crop/`` (``None``: it stays inside)."""
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or os.path.isabs(name):
        return "an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "a '..' component"
    return None


def _landmark_rows(path: Path, rows: list[tuple[int, list[str]]]) -> np.ndarray:
    """``[N, 11]`` float32 (10 landmark coordinates, faceness) from checked lines; errors name the line."""
    for lineno, f in rows:
        if len(f) != 12:
            raise IJBMetaError(f"{path}:{lineno}: expected '<image> x1 y1 ... x5 y5 <score>' (12 fields), got {len(f)}")
        why = _name_error(f[0])
        if why:
            raise IJBMetaError(f"{path}:{lineno}: image name {f[0]!r} is {why}: IJB image names are relative to loose_crop/")
    try:
        values = np.array([f[1:] for _, f in rows], dtype=np.float32).reshape(-1, 11)
    except ValueError:
        for lineno, f in rows:  # find the line (rare: only on a malformed file)
            try:
                [float(v) for v in f[1:]]
            except ValueError as exc:
                raise IJBMetaError(f"{path}:{lineno}: landmarks and score must be numbers: {exc}") from None
        raise
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if bad.size:
        lineno, f = rows[int(bad[0])]
        raise IJBMetaError(f"{path}:{lineno}: landmarks and score must be finite numbers, got {' '.join(f[1:])!r} "
                           f"({bad.size} such line(s))")
    negative = np.flatnonzero(values[:, 10] < 0)
    if negative.size:
        lineno, f = rows[int(negative[0])]
        raise IJBMetaError(f"{path}:{lineno}: faceness score {f[11]} is negative: it weights the face's feature and "
                           f"must be >= 0 (insightface's detector scores are in [0, 1]; {negative.size} such line(s))")
    return values


def read_ijb_meta(root: str | os.PathLike, target: str = "IJBC") -> IJBMeta:
    """Read and cross-check one IJB set's meta files (see the module docstring)."""
    target = target.upper()
    if target not in GALLERIES:
        raise ValueError(f"IJB target must be IJBB or IJBC, got {target!r}")
    root = Path(root)
    if not (root / "meta").is_dir():
        raise FileNotFoundError(f"{root}: no meta/ folder: expected insightface's IJB_release/{target} layout")
    digest = hashlib.blake2b(digest_size=20)

    def meta_path(kind: str) -> Path:
        return root / "meta" / f"{target.lower()}_{kind}"

    lmk_path = meta_path("name_5pts_score.txt")
    rows = _lines(lmk_path, digest)
    values = _landmark_rows(lmk_path, rows)
    names = [f[0] for _, f in rows]

    tid_path = meta_path("face_tid_mid.txt")
    tid_rows = _lines(tid_path, digest)
    if len(tid_rows) != len(rows):
        raise IJBMetaError(f"{tid_path}: {len(tid_rows)} lines but {lmk_path.name} has {len(rows)}; they list the same images")
    for (lineno, f), name in zip(tid_rows, names):
        if len(f) < 3 or f[0] != name or not (f[1].lstrip("-").isdigit() and f[2].lstrip("-").isdigit()):
            raise IJBMetaError(f"{tid_path}:{lineno}: expected '{name} <template id> <media id>', got {' '.join(f)!r}")
    templates = np.array([int(f[1]) for _, f in tid_rows], dtype=np.int64)
    known = np.unique(templates)

    pair_path = meta_path("template_pair_label.txt")
    pairs = _ints(pair_path, 3, digest)
    unknown = np.setdiff1d(pairs[:, :2], known)
    if unknown.size:
        raise IJBMetaError(f"{pair_path}: template ids {unknown[:5].tolist()} are not in {tid_path.name}")
    if not np.isin(pairs[:, 2], (0, 1)).all():
        raise IJBMetaError(f"{pair_path}: labels must be 0 or 1")
    files = [lmk_path, tid_path, pair_path]

    galleries: list[tuple[np.ndarray, np.ndarray]] = []
    probes = None
    probe_path = meta_path("1N_probe_mixed.csv")
    if probe_path.is_file():  # 1:N is optional
        for path in [*(meta_path(f"1N_gallery_{g}.csv") for g in GALLERIES[target]), probe_path]:
            table = _ints(path, 2, digest, delimiter=",", csv=True)
            missing = np.setdiff1d(table[:, 0], known)
            if missing.size:
                raise IJBMetaError(f"{path}: template ids {missing[:5].tolist()} are not in {tid_path.name}")
            files.append(path)
            if path == probe_path:
                probes = (table[:, 0], table[:, 1])
            else:
                galleries.append((table[:, 0], table[:, 1]))
    return IJBMeta(
        root=root, target=target, names=names, landmarks=values[:, :10].reshape(-1, 5, 2), faceness=values[:, 10],
        templates=templates, medias=np.array([int(f[2]) for _, f in tid_rows], dtype=np.int64), pairs=pairs,
        galleries=galleries, probes=probes, files=files, lines=[n for n, _ in rows], meta_digest=digest.hexdigest(),
    )


def image_identity(meta: IJBMeta) -> str:
    """A digest of every image's identity, checking that each stays inside ``loose_crop/``.

    The embedding cache must change when an image is replaced, but hashing IJB-C's ~470 000 images
    would read as many bytes as embedding them. Each image contributes its name and
    :func:`~facemargin.evaluation.base.stat_key` (size, mtime_ns, ctime_ns, inode): one ``lstat``
    per image (about a second for IJB-C on a local disk, no image read). Any rewrite changes the
    ctime (which no tool sets back), a replacement by rename the inode. A symbolic link is followed
    and must resolve inside ``loose_crop/`` (as must every folder on the way); a missing image is an
    error here, before anything is embedded. Errors name the landmark file's line of the image.
    """
    crops = meta.root / "loose_crop"
    if not crops.is_dir():
        raise FileNotFoundError(f"{meta.root}: no loose_crop/ folder (the face images of {meta.target})")
    inside = os.path.realpath(crops)
    lmk = meta.files[0]

    def contained(path: str) -> bool:
        real = os.path.realpath(path)
        return real == inside or real.startswith(inside.rstrip(os.sep) + os.sep)

    for folder in sorted({os.path.dirname(n) for n in meta.names} - {""}):
        if not contained(os.path.join(crops, folder)):
            i = next(k for k, n in enumerate(meta.names) if os.path.dirname(n) == folder)
            raise IJBMetaError(f"{lmk}:{meta.lines[i]}: image {meta.names[i]!r}: folder {folder!r} leads outside "
                               f"{crops} (a symbolic link)")
    digest = hashlib.blake2b(digest_size=20)
    for i, name in enumerate(meta.names):
        path = os.path.join(crops, name)
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                if not contained(path):
                    raise IJBMetaError(f"{lmk}:{meta.lines[i]}: image {name!r} is a symbolic link to "
                                       f"{os.path.realpath(path)}, outside {crops}")
                st = os.stat(path)
        except FileNotFoundError:
            raise IJBMetaError(f"{lmk}:{meta.lines[i]}: image not found: {path}") from None
        digest.update(f"{name}\0{stat_key(st)}\n".encode())
    return digest.hexdigest()
