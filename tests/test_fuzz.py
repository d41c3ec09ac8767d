"""Fuzz the data layer: a few hundred mutations of a small generated set, both layouts.

Every mutated set is opened and read for a whole epoch twice (``on_corrupt="raise"`` and
``"skip"``). Each run must end in one of:

* ``error``: a ValueError / FileNotFoundError whose message names the file (``train.rec``,
  ``train.idx`` or ``property``) and a key, offset or line;
* ``skip``: finished with ``on_corrupt="skip"``, the damaged samples replaced and counted;
* ``identical``: finished and every sample equals the original (the bytes hit were padding or
  an unused header field);
* ``pixels``: finished, every label right, and the only differing pixels belong to the record whose
  JPEG entropy-coded data was hit (RecordIO has no checksum: a decodable flipped coefficient is
  invisible to any reader);
* ``im2rec-label``: an im2rec set (no identity ranges to check against) whose flipped label bit
  gives another valid class -- counted, and only accepted for that layout and that field.

Never a wrong label elsewhere, an uncaught exception type (IndexError, struct.error,
OverflowError, MemoryError, ...), a hang or a crash. The outcome counts are printed.
"""

from __future__ import annotations

import shutil
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import simplejpeg

from facemargin.data.formats.image import decode_image
from facemargin.data.formats.recordio import IRHeader, RecordIOWriter, pack_record
from facemargin.data.loading.loader import BatchReader, PlanSampler, TrainLoader
from facemargin.data.loading.plan import PlanSpec, hash_uniform
from facemargin.data.sources.recordio import FaceRecordSet

SIZE = 16
LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
SPEC = PlanSpec(seed=1)
MAGIC = struct.pack("<I", 0xCED7230A)


def _image(i: int, size: int = SIZE) -> bytes:
    rng = np.random.default_rng(i)
    img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return simplejpeg.encode_jpeg(img, quality=90, colorspace="RGB")


def _jpeg_bomb() -> bytes:
    data = bytearray(_image(99))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = (65500).to_bytes(2, "big") * 2
    return bytes(data)


