"""The offline detector (MTCNN from the facenet-pytorch wheel's weights) on real photos that ship in
registry packages: landmarks where the eyes, nose and mouth are (positions annotated by hand from
the photos), none on photos without a face, the largest / most central face of a collage, the
contract's landmark order, and the detector in DataLoader workers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from facemargin.align import arcface_template, estimate_similarity, warp_affine
from facemargin.detect import Face, select_face
from facemargin.detect.boxes import nms, square_boxes
from facemargin.detect.mtcnn import MTCNN
from facemargin.detect.pipeline import FaceChoice, choose_face, detect_and_align, load_detector
from facemargin.detect.samples import packaged_photo
from facemargin.errors import UserError

#: hand-annotated from the photos, zoomed 4-6x on a pixel grid: pupil centres, nose tip (the
#: brightest point of its ball), mouth corners; (x, y) in pixels, LANDMARK_NAMES order
REFERENCE = {
    "astronaut": np.array([[203, 101], [245, 102], [224, 127], [203, 140], [243, 141]], float),
    "grace_hopper": np.array([[221.5, 187.5], [301.5, 186.5], [265, 241], [229, 277], [302, 277]], float),
}
#: a landmark may be off by this fraction of the reference interocular distance (the eyes are 42
#: and 80 pixels apart: 6 and 12 pixels); a swapped pair is off by the whole distance
TOLERANCE = 0.15


@pytest.fixture(scope="module")
def detector() -> MTCNN:
    return MTCNN()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loaded 2-core machine runs these small convolutions faster on one
    yield
    torch.set_num_threads(threads)


def assert_near(points: np.ndarray, reference: np.ndarray, what: str) -> None:
    iod = float(np.linalg.norm(reference[1] - reference[0]))
    err = np.linalg.norm(np.asarray(points) - reference, axis=1)
    assert (err <= TOLERANCE * iod).all(), f"{what}: landmark errors {np.round(err, 1)} px, allowed {TOLERANCE * iod:.1f}"


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_landmarks_land_on_the_eyes_nose_and_mouth(detector, name) -> None:
    image = packaged_photo(name)
    faces = detector(image)
    assert len(faces) == 1 and faces[0].score > 0.99
    face = faces[0]
    assert_near(face.landmarks, REFERENCE[name], name)
    x1, y1, x2, y2 = face.box
    assert (face.landmarks[:, 0] > x1).all() and (face.landmarks[:, 0] < x2).all()
    assert (face.landmarks[:, 1] > y1).all() and (face.landmarks[:, 1] < y2).all()


def test_a_mirrored_photo_keeps_the_image_left_eye_first(detector) -> None:
    image = packaged_photo("astronaut")
    width = image.shape[1]
    mirrored = detector(np.ascontiguousarray(image[:, ::-1]))[0].landmarks
    # mirroring swaps which eye (and mouth corner) is on the image's left
    expected = REFERENCE["astronaut"][[1, 0, 2, 4, 3]] * [-1, 1] + [width - 1, 0]
    assert_near(mirrored, expected, "mirrored astronaut")


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_landmarks_follow_a_rotated_scaled_photo(detector, name) -> None:
    image = packaged_photo(name)
    angle, scale = np.deg2rad(20), 0.8
    T = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 60], [scale * np.sin(angle), scale * np.cos(angle), -40]])
    upright = detector(image)[0].landmarks
    faces = detector(warp_affine(image, T, (400, 400)))
    assert len(faces) == 1
    assert_near(faces[0].landmarks, upright @ T[:, :2].T + T[:, 2], f"{name} rotated 20 degrees")


def test_the_aligned_crop_is_found_again_where_alignment_put_it(detector) -> None:
    image = packaged_photo("grace_hopper")
    crop, found = detect_and_align(detector, image)
    assert crop.shape == (112, 112, 3) and found.count == 1
    M = estimate_similarity(found.face.landmarks, arcface_template(112))
    again = detector(crop)
    assert len(again) == 1
    assert_near(again[0].landmarks, found.face.landmarks @ M[:, :2].T + M[:, 2], "re-detected aligned crop")


@pytest.mark.parametrize("name", ["coffee", "rocket", "noise", "grey"])
def test_photos_without_a_face_give_none(detector, name) -> None:
    if name == "noise":
        image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    elif name == "grey":
        image = np.full((300, 300, 3), 128, np.uint8)
    else:
        image = packaged_photo(name)
    assert detector(image) == []
    crop, found = detect_and_align(detector, image)
    assert crop is None and found == FaceChoice(None, 0, "largest") and found.describe() == "no face found"


def collage() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grace Hopper at 0.35x in the centre, the astronaut at full size on the right of a grey
    1200x700 canvas; with the hand-annotated landmarks moved to where each face went."""
    canvas = np.full((700, 1200, 3), 128, np.uint8)
    hopper = np.asarray(Image.fromarray(packaged_photo("grace_hopper")).resize((179, 210), Image.BILINEAR))
    canvas[250:460, 510:689] = hopper
    canvas[94:606, 688:1200] = packaged_photo("astronaut")
    # a resize maps pixel x to (x + 0.5) * s - 0.5
    small = (REFERENCE["grace_hopper"] + 0.5) * [179 / 512, 210 / 600] - 0.5 + [510, 250]
    return canvas, small, REFERENCE["astronaut"] + [688, 94]


