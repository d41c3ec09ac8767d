"""Which images a folder source holds: an identity-per-folder tree, or a ``path label`` list file, checked at open.

A tree (:func:`list_image_tree`): ``root/<identity>/<image>``, labels in sorted folder order; hidden
entries, other extensions and empty folders are left out; symbolic links that lead nowhere
(dangling, or a loop) are left out too, with one warning naming them.

A list file (:func:`read_list`): one ``path label`` per line, UTF-8 (a byte-order mark is
accepted and ignored), blank lines and ``#`` comments ignored, relative paths taken from the list's
folder. The label is the last field, so a path may hold spaces (or separate the two with a tab).
Every line is checked before training starts, and every problem is reported with its line number
(:class:`ListFileError`): a third field (``a.jpg 3 5`` where no file ``a.jpg 3`` exists, an
im2rec ``.lst`` line), a label that is not a non-negative integer, a label beyond the set
(``num_classes`` when given, else the number of listed images: a set of N images has at most N
identities, so label 999999999 in a 4-line list is a typo, not 10^9 classes), a file listed twice
(the same line repeated, or one file under two labels), and a listed path that is missing, a
directory, a dangling symbolic link or a link loop.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import numpy as np

from .base import SourceError

__all__ = ["IMAGE_EXTENSIONS", "ListFileError", "list_image_tree", "read_list"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_SHOWN = 5  # problems quoted in one message (the count says how many there are)


class ListFileError(SourceError):
    """A list file that cannot be used as given; the message names the file and the line(s)."""


def _broken_link(entry: os.DirEntry) -> str | None:
    """Why ``entry`` is a symbolic link leading nowhere (dangling or a loop), else ``None``."""
    try:
        if entry.is_dir() or entry.is_file():
            return None
    except OSError as exc:  # ELOOP: a link loop
        return f"{entry.path} (symbolic link loop: {exc.strerror})"
    return f"{entry.path} (dangling symbolic link)" if entry.is_symlink() else None


def _scan(folder: str, want) -> tuple[list[str], list[str]]:  # noqa: ANN001 - want(entry) -> bool
    """Sorted names of the entries of ``folder`` that ``want``, and the broken links met."""
    names, broken = [], []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            why = _broken_link(e) if e.is_symlink() else None
            if why is not None:
                broken.append(why)
            elif want(e):
                names.append(e.name)
    return sorted(names), broken


def list_image_tree(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """``(identity names, [(image path, label), ...])`` for an identity-per-folder tree (paths as str: cheap for millions)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image root is not a directory: {root}")
    root = os.fspath(root)
    names: list[str] = []
    items: list[tuple[str, int]] = []
    folders, broken = _scan(root, lambda e: e.is_dir())
    for name in folders:
        folder = os.path.join(root, name)
        files, lost = _scan(folder, lambda e: e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
        broken += lost
        if not files:
            print(f"warning: skipping {folder}: no images", file=sys.stderr)
            continue
        label = len(names)
        names.append(name)
        items.extend((os.path.join(folder, f), label) for f in files)
    if broken:
        print(f"warning: {root}: skipping {len(broken)} symbolic link(s) that lead nowhere: "
              + "; ".join(broken[:_SHOWN]) + ("; ..." if len(broken) > _SHOWN else ""), file=sys.stderr)
    if not items:
        raise SourceError(f"no images found under {root} (expected {root}/<identity>/<image>)")
    return names, items


def _fields(text: str) -> list[str]:
    """``[path, label]`` (the path may hold spaces: the label is the last field), or the fields found."""
    if "\t" in text:
        return [f.strip() for f in text.split("\t") if f.strip()]
    parts = text.split()
    return [text.rsplit(None, 1)[0], parts[-1]] if len(parts) > 2 and parts[-1].isdigit() else parts


def _too_many(text: str) -> str:
    parts = text.split("\t") if "\t" in text else text.split()
    hint = " (an im2rec .lst line 'index label path'? write 'path label')" if (
        len(parts) == 3 and parts[0].strip().isdigit() and parts[1].strip().replace(".", "", 1).isdigit()) else ""
    return f"has {len(parts)} fields, expected 'path label'{hint}: {text[:80]!r}"


def _not_an_image_file(path: str) -> str | None:
    """Why the listed ``path`` cannot be read as an image file, else ``None``."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"{path} is a dangling symbolic link" if os.path.islink(path) else f"{path} does not exist"
    except OSError as exc:
        return f"{path}: symbolic link loop" if exc.errno == errno.ELOOP else f"{path}: {exc.strerror}"
    if stat.S_ISDIR(mode):
        return f"{path} is a directory, not an image file"
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file"
    return None


def _decode(data: bytes, path: Path) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ListFileError(f"{path}: the list is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark (Windows editors): not part of the first path
        data = data[3:]
    return data.decode("utf-8", "surrogateescape")  # paths are bytes on POSIX: keep any that are not UTF-8


def read_list(path: str | os.PathLike, num_classes: int | None = None) -> tuple[list[str], np.ndarray]:
    """``path label`` lines -> (absolute paths, labels int64); all lines checked (see the module docstring)."""
    path = Path(path)
    base = os.fspath(path.parent)
    paths: list[str] = []
    labels: list[int] = []
    lines: list[int] = []
    seen: dict[str, int] = {}  # normalised path -> its entry
    problems: list[str] = []
    for lineno, line in enumerate(_decode(path.read_bytes(), path).split("\n"), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = _fields(text)
        if len(parts) != 2:
            problems.append(f"line {lineno} {_too_many(text)}" if len(parts) > 2 else
                            f"line {lineno} has {len(parts)} field, expected 'path label': {text[:80]!r}")
            continue
        name, label = parts
        if not (label.isascii() and label.isdigit()) or len(label) > 9:
            problems.append(f"line {lineno}: label {label[:20]!r} is not a non-negative integer (at most 9 digits)")
            continue
        file = os.path.normpath(os.path.join(base, os.path.expanduser(name)))
        earlier = seen.get(file)
        if earlier is not None:
            if labels[earlier] == int(label):
                problems.append(f"line {lineno} repeats line {lines[earlier]} ({file})")
            else:
                problems.append(f"line {lineno} lists {file} under label {int(label)}, line {lines[earlier]} "
                                f"under label {labels[earlier]}")
            continue
        why = _not_an_image_file(file)
        if why is not None:
            spaced = "\t" not in text and len(name.split()) > 1  # "a.jpg 3 5": three fields, not a path with spaces
            problems.append(f"line {lineno} {_too_many(text)} ({why})" if spaced else f"line {lineno}: {why}")
            continue
        seen[file] = len(paths)
        paths.append(file)
        labels.append(int(label))
        lines.append(lineno)
    if not paths and not problems:
        raise ListFileError(f"{path}: no 'path label' lines")
    array = np.asarray(labels, dtype=np.int64)
    bound = len(paths) if num_classes is None else int(num_classes)
    for k in np.flatnonzero(array >= bound).tolist():
        problems.append(
            f"line {lines[k]}: label {labels[k]} is outside [0, {bound})" if num_classes is not None else
            f"line {lines[k]}: label {labels[k]} is not below the {len(paths)} images listed (labels number the "
            "identities 0..N-1; give num_classes when the set really has more classes than images)")
    if problems:
        problems.sort(key=lambda p: int(p.split(None, 2)[1].rstrip(":")))
        more = f" (and {len(problems) - 1} more: " + "; ".join(problems[1:1 + _SHOWN]) + \
            ("; ..." if len(problems) > 1 + _SHOWN else "") + ")" if len(problems) > 1 else ""
        raise ListFileError(f"{path}: {problems[0]}{more}")
    return paths, array