def _write(root: Path, layout: str, images: list[bytes]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    n, classes = len(images), 3
    first = 1 if layout == "insightface" else 0
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        if first:
            w.write(0, pack_record(IRHeader(0, 0.0, 0, 0), b"", labels=[n + 1, n + 1 + classes]))
        for i, (lab, data) in enumerate(zip(LABELS, images)):
            w.write(first + i, pack_record(IRHeader(0, float(lab), first + i, 0), data))
        if first:
            bounds = np.searchsorted(LABELS, np.arange(classes + 1)) + 1
            for c in range(classes):
                w.write(n + 1 + c, pack_record(IRHeader(0, 0.0, n + 1 + c, 0), b"", labels=[bounds[c], bounds[c + 1]]))
    (root / "property").write_text(f"{classes},{SIZE},{SIZE}")


class Case:
    """One layout's clean set and what every record looks like."""

    def __init__(self, root: Path, layout: str) -> None:
        self.layout = layout
        self.images = [_image(i) for i in range(len(LABELS))]
        assert not any(MAGIC in im for im in self.images)
        self.root = root / layout
        _write(self.root, layout, self.images)
        self.pixels = [decode_image(im) for im in self.images]
        fs = FaceRecordSet(self.root)
        self.offsets = fs.index.offsets[fs.positions(np.arange(len(fs)))].tolist()  # record start per sample
        for p in self.root.glob("*.npy"):
            p.unlink()

    def field_of(self, pos: int) -> tuple[int, str]:
        """``(sample, field)`` a .rec byte position belongs to (``-1`` outside image records)."""
        for i, off in enumerate(self.offsets):
            payload = off + 8
            if off <= pos < payload + 24 + len(self.images[i]):
                if payload + 4 <= pos < payload + 8:
                    return i, "label"
                if pos >= payload + 24:
                    return i, "jpeg"
                return i, "header"
        return -1, "other"


def _epoch(root: Path, on_corrupt: str) -> tuple[list[tuple[int, int, int, np.ndarray]], int]:
    """``(sample index, key, label, HWC pixels)`` of every sample of an epoch, and the skip count."""
    fs = FaceRecordSet(root)
    reader = BatchReader(fs, seed=SPEC.seed, flip_p=0.5, on_corrupt=on_corrupt)
    keys = fs.image_keys
    out = []
    for images, labels, index in TrainLoader(reader, PlanSampler(fs, 4, SPEC), num_workers=0):
        out += [(int(i), int(keys[i]), int(y), x.permute(1, 2, 0).numpy()) for x, y, i in zip(images, labels, index)]
    return out, reader.num_skipped


def _classify(case: Case, root: Path, on_corrupt: str, hit: tuple[int, str]) -> str:
    try:
        samples, skipped = _epoch(root, on_corrupt)
    except (ValueError, FileNotFoundError) as exc:
        msg = str(exc)
        named = [f for f in ("train.rec", "train.idx", "property") if f"{root / f}:" in msg or f"{root / f} " in msg]
        where = {"train.rec": ("key ", "offset "), "train.idx": ("line ", "key ", "keys ", "is empty"), "property": ("",)}
        ok = any(any(w in msg for w in where[f]) for f in named)
        assert ok, f"error without file and key/offset/line: {type(exc).__name__}: {msg}"
        return "error"
    flip = hash_uniform(SPEC.seed, 0, np.arange(len(LABELS))) < 0.5
    outcome = "skip" if skipped else "identical"
    first = 1 if case.layout == "insightface" else 0
    for sample, key, label, pixels in samples:
        i = key - first  # the image the record holds (an edited .idx may reorder samples)
        assert 0 <= i < len(LABELS), f"sample {sample} read key {key}, which holds no image"
        want = case.pixels[i][:, ::-1] if flip[sample] else case.pixels[i]
        if label != LABELS[i]:
            assert case.layout == "im2rec" and hit == (i, "label") and 0 <= label < 3, f"wrong label for sample {i}"
            outcome = "im2rec-label"
        elif not np.array_equal(pixels, want):
            assert hit == (i, "jpeg"), f"sample {i}: wrong pixels, mutation hit {hit}"
            outcome = "pixels" if outcome != "im2rec-label" else outcome
    assert on_corrupt == "skip" or not skipped
    return outcome


def _mutations(case: Case, rng: np.random.Generator) -> list[tuple[str, str, object]]:
    """``(file, kind, argument)``: what to damage and how."""
    rec_size = (case.root / "train.rec").stat().st_size
    idx_text = (case.root / "train.idx").read_text()
    muts: list[tuple[str, str, object]] = []
    muts += [("train.rec", "truncate", int(n)) for n in rng.integers(0, rec_size, 12)]
    muts += [("train.rec", "bitflip", int(b)) for b in rng.integers(0, rec_size * 8, 70)]
    # every byte of one record's header and label, and the meta record
    off = case.offsets[5]
    muts += [("train.rec", "bitflip", (off + k) * 8 + int(rng.integers(8))) for k in range(0, 36)]
    muts += [("train.rec", "bitflip", k * 8 + int(rng.integers(8))) for k in range(0, 40)]
    muts += [("train.rec", "overwrite", (int(p), int(rng.integers(1, 9)))) for p in rng.integers(0, rec_size, 10)]
    muts += [("train.idx", "char", (int(p), c)) for p, c in zip(rng.integers(0, len(idx_text), 14),
                                                               rng.choice(list("\t\n 0179-x"), 14))]
    muts += [("train.idx", "delete", int(p)) for p in rng.integers(0, len(idx_text), 6)]
    muts += [("train.idx", "text", t) for t in ("", "\n", idx_text + idx_text.splitlines()[3] + "\n",
                                                 idx_text.replace("\t", "\t\t", 1), idx_text + "99\t4\n",
                                                 idx_text + "7" * 25 + "\t0\n", "0\t0\n")]
    muts += [("property", "text", t) for t in ("", "3,16", "3,16,16,16", "-3,16,16", "1e20,16,16", "2,16,16",
                                                "99999999999,16,16", "3,65500,65500", "3,8,8", "3,16,16\n\n")]
    muts += [("image", "replace", (int(i), kind)) for i, kind in zip(rng.integers(0, len(LABELS), 6),
                                                                    ["bomb", "small", "empty", "png", "bomb", "small"])]
    return muts


def _apply(case: Case, dst: Path, mut: tuple[str, str, object]) -> tuple[int, str]:
    """Write the mutated set into ``dst``; returns the (sample, field) a .rec byte mutation hit."""
    file, kind, arg = mut
    if file == "image":
        i, what = arg  # type: ignore[misc]
        images = list(case.images)
        images[i] = {"bomb": _jpeg_bomb(), "small": _image(i, 8), "empty": b"",
                     "png": b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + struct.pack(">II", 65500, 65500) + b"\0" * 20}[what]
        _write(dst, case.layout, images)
        return i, "jpeg"
    shutil.copytree(case.root, dst)
    path = dst / file
    data = bytearray(path.read_bytes())
    hit = (-1, "other")
    if kind == "truncate":
        del data[arg:]  # type: ignore[misc]
    elif kind == "bitflip":
        data[arg // 8] ^= 1 << (arg % 8)  # type: ignore[operator]
        hit = case.field_of(arg // 8)  # type: ignore[operator]
    elif kind == "overwrite":
        pos, n = arg  # type: ignore[misc]
        data[pos: pos + n] = bytes(np.random.default_rng(pos).integers(0, 256, n, dtype=np.uint8))
        hit = case.field_of(pos) if case.field_of(pos) == case.field_of(pos + n - 1) else (-2, "span")
    elif kind == "char":
        pos, c = arg  # type: ignore[misc]
        data[pos: pos + 1] = c.encode()
    elif kind == "delete":
        del data[arg]  # type: ignore[arg-type]
    elif kind == "text":
        data = bytearray(str(arg).encode())
    path.write_bytes(bytes(data))
    return hit


def test_fuzz_both_layouts(tmp_path: Path) -> None:
    counts: Counter = Counter()
    rng = np.random.default_rng(2024)
    for layout in ("insightface", "im2rec"):
        case = Case(tmp_path / "clean", layout)
        for k, mut in enumerate(_mutations(case, rng)):
            dst = tmp_path / f"{layout}-{k}"
            hit = _apply(case, dst, mut)
            for on_corrupt in ("raise", "skip"):
                for p in dst.glob("*.npy"):
                    p.unlink()
                try:
                    outcome = _classify(case, dst, on_corrupt, hit)
                except AssertionError as exc:
                    raise AssertionError(f"{layout} {mut} on_corrupt={on_corrupt}: {exc}") from None
                except Exception as exc:  # any other exception type is a failure of the data layer
                    raise AssertionError(f"{layout} {mut} on_corrupt={on_corrupt}: uncaught "
                                         f"{type(exc).__name__}: {exc}") from exc
                counts[(layout, on_corrupt, outcome)] += 1
            shutil.rmtree(dst)
    total = sum(counts.values())
    print(f"\nfuzz: {total} runs ({total // 2} mutated sets x raise/skip)")
    for key in sorted(counts):
        print(f"  {key[0]:>11} on_corrupt={key[1]:<5} {key[2]:<12} {counts[key]:4d}")
    assert total >= 2 * 2 * 200
    assert counts[("insightface", "raise", "error")] > 50 and counts[("insightface", "skip", "skip")] > 5
    assert not any(k[0] == "insightface" and k[2] == "im2rec-label" for k in counts)


@pytest.mark.parametrize("layout", ["insightface", "im2rec"])
def test_clean_set_reads_identically(tmp_path: Path, layout: str) -> None:
    case = Case(tmp_path, layout)
    assert _classify(case, case.root, "raise", (-1, "other")) == "identical"
