"""IJB-B / IJB-C in insightface's release layout: reading and cross-checking the meta files.

``root`` is one set's folder of insightface's ``IJB_release`` (``IJB_release/IJBC``)::

    root/loose_crop/<image>                      the face crops (any size), e.g. 1.jpg
    root/meta/ijbc_name_5pts_score.txt           <image> x1 y1 ... x5 y5 <faceness score>   (one line per image)
    root/meta/ijbc_face_tid_mid.txt              <image> <template id> <media id>           (same lines, same order)
    root/meta/ijbc_template_pair_label.txt       <template id> <template id> <1 same | 0 different>
    root/meta/ijbc_1N_gallery_G1.csv, _G2.csv    1:N galleries (IJB-B: ijbb_1N_gallery_S1.csv, _S2.csv)
    root/meta/ijbc_1N_probe_mixed.csv            1:N probes; CSVs: a header, then TEMPLATE_ID,SUBJECT_ID,...

Every error names the file (and line where there is one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["IJBMeta", "read_ijb_meta"]

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
    files: list[Path]  # the meta files read (cache identity)


def _lines(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"IJB meta file not found: {path}")
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def _ints(path: Path, columns: int, delimiter: str | None = None, skiprows: int = 0) -> np.ndarray:
    """The first ``columns`` integer columns of a text table (``np.loadtxt``: fast on 15 M lines)."""
    if not path.is_file():
        raise FileNotFoundError(f"IJB meta file not found: {path}")
    try:
        table = np.loadtxt(path, dtype=np.int64, delimiter=delimiter, skiprows=skiprows,
                           usecols=range(columns), ndmin=2)
    except ValueError as exc:
        raise ValueError(f"{path}: expected {columns} integer columns: {exc}") from None
    return table


def read_ijb_meta(root: str | os.PathLike, target: str = "IJBC") -> IJBMeta:
    """Read and cross-check one IJB set's meta files (see the module docstring)."""
    target = target.upper()
    if target not in GALLERIES:
        raise ValueError(f"IJB target must be IJBB or IJBC, got {target!r}")
    root = Path(root)
    if not (root / "meta").is_dir():
        raise FileNotFoundError(f"{root}: no meta/ folder: expected insightface's IJB_release/{target} layout")

    def meta_path(kind: str) -> Path:
        return root / "meta" / f"{target.lower()}_{kind}"

    lmk_path = meta_path("name_5pts_score.txt")
    rows = _lines(lmk_path)
    for lineno, f in enumerate(rows, start=1):
        if len(f) != 12:
            raise ValueError(f"{lmk_path}:{lineno}: expected '<image> x1 y1 ... x5 y5 <score>' (12 fields), got {len(f)}")
    names = [f[0] for f in rows]
    try:
        values = np.array([f[1:] for f in rows], dtype=np.float32).reshape(-1, 11)
    except ValueError as exc:
        raise ValueError(f"{lmk_path}: landmarks and scores must be numbers: {exc}") from None

    tid_path = meta_path("face_tid_mid.txt")
    tid_rows = _lines(tid_path)
    if len(tid_rows) != len(rows):
        raise ValueError(f"{tid_path}: {len(tid_rows)} lines but {lmk_path.name} has {len(rows)}; they list the same images")
    for lineno, (f, name) in enumerate(zip(tid_rows, names), start=1):
        if len(f) < 3 or f[0] != name or not (f[1].lstrip("-").isdigit() and f[2].lstrip("-").isdigit()):
            raise ValueError(f"{tid_path}:{lineno}: expected '{name} <template id> <media id>', got {' '.join(f)!r}")
    templates = np.array([int(f[1]) for f in tid_rows], dtype=np.int64)
    known = np.unique(templates)

    pair_path = meta_path("template_pair_label.txt")
    pairs = _ints(pair_path, 3)
    unknown = np.setdiff1d(pairs[:, :2], known)
    if unknown.size:
        raise ValueError(f"{pair_path}: template ids {unknown[:5].tolist()} are not in {tid_path.name}")
    if not np.isin(pairs[:, 2], (0, 1)).all():
        raise ValueError(f"{pair_path}: labels must be 0 or 1")
    files = [lmk_path, tid_path, pair_path]

    galleries: list[tuple[np.ndarray, np.ndarray]] = []
    probes = None
    probe_path = meta_path("1N_probe_mixed.csv")
    if probe_path.is_file():  # 1:N is optional
        for path in [*(meta_path(f"1N_gallery_{g}.csv") for g in GALLERIES[target]), probe_path]:
            table = _ints(path, 2, delimiter=",", skiprows=1)
            missing = np.setdiff1d(table[:, 0], known)
            if missing.size:
                raise ValueError(f"{path}: template ids {missing[:5].tolist()} are not in {tid_path.name}")
            files.append(path)
            if path == probe_path:
                probes = (table[:, 0], table[:, 1])
            else:
                galleries.append((table[:, 0], table[:, 1]))
    return IJBMeta(
        root=root, target=target, names=names, landmarks=values[:, :10].reshape(-1, 5, 2), faceness=values[:, 10],
        templates=templates, medias=np.array([int(f[2]) for f in tid_rows], dtype=np.int64), pairs=pairs,
        galleries=galleries, probes=probes, files=files,
    )