def test_largest_and_most_central_face_of_a_collage(detector) -> None:
    canvas, hopper_points, astronaut_points = collage()
    largest = choose_face(detector, canvas, "largest")
    central = choose_face(detector, canvas, "central")
    assert largest.count == central.count == 2
    assert_near(largest.face.landmarks, astronaut_points, "largest face")
    assert_near(central.face.landmarks, hopper_points, "central face")
    assert largest.describe().startswith("largest of 2 faces: box ") and central.describe().startswith("central of 2")
    assert central.face.area < largest.face.area
    # min_score drops faces before choosing: above every score, nothing is left
    assert choose_face(detector, canvas, "largest", min_score=1.01).count == 0
    with pytest.raises(UserError, match="face choice must be one of largest, central, got 'biggest'"):
        choose_face(detector, canvas, "biggest")


class _Photos(torch.utils.data.Dataset):
    def __init__(self, detector, images):
        self.detector, self.images = detector, images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        crop, found = detect_and_align(self.detector, self.images[i])
        return crop, found.face.landmarks


def test_a_detector_goes_to_dataloader_workers_without_its_networks(detector) -> None:
    images = [packaged_photo("astronaut"), packaged_photo("grace_hopper")]
    fresh = MTCNN()
    assert len(pickle.dumps(fresh)) < 4096  # the nets load on the first call, in the worker
    loader = torch.utils.data.DataLoader(_Photos(fresh, images), batch_size=None, num_workers=2)
    for (crop, marks), image in zip(loader, images):
        want = detector(image)[0].landmarks
        np.testing.assert_allclose(marks, want, atol=0.05)
        assert crop.shape == (112, 112, 3)
    assert fresh._nets is None  # the main process never loaded them


def test_load_detector_reads_the_config_and_its_options(detector) -> None:
    built = load_detector("mtcnn", min_face_size=40, thresholds="[0.6,0.7,0.9]")
    assert isinstance(built, MTCNN) and built.min_face_size == 40 and built.thresholds == (0.6, 0.7, 0.9)
    assert built.cache_key != detector.cache_key and built.cache_key.startswith("mtcnn-")
    assert load_detector({"_target_": "facemargin.detect.mtcnn.MTCNN", "factor": 0.5}).factor == 0.5
    assert load_detector(detector) is detector
    with pytest.raises(UserError, match=r"unknown detector 'retina'; conf/detector/ has: mtcnn, scrfd"):
        load_detector("retina")
    with pytest.raises(UserError, match=r"unknown detector option\(s\) \['min_size'\]; it has: min_face_size"):
        load_detector("mtcnn", min_size=40)
    with pytest.raises(UserError, match=r"detector.thresholds: three scores in \[0, 1\]"):
        load_detector("mtcnn", thresholds="[0.6,0.7]")
    with pytest.raises(UserError, match=r"detector: a detector config needs a _target_"):
        load_detector({"factor": 0.5})


