"""pack (image tree -> insightface RecordIO) and inspect (check a set) CLIs."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from conftest import TINY_LABELS
from PIL import Image

from facemargin.data.formats.recordio import RecordIOReader
from facemargin.data.sources.recordio import FaceRecordSet
from facemargin.data.tools.inspect import inspect_dir
from facemargin.data.tools.inspect import main as inspect_main
from facemargin.data.tools.pack import main as pack_main
from facemargin.data.tools.pack import pack_images, parse_crop, read_image_size
from facemargin.data.tools.synthetic import render_identity

SRC = Path(__file__).resolve().parents[1] / "src"


def jpeg(seed: int, h: int = 16, w: int = 16) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return simplejpeg.encode_jpeg(img, quality=85, colorspace="RGB")


def png(seed: int, h: int = 16, w: int = 16) -> bytes:
    img = np.full((h, w, 3), seed * 20 % 256, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def image_tree(tmp_path: Path) -> dict[str, list[bytes]]:
    """carol/ (2 jpeg), alice/ (1 jpeg, 1 png), empty/ (nothing), bob/ (1 jpeg + notes.txt)."""
    root = tmp_path / "images"
    files = {
        "carol": {"b.jpg": jpeg(1), "a.jpg": jpeg(2)},
        "alice": {"2.png": png(3), "1.JPG": jpeg(4)},
        "bob": {"x.jpeg": jpeg(5), "notes.txt": b"not an image"},
        "empty": {},
    }
    for folder, content in files.items():
        (root / folder).mkdir(parents=True)
        for name, data in content.items():
            (root / folder / name).write_bytes(data)
    return root


def test_pack_insightface_layout(image_tree, tmp_path):
    out = tmp_path / "rec"
    info = pack_images(image_tree, out, progress=False)
    assert info["num_images"] == 5 and info["num_classes"] == 3 and info["identities"] == ["alice", "bob", "carol"]
    assert (out / "property").read_text() == "3,16,16"
    reader = RecordIOReader(out / "train.rec", out / "train.idx")
    a, b = 6, 9
    assert reader.keys == list(range(b))
    f32 = lambda *xs: struct.pack(f"<{len(xs)}f", *xs)  # noqa: E731
    assert reader.read(0) == struct.pack("<IfQQ", 2, 0.0, 0, 0) + f32(a, b)
    src = image_tree
    expected = [  # (label, exact bytes or None for re-encoded)
        (0, (src / "alice" / "1.JPG").read_bytes()),
        (0, None),  # alice/2.png re-encoded
        (1, (src / "bob" / "x.jpeg").read_bytes()),
        (2, (src / "carol" / "a.jpg").read_bytes()),
        (2, (src / "carol" / "b.jpg").read_bytes()),
    ]
    for key, (label, data) in enumerate(expected, start=1):
        payload = reader.read(key)
        assert payload[:24] == struct.pack("<IfQQ", 0, float(label), key, 0)
        if data is not None:
            assert payload[24:] == data
    png_jpeg = reader.read(2)[24:]
    assert png_jpeg[:3] == b"\xff\xd8\xff"
    decoded = simplejpeg.decode_jpeg(png_jpeg, colorspace="RGB")
    assert decoded.shape == (16, 16, 3) and np.abs(decoded.astype(int) - 60).max() <= 3
    for c, (lo, hi) in enumerate([(1, 3), (3, 4), (4, 6)]):
        assert reader.read(a + c) == struct.pack("<IfQQ", 2, 0.0, a + c, 0) + f32(lo, hi)
    fs = FaceRecordSet(out)
    assert fs.layout == "insightface" and fs.labels().tolist() == [0, 0, 1, 2, 2]


def test_pack_resize(image_tree, tmp_path):
    pack_images(image_tree, tmp_path / "r8", resize=8, progress=False)
    fs = FaceRecordSet(tmp_path / "r8")
    assert fs.image_size == (8, 8) and (tmp_path / "r8" / "property").read_text() == "3,8,8"
    for key in fs.image_keys.tolist():
        assert simplejpeg.decode_jpeg(fs.read(key)[1]).shape == (8, 8, 3)


def test_pack_rejects_mixed_sizes(image_tree, tmp_path):
    (image_tree / "bob" / "y.jpg").write_bytes(jpeg(9, 20, 16))
    with pytest.raises(ValueError, match=r"bob/y\.jpg is 16x20 but earlier images are 16x16; use --resize"):
        pack_images(image_tree, tmp_path / "rec", progress=False)


def test_pack_refuses_to_overwrite(image_tree, tmp_path):
    pack_images(image_tree, tmp_path / "rec", progress=False)
    with pytest.raises(FileExistsError, match="train.rec exists"):
        pack_images(image_tree, tmp_path / "rec", progress=False)
    pack_images(image_tree, tmp_path / "rec", progress=False, overwrite=True)


def test_pack_cli_and_inspect_cli(image_tree, tmp_path, capsys):
    out = tmp_path / "rec"
    assert pack_main([str(image_tree), str(out), "--quiet"]) == 0
    assert "wrote 5 images of 3 identities (16x16)" in capsys.readouterr().out
    assert inspect_main([str(out), "--decode", "3"]) == 0
    text = capsys.readouterr().out
    assert "layout: insightface" in text and "num_images: 5" in text and "decoded: 3" in text and "OK" in text
    with pytest.raises(SystemExit) as refused:
        pack_main([str(tmp_path / "missing"), str(tmp_path / "out2")])
    assert refused.value.code == 2
    assert capsys.readouterr().err == f"facemargin.data.pack: error: image root is not a directory: {tmp_path / 'missing'}\n"


def test_module_entry_points(image_tree, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "rec"
    pack_images(image_tree, out, progress=False)  # `-m facemargin.data.pack` runs the same main()
    (out / "property").unlink()
    res = subprocess.run([sys.executable, "-m", "facemargin.data.inspect", str(out)], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert f"ERROR: property file not found: {out / 'property'}" in res.stderr


def set_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_read_image_size_from_headers_matches_pil(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (21, 34, 3), dtype=np.uint8)
    variants = {"baseline": {}, "progressive": {"progressive": True}, "gray": {"mode": "L"}, "png": {"format": "PNG"},
                "bmp": {"format": "BMP"}}
    for name, kw in variants.items():
        buf = io.BytesIO()
        im = Image.fromarray(rgb).convert(kw.pop("mode", "RGB"))
        im.save(buf, format=kw.pop("format", "JPEG"), **kw)
        assert read_image_size(buf.getvalue()) == (21, 34), name
    with pytest.raises(ValueError, match="cannot read image x.jpg: cannot read the image header"):
        read_image_size(b"\xff\xd8\xff\xe0garbage", "x.jpg")


def test_pack_copies_jpegs_already_at_the_target_size_without_pil(image_tree, tmp_path, monkeypatch):
    (image_tree / "alice" / "2.png").unlink()
    (image_tree / "dave").mkdir()
    (image_tree / "dave" / "big.jpg").write_bytes(jpeg(7, 32, 32))  # the only one that needs work
    pack_images(image_tree, tmp_path / "r16", resize=16, progress=False)
    fs = FaceRecordSet(tmp_path / "r16")
    sources = [image_tree / "alice" / "1.JPG", image_tree / "bob" / "x.jpeg", image_tree / "carol" / "a.jpg",
               image_tree / "carol" / "b.jpg"]
    for key, src in zip(fs.image_keys.tolist(), sources):
        assert fs.read(key)[1] == src.read_bytes()  # byte for byte, not re-encoded
    assert simplejpeg.decode_jpeg(fs.read(5)[1]).shape == (16, 16, 3)
    (image_tree / "dave" / "big.jpg").unlink()
    for name in ("PIL", "PIL.Image"):
        monkeypatch.setitem(sys.modules, name, None)  # importing PIL now fails
    info = pack_images(image_tree, tmp_path / "nopil", resize=16, progress=False)
    assert info["num_images"] == 4 and info["image_size"] == (16, 16)


def framed_photo(face: np.ndarray, size: int, face_px: int, seed: int) -> np.ndarray:
    """An LFW-style photo: the face scaled to ``face_px`` in the centre of a noisy ``size`` square."""
    photo = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    top = (size - face_px) // 2
    photo[top:top + face_px, top:top + face_px] = np.asarray(Image.fromarray(face).resize((face_px, face_px), Image.BICUBIC))
    return photo


def test_pack_crop_and_resize_frame_a_photo_sized_face(tmp_path):
    faces = render_identity(0, 2, 112, seed=3)
    root = tmp_path / "photos"
    (root / "p0").mkdir(parents=True)
    for i, face in enumerate(faces):  # 250x250 with the face in the central 125x125, as LFW frames them
        Image.fromarray(framed_photo(face, 250, 125, i)).save(root / "p0" / f"{i}.jpg", quality=95)
    wide = np.random.default_rng(5).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    wide[:, 50:250] = np.asarray(Image.fromarray(faces[0]).resize((200, 200), Image.BICUBIC))
    (root / "p1").mkdir()
    Image.fromarray(wide).save(root / "p1" / "wide.png")
    pack_images(root, tmp_path / "framed", resize=112, crop="0.5", progress=False)
    fs = FaceRecordSet(tmp_path / "framed")
    got = [simplejpeg.decode_jpeg(fs.read(k)[1]).astype(float) for k in fs.image_keys.tolist()]
    for img, face in zip(got[:2], faces):
        assert img.shape == (112, 112, 3) and np.abs(img - face).mean() < 12  # the face fills the frame
    assert np.abs(got[0][:, 5:-5] - faces[1][:, 5:-5]).mean() > 25  # (and it is not just any face)
    unframed = FaceRecordSet(pack_images(root, tmp_path / "whole", resize=112, progress=False)["out_dir"])
    keys = unframed.image_keys.tolist()
    small = simplejpeg.decode_jpeg(unframed.read(keys[0])[1]).astype(float)
    assert np.abs(small - faces[0]).mean() > 30  # the whole photo: the face is a quarter of the frame
    squared = simplejpeg.decode_jpeg(unframed.read(keys[2])[1]).astype(float)  # 300x200: centre square, not squashed
    assert np.abs(squared - faces[0]).mean() < 12


def test_pack_align_maps_an_unaligned_photo_onto_the_template(tmp_path):
    from facemargin.align import ARCFACE_TEMPLATE, warp_affine

    face = render_identity(2, 1, 112, seed=4)[0]  # an aligned 112x112 face
    # the "photo": that face rotated by 25 degrees, scaled 1.7x and shifted into a 320x240 frame
    c, s_ = 1.7 * np.cos(np.radians(25)), 1.7 * np.sin(np.radians(25))
    to_photo = np.array([[c, -s_, 120.0], [s_, c, 10.0]])
    photo = warp_affine(face, to_photo, (320, 240))
    marks = ARCFACE_TEMPLATE @ to_photo[:, :2].T + to_photo[:, 2]  # where the template points went
    root = tmp_path / "photos"
    (root / "id0").mkdir(parents=True)
    Image.fromarray(photo).save(root / "id0" / "p.png")
    Image.fromarray(np.fliplr(photo)).save(root / "id0" / "q.png")  # same photo mirrored
    mirrored = marks[[1, 0, 2, 4, 3]] * [-1, 1] + [319, 0]  # mirror the points, swap left and right
    lines = ["# path  left eye  right eye  nose  left mouth  right mouth",
             "id0/p.png " + " ".join(f"{v:.4f}" for v in marks.reshape(-1)),
             "id0/q.png " + " ".join(f"{v:.4f}" for v in mirrored.reshape(-1))]
    (tmp_path / "marks.txt").write_text("\n".join(lines) + "\n")
    assert pack_main([str(root), str(tmp_path / "rec"), "--align", str(tmp_path / "marks.txt"), "--quiet"]) == 0
    fs = FaceRecordSet(tmp_path / "rec")
    assert (tmp_path / "rec" / "property").read_text() == "1,112,112"
    p, q = (simplejpeg.decode_jpeg(fs.read(k)[1]).astype(float) for k in fs.image_keys.tolist())
    inner = (slice(8, -8), slice(8, -8))  # the border resamples pixels that fell outside the photo
    assert np.abs(p[inner] - face[inner]).mean() < 6  # back on the template
    assert np.abs(q[inner] - face[:, ::-1][inner]).mean() < 6  # the mirrored photo gives the mirrored face
    assert np.abs(p[inner] - face[:, ::-1][inner]).mean() > 3 * np.abs(p[inner] - face[inner]).mean()

    (tmp_path / "short.txt").write_text(lines[1] + "\n")
    with pytest.raises(ValueError, match=r"short\.txt has no landmarks for 1 image\(s\), e\.g\. .*id0/q\.png"):
        pack_images(root, tmp_path / "rec2", align=tmp_path / "short.txt", progress=False)
    (tmp_path / "bad.txt").write_text("id0/p.png 1 2 3\n")
    with pytest.raises(ValueError, match=r"bad\.txt: line 1 is not 'PATH x1 y1 \.\.\. x5 y5 \[score\]'"):
        pack_images(root, tmp_path / "rec2", align=tmp_path / "bad.txt", progress=False)
    with pytest.raises(ValueError, match="--align and --crop exclude each other"):
        pack_images(root, tmp_path / "rec2", align=tmp_path / "marks.txt", crop="square", progress=False)
    assert not (tmp_path / "rec2").exists()


def test_pack_workers_give_identical_output(image_tree, tmp_path):
    for w in (1, 2):
        assert pack_main([str(image_tree), str(tmp_path / f"w{w}"), "--resize", "12", "--crop", "0.9",
                          "--workers", str(w), "--quiet"]) == 0
    assert set_files(tmp_path / "w1") == set_files(tmp_path / "w2")
    assert (tmp_path / "w1" / "property").read_text() == "3,12,12"


@pytest.mark.parametrize("workers", [1, 2])
def test_pack_leaves_no_partial_files_on_error(image_tree, tmp_path, workers):
    (image_tree / "carol" / "c.jpg").write_bytes(jpeg(9, 20, 16))  # the last image has another size
    out = tmp_path / "new"
    with pytest.raises(ValueError, match=r"carol/c\.jpg is 16x20 but earlier images are 16x16"):
        pack_images(image_tree, out, progress=False, workers=workers)
    assert not out.exists()  # created by the packer, removed again
    good = tmp_path / "good"
    (image_tree / "carol" / "c.jpg").unlink()
    pack_images(image_tree, good, progress=False)
    before = set_files(good)
    (image_tree / "bob" / "broken.jpg").write_bytes(jpeg(10)[:30])
    with pytest.raises(ValueError, match=r"bob/broken\.jpg"):
        pack_images(image_tree, good, progress=False, overwrite=True, workers=workers, resize=8)
    assert set_files(good) == before  # the old set is untouched, no temporaries left


def test_pack_crop_specs():
    assert parse_crop("square").kind == "square" and parse_crop("0.5").value == 0.5
    assert parse_crop("120x100").box == (120, 100) and parse_crop(None) is None
    for bad in ("0", "1.5", "12x0", "wide"):
        with pytest.raises(ValueError, match="--crop must be 'square', a fraction in \\(0, 1\\] or WxH"):
            parse_crop(bad)


def test_inspect_dir_summary(tiny_recdir):
    info = inspect_dir(tiny_recdir, decode=10)
    assert info["ok"] and info["problems"] == []
    assert info["layout"] == "insightface" and info["num_records"] == 11 and info["num_images"] == 7
    assert info["num_classes"] == 3 and info["image_size"] == (8, 8) and info["identity_range"] == (8, 11)
    assert (info["label_min"], info["label_max"], info["num_labels_seen"]) == (0, 2, 3)
    assert info["decoded"] == 7


def test_inspect_detects_bad_magic(tiny_recdir):
    fs = FaceRecordSet(tiny_recdir)
    off = fs.reader.offset(4)
    rec = tiny_recdir / "train.rec"
    data = bytearray(rec.read_bytes())
    data[off:off + 4] = b"XXXX"
    rec.write_bytes(bytes(data))
    info = inspect_dir(tiny_recdir)
    assert not info["ok"]
    joined = "\n".join(info["problems"])
    assert f"train.rec at offset {off}: bad magic" in joined
    assert f"key 4 -> offset {off}" in joined


def test_inspect_detects_mid_record_offset(tiny_recdir):
    lines = (tiny_recdir / "train.idx").read_text().splitlines()
    k2, off2 = lines[2].split("\t")
    lines[2] = f"{k2}\t{int(off2) + 4}"  # points inside record 2: its lrecord field
    (tiny_recdir / "train.idx").write_text("\n".join(lines) + "\n")
    info = inspect_dir(tiny_recdir)
    joined = "\n".join(info["problems"])
    assert not info["ok"]
    assert f"key 2 -> offset {int(off2) + 4}" in joined and "bad magic" in joined


def test_inspect_reports_an_unusable_index(tiny_recdir):
    lines = (tiny_recdir / "train.idx").read_text().splitlines()
    lines[5] = lines[5].split("\t")[0] + "\t999996"
    (tiny_recdir / "train.idx").write_text("\n".join(lines) + "\n")
    info = inspect_dir(tiny_recdir)
    assert info["problems"] == [f"{tiny_recdir / 'train.idx'}: key 5 -> offset 999996 is past the end of "
                                f"{tiny_recdir / 'train.rec'} ({(tiny_recdir / 'train.rec').stat().st_size} bytes)"]


def test_inspect_detects_label_out_of_range(tmp_path):
    from facemargin.data.formats.recordio import IRHeader, RecordIOWriter, pack_record

    root = tmp_path / "s"
    root.mkdir()
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        for k, label in enumerate([0, 1, 2, 1, 2]):
            w.write(k, pack_record(IRHeader(0, float(label), k, 0), jpeg(k, 8, 8)))
    (root / "property").write_text("2,8,8")  # identity 2 does not exist
    info = inspect_dir(root)
    assert not info["ok"]
    assert info["problems"] == [f"{root / 'train.rec'} (key {k}): label 2 is outside [0, 2) (num_classes from "
                                f"{root / 'property'})" for k in (2, 4)]


def test_inspect_lists_every_label_that_contradicts_its_identity_range(tiny_recdir):
    data = bytearray((tiny_recdir / "train.rec").read_bytes())
    fs = FaceRecordSet(tiny_recdir)
    for key, label in ((2, 1.0), (4, 2.0), (7, 0.0)):  # one flipped label per identity
        struct.pack_into("<f", data, fs.reader.offset(key) + 12, label)
    (tiny_recdir / "train.rec").write_bytes(bytes(data))
    info = inspect_dir(tiny_recdir)
    assert [p.split("): ")[1].split(":")[0] for p in info["problems"]] == [
        "label 1 does not match the identity ranges of the meta record",
        "label 2 does not match the identity ranges of the meta record",
        "label 0 does not match the identity ranges of the meta record"]
    assert [f"(key {k})" in p for k, p in zip((2, 4, 7), info["problems"])] == [True] * 3


def test_inspect_detects_wrong_image_size(tiny_recdir):
    (tiny_recdir / "property").write_text("3,112,112")
    info = inspect_dir(tiny_recdir, decode=1)
    off = FaceRecordSet(tiny_recdir).reader.offset(1)
    assert info["problems"] == [f"{tiny_recdir / 'train.rec'} at offset {off} (key 1): image is 8x8 (width x height), "
                                "the set's images are 112x112"]


def test_inspect_missing_files(tmp_path):
    info = inspect_dir(tmp_path)
    assert not info["ok"] and "index not found" in info["problems"][0] and str(tmp_path / "train.idx") in info["problems"][0]


def test_inspect_truncated_file(tiny_recdir):
    rec = tiny_recdir / "train.rec"
    off10 = FaceRecordSet(tiny_recdir).reader.offset(10)
    rec.write_bytes(rec.read_bytes()[: rec.stat().st_size - 6])
    info = inspect_dir(tiny_recdir)
    assert not info["ok"]
    assert any(f"train.rec at offset {off10} (key 10): truncated record" in p for p in info["problems"])
