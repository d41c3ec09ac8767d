"""``data=folder`` on raw photos: faces detected once and kept by content (``data.detect``), photos
cropped and resized (``data.crop/resize``) or aligned from a list (``data.landmarks``) with the
pixels ``pack`` writes, photos left out listed, and a folder that cannot train saying so at open.
Real photos from registry packages (:mod:`raw_photos`); detections counted by a detector that logs."""

from __future__ import annotations

import logging
import os
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image
from raw_photos import CountingDetector, calls, identity_folder, pixels_digest, scaled

from facemargin.align import align_face
from facemargin.data.formats.image import decode_image
from facemargin.data.loading.loader import BatchReader, BatchRequest
from facemargin.data.module import FaceRecordDataModule
from facemargin.data.sources.face_store import FaceStore, StoreContents
from facemargin.data.sources.photos import PhotoOptionError
from facemargin.data.sources.recordio import FaceRecordSet
from facemargin.data.tools.pack import pack_images
from facemargin.detect.landmarks import read_landmarks
from facemargin.detect.mtcnn import MTCNN
from facemargin.detect.pipeline import detect_and_align
from facemargin.detect.samples import packaged_photo
from facemargin.errors import UserError
from facemargin.preflight import check_input_size


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return identity_folder(tmp_path_factory.mktemp("raw") / "photos")


def photo_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def folder(root: Path, log: Path, cache: Path, **options) -> FaceRecordDataModule:
    options.setdefault("batch_size", 2)
    options.setdefault("num_workers", 0)
    return FaceRecordDataModule(root, source="folder", detect=CountingDetector(str(log)), face_cache=cache,
                                flip_p=0.0, **options)


def all_images(source) -> np.ndarray:
    """Every sample of ``source`` as the workers make it (uint8 [N, H, W, 3], no flip)."""
    images, _, index = BatchReader(source, flip_p=0.0)[BatchRequest(0, np.arange(len(source)))]
    assert index.tolist() == list(range(len(source)))
    return images.permute(0, 2, 3, 1).numpy()


def report_dir(cache: Path, root: Path) -> Path:
    (found,) = cache.glob(f"*/folders/{root.name}-*")
    return found


