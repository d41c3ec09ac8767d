"""Procedural demo data set: valid files, balanced pairs, deterministic, identity structure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import simplejpeg

from facemargin.data.formats.verification import load_bin
from facemargin.data.sources.recordio import FaceRecordSet
from facemargin.data.tools.inspect import inspect_dir
from facemargin.data.tools.synthetic import DEFAULT_PARAMS, ensure_demo_dataset, make_demo_dataset, render_identity

SMALL = dict(num_identities=5, images_per_identity=3, num_val_identities=4, num_val_pairs=20)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "a", **SMALL)


def test_demo_set_is_a_valid_insightface_set(small_demo):
    info = inspect_dir(small_demo, decode=15)
    assert info["ok"], info["problems"]
    assert info["layout"] == "insightface" and info["num_images"] == 15 and info["decoded"] == 15
    assert info["num_classes"] == 5 and info["image_size"] == (112, 112)
    assert (small_demo / "property").read_text() == "5,112,112"
    fs = FaceRecordSet(small_demo)
    assert fs.labels().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    label, data = fs.read(1)
    img = simplejpeg.decode_jpeg(data, colorspace="RGB")
    assert label == 0 and img.shape == (112, 112, 3) and img.dtype == np.uint8
    manifest = json.loads((small_demo / "manifest.json").read_text())
    assert manifest == {"version": "demo-v1", **DEFAULT_PARAMS, **SMALL}


def test_val_pairs_balanced_per_fold(small_demo):
    images, issame = load_bin(small_demo / "demo_val.bin")
    assert len(images) == 40 and issame.shape == (20,)
    assert issame.sum() == 10
    assert [int(f.sum()) for f in np.split(issame, 10)] == [1] * 10  # 2 pairs per fold, 1 same
    shapes = {simplejpeg.decode_jpeg(im).shape for im in images}
    assert shapes == {(112, 112, 3)}
    assert len(set(images)) == 40  # every image is a distinct rendering


def test_deterministic_for_a_seed(small_demo, tmp_path):
    again = make_demo_dataset(tmp_path / "b", **SMALL)
    for name in ("train.rec", "train.idx", "property", "demo_val.bin"):
        assert (again / name).read_bytes() == (small_demo / name).read_bytes(), name
    other = make_demo_dataset(tmp_path / "c", **{**SMALL, "seed": 1})
    assert (other / "train.rec").read_bytes() != (small_demo / "train.rec").read_bytes()


def test_images_of_an_identity_vary_but_cluster():
    imgs, labels = [], []
    for ident in range(10):
        for im in render_identity(ident, 4, split=1):
            imgs.append(im)
            labels.append(ident)
    # nuisance: no two renderings of one identity are pixel-identical
    assert all(not np.array_equal(imgs[i], imgs[i + 1]) for i in range(0, 40, 4))
    # identity: 1-NN on a crude 7x7 colour thumbnail of the face centre beats chance (0.1) clearly
    feats = np.stack([im[28:84, 28:84].astype(np.float32).reshape(7, 8, 7, 8, 3).mean((1, 3)).ravel() for im in imgs])
    feats -= feats.mean(1, keepdims=True)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    sim = feats @ feats.T
    np.fill_diagonal(sim, -np.inf)
    labels = np.array(labels)
    assert (labels[sim.argmax(1)] == labels).mean() > 0.5


def test_ensure_generates_once_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEMARGIN_CACHE", str(tmp_path / "cache"))
    path = ensure_demo_dataset(**SMALL)
    assert path.parent == tmp_path / "cache" and path.name.startswith("demo-v1-")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [path.name]  # temp dir renamed away
    stamp = (path / "train.rec").stat().st_mtime_ns
    assert ensure_demo_dataset(**SMALL) == path
    assert (path / "train.rec").stat().st_mtime_ns == stamp
    explicit = ensure_demo_dataset(tmp_path / "elsewhere", **SMALL)
    assert explicit.parent == tmp_path / "elsewhere"
    assert (explicit / "train.rec").read_bytes() == (path / "train.rec").read_bytes()


def test_ensure_default_name_and_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="unknown parameters \\['num_ids'\\]"):
        ensure_demo_dataset(tmp_path, num_ids=3)
    target = tmp_path / "demo-v1"
    target.mkdir()
    (target / "stray").write_text("x")
    with pytest.raises(FileExistsError, match="demo-v1 exists but is incomplete"):
        ensure_demo_dataset(tmp_path)  # default parameters map to <root>/demo-v1