def test_missing_weights_name_the_files(tmp_path) -> None:
    with pytest.raises(UserError, match=rf"MTCNN weights missing \(weights_dir={tmp_path}\): {tmp_path}/pnet\.pt"):
        MTCNN(weights_dir=str(tmp_path))
    (tmp_path / "pnet.pt").write_bytes(b"not a checkpoint")
    for name in ("rnet.pt", "onet.pt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(UserError, match=r"pnet\.pt: not the PNet weights MTCNN expects"):
        MTCNN(weights_dir=str(tmp_path))(np.zeros((50, 50, 3), np.uint8))


def test_pyramid_scales_follow_the_minimum_face_size() -> None:
    # 12 / 20 = 0.6, then * 0.709 while the shorter side (100 px) stays >= 12 px at that scale:
    # 60, 42.5, 30.2, 21.4, 15.2 px (12 / 0.6 / 0.709**5 = 114 > 100 stops it)
    scales = MTCNN().scales(100, 300)
    np.testing.assert_allclose(scales, [0.6 * 0.709 ** k for k in range(5)])
    assert MTCNN(min_face_size=100).scales(100, 300) == [0.12]


def test_nms_and_square_boxes_by_hand() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [2, 2, 8, 8]], float)
    scores = np.array([0.9, 0.95, 0.8, 0.99])
    # box 1 vs box 0: intersection 90, union 110 -> IoU 0.82; box 3 inside box 1: IoU 36/100, min-overlap 1
    assert nms(boxes, scores, 0.5).tolist() == [3, 1, 2]
    assert nms(boxes, scores, 0.5, overlap="min").tolist() == [3, 2]
    many = np.concatenate([boxes + 100 * k for k in range(10)])  # the C++ path (over 32 boxes) agrees
    assert sorted(nms(many, np.tile(scores, 10), 0.5).tolist()) == sorted((np.array([3, 1, 2])[:, None] + 4 * np.arange(10)).ravel().tolist())
    np.testing.assert_allclose(square_boxes(np.array([[0, 0, 10, 4]], float)), [[0, -3, 10, 7]])


def test_select_face_contract() -> None:
    small = Face([10, 10, 20, 20], 0.99, np.zeros((5, 2)))
    big = Face([50, 0, 100, 50], 0.9, np.zeros((5, 2)))
    assert select_face([small, big], (30, 100), "largest") is big
    assert select_face([small, big], (30, 30), "central") is small
    assert select_face([], (30, 30)) is None


def test_the_detector_imports_little() -> None:
    """``import facemargin.detect`` is numpy-only; running MTCNN adds torch and Pillow, not torchvision,
    Lightning or timm (a DataLoader worker or a packer pays for what it imports)."""
    run_python("import sys, numpy as np, facemargin.detect\n"
               "assert not [m for m in ('torch', 'hydra', 'PIL') if m in sys.modules], 'import facemargin.detect is not light'\n"
               "from facemargin.detect.mtcnn import MTCNN\n"
               "MTCNN()(np.zeros((60, 80, 3), np.uint8))\n"
               "heavy = [m for m in ('torchvision', 'lightning', 'timm', 'hydra') if m in sys.modules]\n"
               "assert not heavy, heavy\n")


def run_python(code: str) -> None:
    """Run ``code`` in a fresh interpreter (what it imports is its own); it must exit 0."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