@pytest.fixture(scope="module")
def detected(photos, tmp_path_factory):
    """One detection pass over ``photos``: ``(datamodule, cache, log)``."""
    tmp = tmp_path_factory.mktemp("detected")
    dm = folder(photos, tmp / "calls.log", tmp / "cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests' own detectors: the same floats
    try:
        dm.setup("fit")
    finally:
        torch.set_num_threads(threads)
    return dm, tmp / "cache", tmp / "calls.log"


def test_raw_photos_become_the_aligned_faces_the_detector_finds(photos, detected) -> None:
    dm, cache, log = detected
    files = photo_files(photos)
    assert (dm.num_classes, dm.image_size, len(files)) == (3, (112, 112), 10)
    # each photo detected exactly once, the one without a face included
    digests = {pixels_digest(decode_image(p.read_bytes())): p for p in files}
    assert sorted(d for _, _, d in calls(log)) == sorted(digests)
    source = dm.source
    kept = [Path(source.where(i)) for i in range(len(source))]
    assert kept == [p for p in files if p.name != "coffee.png"]  # left out, the rest in folder order
    lists = report_dir(cache, photos)
    assert (lists / "noface.txt").read_text() == "grace_hopper/coffee.png\n"
    assert (lists / "several.txt").read_text() == "astronaut/with_grace.png\n"  # the collage: two faces
    labels = source.labels().tolist()
    assert labels == [["astronaut", "grace_hopper", "photographer"].index(p.parent.name) for p in kept]

    # the pixels: the crop detect_and_align makes of each photo with a fresh detector (no store)
    images = all_images(source)
    detector = MTCNN()
    used = read_landmarks(lists / "faces.txt", photos)
    for image, path in zip(images, kept):
        crop, found = detect_and_align(detector, decode_image(path.read_bytes()))
        assert np.array_equal(image, crop), path
        np.testing.assert_allclose(used[str(path)], found.face.landmarks, atol=1e-3)
    # the collage's largest face is the astronaut's: its crop is close to her portrait's
    portrait, collage = (images[kept.index(photos / "astronaut" / n)].astype(float) for n in ("portrait.png", "with_grace.png"))
    hopper = images[kept.index(photos / "grace_hopper" / "portrait.jpg")].astype(float)
    assert np.abs(collage - portrait).mean() < 0.6 * np.abs(collage - hopper).mean()


def test_the_face_store_serves_later_runs_epochs_and_workers(photos, detected, tmp_path) -> None:
    _, cache, _ = detected
    log = tmp_path / "calls.log"
    dm = folder(photos, log, cache, num_workers=2, batch_size=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    seen = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        seen += [index.tolist() for _, _, index in loader]
    assert len(seen) == 2 * (9 // 3) and calls(log) == []  # two epochs, two workers: no detection
    assert len(dm.source) == 9

    # the rule for several faces changes without detecting: the collage's central face is Grace Hopper
    central = folder(photos, log, cache, choice="central")
    central.setup("fit")
    assert calls(log) == []
    position = [Path(central.source.where(i)) for i in range(len(central.source))].index(photos / "astronaut" / "with_grace.png")
    face = all_images(central.source)[position].astype(float)
    hopper = all_images(dm.source)[[Path(dm.source.where(i)).name == "portrait.jpg" for i in range(9)].index(True)].astype(float)
    astronaut = all_images(dm.source)[0].astype(float)  # astronaut/closer.jpg
    assert np.abs(face - hopper).mean() < 0.6 * np.abs(face - astronaut).mean()


def test_a_changed_photo_is_detected_again_a_copied_or_touched_one_is_not(photos, detected, tmp_path) -> None:
    _, cache, _ = detected
    root = tmp_path / "copy"
    shutil.copytree(photos, root)  # new paths, same contents: found by content
    log = tmp_path / "calls.log"
    folder(root, log, cache).setup("fit")
    assert calls(log) == []

    changed = root / "photographer" / "mirrored.jpg"
    Image.fromarray(scaled(packaged_photo("camera")[40:480, 30:470], 0.6)).save(changed, quality=90)
    touched = root / "astronaut" / "portrait.png"
    os.utime(touched, ns=(1_000_000_000, 1_000_000_000))  # another mtime, the same bytes
    dm = folder(root, log, cache)
    dm.setup("fit")
    assert [d for _, _, d in calls(log)] == [pixels_digest(decode_image(changed.read_bytes()))]
    new = [Path(dm.source.where(i)) for i in range(len(dm.source))].index(changed)
    crop, _ = detect_and_align(MTCNN(), decode_image(changed.read_bytes()))
    assert np.array_equal(all_images(dm.source)[new], crop)  # the new photo's face, not the old one's


def test_the_store_keeps_only_settled_files_and_compacts(tmp_path) -> None:
    from facemargin.data.sources.face_store import MAX_SEGMENTS, FileStat, PhotoFaces, file_stat, racy

    photo = tmp_path / "p.jpg"
    photo.write_bytes(b"x")
    stat = file_stat(str(photo))
    assert racy(stat, stat.ctime_ns + 10**9) and not racy(stat, stat.ctime_ns + 3 * 10**9)
    store = FaceStore(tmp_path / "store", "key-1")
    empty = PhotoFaces((4, 4), np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)))
    for k in range(MAX_SEGMENTS + 1):
        store.write(StoreContents({bytes([k]) * 32: empty}, {(f"/p{k}", FileStat(k, 1, 2, 3, 4)): bytes([k]) * 32}))
    assert len(store.segments()) == MAX_SEGMENTS + 1
    store.compact()
    (merged,) = store.segments()
    contents = store.load()
    assert len(contents.faces) == len(contents.files) == MAX_SEGMENTS + 1
    assert contents.files[("/p3", FileStat(3, 1, 2, 3, 4))] == bytes([3]) * 32
    assert FaceStore(tmp_path / "store", "key-2").load().faces == {}  # another detector's faces are not used
    merged.write_bytes(b"not a segment")
    assert not FaceStore(tmp_path / "store", "key-1").load()  # a damaged segment: detected again, not a crash


class _Broken(MTCNN):
    def __call__(self, image):
        raise RuntimeError("the detector broke")


def _two_ranks(paths_of_rank, detector_of_rank, store) -> list:
    """``locate_faces`` on 2 threads joined by an all-gather of their payloads: each rank's result or exception."""
    import threading

    from facemargin.data.sources.faces import locate_faces

    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def exchange_for(rank):
        def exchange(payload):
            slots[rank] = payload
            barrier.wait()
            return list(slots)
        return exchange

    def rank_main(rank):
        try:
            out[rank] = locate_faces(paths_of_rank(rank), detector_of_rank(rank), store, rank=rank, world=2,
                                     exchange=exchange_for(rank))
        except Exception as exc:
            out[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


def test_ranks_share_the_photos_and_fail_together(photos, tmp_path) -> None:
    from facemargin.data.sources.base import SourceError

    paths = [str(p) for p in photo_files(photos)]
    store = FaceStore(tmp_path / "store", MTCNN().cache_key)
    broken = _two_ranks(lambda r: paths, lambda r: MTCNN() if r == 0 else _Broken(), store)
    assert isinstance(broken[1], RuntimeError) and isinstance(broken[0], SourceError)
    assert "finding faces failed on rank 1: RuntimeError: the detector broke" in str(broken[0])
    differ = _two_ranks(lambda r: paths[r:], lambda r: MTCNN(), FaceStore(tmp_path / "other", "k"))
    assert all(isinstance(e, SourceError) and "the ranks listed different photos" in str(e) for e in differ)
    found = _two_ranks(lambda r: paths, lambda r: MTCNN(), FaceStore(tmp_path / "fresh", "k"))
    assert found[0].detected + found[1].detected == found[0].detected_all == len(paths)  # each photo once
    assert found[0].detected == (len(paths) + 1) // 2 and found[0].landmarks.keys() == found[1].landmarks.keys()
    assert all(np.array_equal(found[0].landmarks[i], found[1].landmarks[i]) for i in found[0].landmarks)


def lfw_style(root: Path) -> Path:
    """Two people, 250x250 photos with the face in the centre (as LFW frames them), and one 256x150 photo."""
    astronaut, hopper = packaged_photo("astronaut"), packaged_photo("grace_hopper")
    shots = {"astronaut/1.jpg": scaled(astronaut[0:400, 25:425], 0.625), "astronaut/2.png": scaled(astronaut[20:420, 45:445], 0.625)[:, ::-1],
             "grace_hopper/1.jpg": scaled(hopper[40:540, 6:506], 0.5), "grace_hopper/wide.png": scaled(hopper[100:400, 0:512], 0.5)}
    for name, image in shots.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(image)).save(root / name, **({"quality": 92} if name.endswith(".jpg") else {}))
    return root


def reference_frame(path: Path, crop: str | None, resize: int | None) -> np.ndarray:
    """The crop and resize as the options document them, written here with Pillow alone."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    if crop is None and resize is not None and w != h:
        crop = "square"
    if crop is not None:
        cw, ch = ((int(v) for v in crop.split("x")) if "x" in crop else
                  [round(min(w, h) * (1.0 if crop == "square" else float(crop)))] * 2)
        im = im.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
    if resize is not None:
        im = im.resize((resize, resize), Image.BICUBIC)
    return np.asarray(im)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


@pytest.mark.parametrize("crop, resize, quality", [("0.5", 112, "fast"), (None, 112, "fast"), (None, 112, "full"),
                                                    ("square", 96, "high"), ("120x100", None, "fast")])
def test_crop_and_resize_give_the_pixels_pack_writes(tmp_path, crop, resize, quality) -> None:
    root = lfw_style(tmp_path / "lfw")
    if resize is None:
        (root / "grace_hopper" / "wide.png").unlink()  # a crop alone keeps the photos' own size: one size
    dm = FaceRecordDataModule(root, source="folder", crop=crop, resize=resize, resize_quality=quality, num_workers=0,
                              batch_size=1, flip_p=0.0)
    files = photo_files(root)
    expected = reference_frame(files[0], crop, resize).shape[:2]
    assert dm.image_size == expected and dm.source.prepares_images
    images = all_images(dm.source)
    packed = FaceRecordSet(pack_images(root, tmp_path / "rec", resize=resize, crop=crop, resize_quality=quality,
                                       quality=100, subsampling="444", progress=False)["out_dir"])
    assert packed.image_size == dm.image_size
    for image, path, key in zip(images, files, packed.image_keys.tolist()):
        reference = reference_frame(path, crop, resize)
        if resize is None:  # a crop alone: the photo's pixels
            assert np.array_equal(image, reference), path
        elif quality == "fast" and path.suffix == ".jpg" and min(Image.open(path).size) * float(crop or 1) >= 2 * resize:
            assert psnr(image, reference) > 33.0, path  # decoded at half scale, then resized
        else:  # decoded in full: Pillow's antialiased bicubic, up to rounding
            assert np.abs(image.astype(int) - reference).max() <= 2, path
        jpeg = simplejpeg.decode_jpeg(packed.read(key)[1]).astype(float)
        assert np.abs(jpeg - image).mean() < 0.6  # the same pixels, through a quality-100 4:4:4 JPEG


def test_landmarks_align_as_pack_align_does(photos, tmp_path) -> None:
    root = tmp_path / "two"
    for name in ("astronaut/portrait.png", "grace_hopper/portrait.jpg", "grace_hopper/coffee.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photos / name, root / name)
    detector = MTCNN()
    marks = {name: detector(decode_image((root / name).read_bytes()))[0].landmarks
             for name in ("astronaut/portrait.png", "grace_hopper/portrait.jpg")}
    listing = tmp_path / "marks.txt"
    listing.write_text("".join(f"{n} " + " ".join(f"{v:.3f}" for v in m.reshape(-1)) + "\n" for n, m in marks.items()))
    dm = FaceRecordDataModule(root, source="folder", landmarks=listing, num_workers=0, batch_size=1, flip_p=0.0)
    assert dm.image_size == (112, 112) and len(dm.source) == 2  # coffee.png has no line: left out
    listed = read_landmarks(listing, root)
    images = all_images(dm.source)
    for image, name in zip(images, marks):
        assert np.array_equal(image, align_face(decode_image((root / name).read_bytes()), listed[str(root / name)]))
    (root / "grace_hopper" / "coffee.png").unlink()  # pack --align needs every photo listed
    packed = FaceRecordSet(pack_images(root, tmp_path / "rec", align=listing, quality=100, subsampling="444",
                                       progress=False)["out_dir"])
    for image, key in zip(images, packed.image_keys.tolist()):
        assert np.abs(simplejpeg.decode_jpeg(packed.read(key)[1]).astype(float) - image).mean() < 0.6


def test_a_folder_of_photos_says_its_size_and_how_to_make_faces(tmp_path, caplog) -> None:
    root = lfw_style(tmp_path / "lfw")
    (root / "grace_hopper" / "wide.png").unlink()
    with caplog.at_level(logging.INFO, logger="facemargin.data.sources.photos"):
        dm = FaceRecordDataModule(root, source="folder", num_workers=0)
    assert dm.image_size == (250, 250)
    said = caplog.text
    assert "the photos under" in said and "are 250x250" in said and "data.crop=0.5 data.resize=112" in said
    assert "data.detect=mtcnn" in said and "data.landmarks=FILE" in said
    backbone = types.SimpleNamespace(input_size=112)
    with pytest.raises(UserError, match=r"the training images are 250x250 .*lfw\) but the backbone") as err:
        check_input_size(dm.image_size, backbone, dm.root, hint=dm.size_hint(112))
    assert "data.detect=mtcnn" in err.value.hint and "data.crop=0.5 data.resize=112" in err.value.hint
    check_input_size(dm.image_size, types.SimpleNamespace(input_size=250), dm.root, hint=dm.size_hint(250))
    with pytest.raises(PhotoOptionError, match=r"data.image_size=\[112, 112\] but the photos under .*lfw are 250x250"):
        FaceRecordDataModule(root, source="folder", image_size=[112, 112], num_workers=0)
    assert FaceRecordDataModule(root, source="folder", crop="0.5", resize=112, num_workers=0).image_size == (112, 112)

    # one photo of another size: the set's size is what most headers say, the odd one is named
    # (and fails when read, or is skipped with data.on_corrupt=skip)
    Image.fromarray(np.zeros((80, 60, 3), np.uint8)).save(root / "grace_hopper" / "small.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert FaceRecordDataModule(root, source="folder", num_workers=0).image_size == (250, 250)
    assert "grace_hopper/small.png" in caplog.text
    # photos of no common size: refused at open, with the ways to make faces of them
    for i, side in enumerate((90, 100, 110, 120, 130, 140)):
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(root / "grace_hopper" / f"odd{i}.png")
    with pytest.raises(PhotoOptionError, match=r"no image size is shared by most") as err:
        FaceRecordDataModule(root, source="folder", num_workers=0)
    assert "data.resize=112" in err.value.hint


@pytest.mark.parametrize("options, message", [
    (dict(detect="mtcnn", landmarks="x.txt"), "data.detect and data.landmarks exclude each other"),
    (dict(crop="0"), r"data.crop must be 'square', a fraction in \(0, 1\] or WxH pixels, got '0'"),
    (dict(resize=0), "data.resize must be a positive size, got 0"),
    (dict(resize=100, detect="mtcnn"), "data.resize with alignment: aligned crop size must be a multiple of 112 or 128"),
    (dict(crop="square", detect="mtcnn"), "data.detect and data.crop exclude each other"),
    (dict(detect="mtcnn", choice="middle"), "data.choice must be one of largest, central, got 'middle'"),
    (dict(resize=112, decode="gpu"), "data.decode=gpu decodes the stored JPEGs as they are; data.resize prepare"),
    (dict(detect="nosuch"), "unknown detector 'nosuch'"),
])
def test_wrong_photo_options_are_named(tmp_path, options, message) -> None:
    root = lfw_style(tmp_path / "lfw")
    with pytest.raises(UserError, match=message):
        FaceRecordDataModule(root, source="folder", num_workers=0, **options)


def test_photo_options_need_data_folder(tmp_path) -> None:
    from conftest import write_face_set

    root = write_face_set(tmp_path / "set", [0, 1])
    with pytest.raises(UserError, match=r"data.crop, data.resize: options of data=folder .*data\.pack SRC OUT --crop/--resize/--align"):
        FaceRecordDataModule(root, crop="0.5", resize=112)


# --------------------------------------------------------------------------- through the CLI (slow)
TESTS = Path(__file__).resolve().parent


def train(run: Path, *overrides: str, cwd: Path) -> dict:
    """``python -m facemargin.train`` with the tiny demo backbone; returns metrics.json."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]),
           "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "facemargin.train", "data=folder", "logger=none", "~callbacks.progress_bar",
                           "trainer.max_epochs=2", f"hydra.run.dir={run}", *overrides],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_cli_trains_on_raw_photos_and_detects_each_photo_once(photos, tmp_path) -> None:
    """Two runs of 2 epochs with 2 DataLoader workers: the first detects every photo once, the second none."""
    log, cache = tmp_path / "calls.log", tmp_path / "cache"
    detect = [f"data.root={photos}", f"data.detect={{_target_:raw_photos.CountingDetector,log:{log}}}",
              f"data.face_cache={cache}", "data.batch_size=3", "data.num_workers=2"]
    first = train(tmp_path / "run1", *detect, cwd=tmp_path)
    assert first["global_step"] == 2 * (9 // 3)  # 9 photos with a face, 2 epochs
    assert sorted(d for _, _, d in calls(log)) == sorted(pixels_digest(decode_image(p.read_bytes())) for p in photo_files(photos))
    assert (tmp_path / "run1" / "faces" / "noface.txt").read_text() == "grace_hopper/coffee.png\n"
    assert "no face: 1 photos, left out -> " in (tmp_path / "run1" / "train.log").read_text()
    before = len(calls(log))
    train(tmp_path / "run2", *detect, cwd=tmp_path)
    assert len(calls(log)) == before  # the second run finds every face in the store


@pytest.mark.slow
def test_cli_trains_on_lfw_style_photos_with_crop_and_resize(tmp_path) -> None:
    root = lfw_style(tmp_path / "lfw")
    metrics = train(tmp_path / "run", f"data.root={root}", "data.crop=0.5", "data.resize=112", "data.batch_size=2",
                    "data.num_workers=0", "trainer.max_epochs=1", cwd=tmp_path)
    assert metrics["global_step"] == 2 and np.isfinite(metrics["train/loss_epoch"])


@pytest.mark.slow
def test_two_gloo_ranks_detect_each_photo_once(photos, tmp_path) -> None:
    """DDP on 2 CPU processes: the ranks share the new photos, exchange the faces, train on the same set."""
    log, cache = tmp_path / "calls.log", tmp_path / "cache"
    ddp = [f"data.root={photos}", f"data.detect={{_target_:raw_photos.CountingDetector,log:{log}}}", f"data.face_cache={cache}",
           "data.batch_size=2", "data.num_workers=1", "trainer.max_epochs=1", "trainer.devices=2", "trainer.strategy=ddp"]
    metrics = train(tmp_path / "run1", *ddp, cwd=tmp_path)
    assert metrics["global_step"] == 9 // (2 * 2)  # both ranks see all 9 faces: whole batches of 2 per rank
    logged = calls(log)
    assert sorted(d for _, _, d in logged) == sorted(pixels_digest(decode_image(p.read_bytes())) for p in photo_files(photos))
    assert sorted({rank for _, rank, _ in logged}) == ["0", "1"] and len({pid for pid, _, _ in logged}) == 2
    assert len(FaceStore(next(cache.iterdir()), "").segments()) == 2  # one segment per rank
    train(tmp_path / "run2", *ddp, cwd=tmp_path)
    assert len(calls(log)) == len(logged)


@pytest.mark.slow
def test_the_folder_benchmark_runs(tmp_path) -> None:
    import json
    import subprocess
    import sys

    bench = TESTS.parent / "benchmarks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent / "src")}
    env.pop("FACEMARGIN_PHOTO_WHEELS", None)  # the installed packages' photos only
    proc = subprocess.run([sys.executable, str(bench / "folder_faces.py"), "--repeats", "1", "--out", str(tmp_path / "w")],
                          cwd=bench, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["photos"], result["with_face"]) == (60, 36)
    assert result["store_over_first"] < 0.5 and result["copy_over_first"] < 0.5 and result["folder_over_packed"] > 0
