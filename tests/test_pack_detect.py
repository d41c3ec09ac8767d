"""``pack --detect`` on real photos that ship in registry packages: aligned faces whose landmarks land on
the ArcFace template, photos without a face or with several listed next to the set, identities
without any face left out, the same bytes from worker processes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from facemargin.align import ARCFACE_TEMPLATE, align_face
from facemargin.data.formats.image import decode_image
from facemargin.data.sources.recordio import FaceRecordSet
from facemargin.data.tools.pack import main as pack_main
from facemargin.data.tools.pack import pack_images
from facemargin.detect.mtcnn import MTCNN
from facemargin.detect.pipeline import choose_face
from facemargin.detect.samples import packaged_photo, packaged_photo_path


@pytest.fixture(scope="module")
def detector() -> MTCNN:
    return MTCNN()


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    """alice/ (the astronaut, and a 256-px JPEG copy), grace/ (Grace Hopper, a coffee cup), nobody/ (a
    rocket), pair/ (the astronaut beside a half-size Grace Hopper: two faces, Grace's the larger)."""
    root = tmp_path / "photos"
    for folder in ("alice", "grace", "nobody", "pair"):
        (root / folder).mkdir(parents=True)
    astronaut, grace = packaged_photo("astronaut"), packaged_photo("grace_hopper")
    shutil.copy(packaged_photo_path("astronaut"), root / "alice" / "astronaut.png")
    Image.fromarray(astronaut).resize((256, 256), Image.BICUBIC).save(root / "alice" / "small.jpg", quality=90)
    shutil.copy(packaged_photo_path("grace_hopper"), root / "grace" / "grace_hopper.jpg")
    shutil.copy(packaged_photo_path("coffee"), root / "grace" / "coffee.png")
    shutil.copy(packaged_photo_path("rocket"), root / "nobody" / "rocket.jpg")
    canvas = np.zeros((512, 768, 3), np.uint8)
    canvas[:, :512] = astronaut
    canvas[100:400, 512:] = np.asarray(Image.fromarray(grace).resize((256, 300), Image.BICUBIC))
    Image.fromarray(canvas).save(root / "pair" / "two.jpg", quality=92)
    return root


def interocular(points: np.ndarray) -> float:
    return float(np.linalg.norm(points[1] - points[0]))


def test_pack_detect_packs_aligned_faces_and_lists_the_rest(photos, tmp_path, detector, capsys) -> None:
    out = tmp_path / "set"
    assert pack_main([str(photos), str(out), "--detect", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 images of 3 identities (112x112)" in printed
    assert (f"6 photos: no face in 2 (listed in {out / 'no_face.txt'}), several faces in 1 (the largest taken; "
            f"listed in {out / 'several_faces.txt'})") in printed
    assert "left out 1 identities with no face in any photo: nobody" in printed
    assert (out / "no_face.txt").read_text() == "grace/coffee.png\nnobody/rocket.jpg\n"
    several = (out / "several_faces.txt").read_text().splitlines()
    assert len(several) == 1 and several[0].startswith("pair/two.jpg\tlargest of 2 faces: box ")
    fs = FaceRecordSet(out)
    assert fs.image_size == (112, 112) and fs.num_classes == 3 and fs.labels().tolist() == [0, 0, 1, 2]
    sources = [photos / "alice" / "astronaut.png", photos / "alice" / "small.jpg",
               photos / "grace" / "grace_hopper.jpg", photos / "pair" / "two.jpg"]
    for key, source in zip(fs.image_keys.tolist(), sources):
        face = simplejpeg.decode_jpeg(fs.read(key)[1], colorspace="RGB")
        again = detector(face)  # detected again on the packed crop: the points sit on the template
        assert len(again) == 1, source
        err = np.linalg.norm(again[0].landmarks - ARCFACE_TEMPLATE, axis=1)
        assert (err < 0.2 * interocular(ARCFACE_TEMPLATE)).all(), (source, err.round(1))
        photo = decode_image(source.read_bytes())
        chosen = choose_face(detector, photo).face
        expected = align_face(photo, chosen.landmarks, 112)  # the detector's own landmarks, aligned
        assert np.abs(face.astype(float) - expected).mean() < 4.0, source  # JPEG q95 4:2:0
    grace_box = several[0].split("box ")[1].split(",")
    assert int(grace_box[0]) > 512  # the larger face is Grace Hopper's, on the right


def test_pack_detect_central_choice_and_workers(photos, tmp_path, detector) -> None:
    one = pack_images(photos, tmp_path / "one", detect="mtcnn", choice="central", progress=False)
    two = pack_images(photos, tmp_path / "two", detect="mtcnn", choice="central", progress=False, workers=2)
    assert {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()}
    assert one["several"] == two["several"] == ["pair/two.jpg"] and one["dropped_identities"] == ["nobody"]
    assert (tmp_path / "one" / "several_faces.txt").read_text().startswith("pair/two.jpg\tcentral of 2 faces: box ")
    fs = FaceRecordSet(tmp_path / "one")
    pair = simplejpeg.decode_jpeg(fs.read(fs.image_keys.tolist()[-1])[1], colorspace="RGB").astype(float)
    canvas = decode_image((photos / "pair" / "two.jpg").read_bytes())
    central = choose_face(detector, canvas, "central")
    assert central.count == 2 and central.face.center[0] < 512  # the astronaut's face, on the left
    assert np.abs(pair - align_face(canvas, central.face.landmarks, 112)).mean() < 4.0


def test_pack_detect_refusals(photos, tmp_path) -> None:
    with pytest.raises(ValueError, match="--detect and --crop exclude each other"):
        pack_images(photos, tmp_path / "x", detect="mtcnn", crop="square", progress=False)
    with pytest.raises(ValueError, match="--detect and --align exclude each other"):
        pack_images(photos, tmp_path / "x", detect="mtcnn", align=tmp_path / "marks.txt", progress=False)
    with pytest.raises(ValueError, match="--choice must be one of largest, central"):
        pack_images(photos, tmp_path / "x", detect="mtcnn", choice="biggest", progress=False)
    with pytest.raises(ValueError, match="aligned crop size must be a multiple of 112 or 128"):
        pack_images(photos, tmp_path / "x", detect="mtcnn", resize=100, progress=False)
    for folder in ("alice", "grace", "pair"):
        shutil.rmtree(photos / folder)
    with pytest.raises(ValueError, match=r"no face was found in any of the 1 photos under .*nothing was packed"):
        pack_images(photos, tmp_path / "x", detect="mtcnn", progress=False)
    assert not (tmp_path / "x").exists()
