"""The online detector (SCRFD on ONNX Runtime) up to the fetch: anchor decoding checked against boxes
computed by hand, a small ONNX graph with det_10g's output layout run end to end, and the weights
fetched from a real HTTP server on 127.0.0.1 (or not: the message names the URL, the cache and the
offline detector)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from range_http import RangeServer

from facemargin.detect.fetch import WeightsUnavailable, fetch_weights, file_sha256
from facemargin.detect.scrfd import SCRFD, decode_scrfd, scrfd_layout
from facemargin.errors import UserError

INPUT = 64  # network input side: feature maps 8x8 (stride 8), 4x4 (16), 2x2 (32), 2 anchors a cell
COUNTS = {8: 8 * 8 * 2, 16: 4 * 4 * 2, 32: 2 * 2 * 2}
KPS = np.array([-1, -1, 1, -1, 0, 0, -1, 1, 1, 1], dtype=np.float32)


def head_outputs() -> list[np.ndarray]:
    """det_10g's 9 outputs (scores, boxes, keypoints for strides 8, 16, 32; no batch axis) with
    three candidates above 0.5 and one below (see the hand-computed boxes in the tests)."""
    scores = {s: np.zeros((n, 1), np.float32) for s, n in COUNTS.items()}
    boxes = {s: np.zeros((n, 4), np.float32) for s, n in COUNTS.items()}
    kps = {s: np.zeros((n, 10), np.float32) for s, n in COUNTS.items()}
    # stride 8, row 3, column 5, anchor 1: index (3 * 8 + 5) * 2 + 1 = 59, centre (40, 24)
    scores[8][59], boxes[8][59], kps[8][59] = 0.9, [1, 2, 3, 4], KPS
    # the same cell's anchor 0: nearly the same box, lower score -> suppressed (IoU > 0.4)
    scores[8][58], boxes[8][58], kps[8][58] = 0.8, [1.1, 2, 3, 4], KPS
    # stride 16, row 1, column 2, anchor 0: index (1 * 4 + 2) * 2 = 12, centre (32, 16)
    scores[16][12], boxes[16][12], kps[16][12] = 0.6, [0.5, 0.5, 0.5, 0.5], KPS / 2
    # stride 32, row 1, column 1, anchor 1: index (1 * 2 + 1) * 2 + 1 = 7, below the threshold
    scores[32][7], boxes[32][7] = 0.3, [1, 1, 1, 1]
    return [scores[s] for s in COUNTS] + [boxes[s] for s in COUNTS] + [kps[s] for s in COUNTS]


def test_decoding_gives_the_hand_computed_boxes_and_keypoints() -> None:
    boxes, scores, points = decode_scrfd(head_outputs(), (INPUT, INPUT), threshold=0.5)
    order = np.argsort(-scores)
    np.testing.assert_allclose(scores[order], [0.9, 0.8, 0.6], rtol=1e-6)
    # centre (40, 24), distances (1, 2, 3, 4) * 8: (40 - 8, 24 - 16, 40 + 24, 24 + 32)
    np.testing.assert_allclose(boxes[order[0]], [32, 8, 64, 56])
    np.testing.assert_allclose(boxes[order[1]], [31.2, 8, 64, 56], rtol=1e-6)
    # centre (32, 16), distances 0.5 * 16 = 8 each way
    np.testing.assert_allclose(boxes[order[2]], [24, 8, 40, 24])
    np.testing.assert_allclose(points[order[0]], [[32, 16], [48, 16], [40, 24], [32, 32], [48, 32]])
    # offsets (+-0.5) * 16 = 8 pixels about the centre (32, 16)
    np.testing.assert_allclose(points[order[2]], [[24, 8], [40, 8], [32, 16], [24, 24], [40, 24]])
    # a leading batch axis (batched exports) decodes the same
    batched = decode_scrfd([o[None] for o in head_outputs()], (INPUT, INPUT), threshold=0.5)
    np.testing.assert_array_equal(batched[0], boxes)


def test_layouts_and_malformed_outputs_are_named() -> None:
    assert scrfd_layout(9) == ((8, 16, 32), 2) and scrfd_layout(15) == ((8, 16, 32, 64, 128), 1)
    with pytest.raises(UserError, match="6 is an export without keypoints"):
        scrfd_layout(6)
    outs = head_outputs()
    outs[1] = outs[1][:-2]
    with pytest.raises(UserError, match=r"stride 16: 30 scores, 32 boxes, 32 keypoint rows for a 4x4 map with 2 anchors"):
        decode_scrfd(outs, (INPUT, INPUT), threshold=0.5)


def tiny_scrfd_onnx(path: Path) -> Path:
    """An ONNX graph with det_10g's input and 9 outputs, each a constant from :func:`head_outputs`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in COUNTS]
    nodes = [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(a, n + "_value"))
             for n, a in zip(names, head_outputs())]
    graph = helper.make_graph(
        nodes, "tiny_scrfd", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, INPUT, INPUT])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape)) for n, a in zip(names, head_outputs())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_scrfd_maps_faces_back_to_the_photo(tmp_path) -> None:
    pytest.importorskip("onnxruntime", reason="the scrfd extra (onnxruntime) is part of the dev extra")
    detector = SCRFD(model_file=str(tiny_scrfd_onnx(tmp_path / "det.onnx")), input_size=INPUT)
    # a 96x128 photo is fitted into 64x64 at scale 0.5 (48 rows of photo, black below); network pixel
    # u comes from photo pixel (u + 0.5) / 0.5 - 0.5 = 2u + 0.5
    faces = detector(np.full((96, 128, 3), 100, np.uint8))
    assert [round(f.score, 6) for f in faces] == [0.9, 0.6]
    np.testing.assert_allclose(faces[0].box, [64.5, 16.5, 128.5, 112.5])
    np.testing.assert_allclose(faces[0].landmarks, [[64.5, 32.5], [96.5, 32.5], [80.5, 48.5], [64.5, 64.5], [96.5, 64.5]])
    np.testing.assert_allclose(faces[1].box, [48.5, 16.5, 80.5, 48.5])
    assert detector.cache_key.startswith(f"scrfd-{file_sha256(detector.model_file)[:12]}-in64-t0.5")
    with pytest.raises(UserError, match=r"a detector takes a uint8 RGB image \[H, W, 3\], got float64"):
        detector(np.zeros((8, 8, 3)))


def test_unreachable_weights_name_the_url_the_cache_and_the_offline_detector(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FACEMARGIN_CACHE", str(tmp_path / "cache"))
    url = "http://127.0.0.1:1/buffalo_l.zip"  # nothing listens on port 1: refused at once
    with pytest.raises(WeightsUnavailable) as err:
        SCRFD(url=url)
    message = str(err.value)
    assert f"could not fetch the SCRFD weights from {url}" in message
    assert str(tmp_path / "cache" / "detectors" / "scrfd") in message and message.endswith("det_10g.onnx once fetched")
    assert "detector=mtcnn" in err.value.hint
    assert not list((tmp_path / "cache").rglob("*.onnx")) and not list((tmp_path / "cache").rglob("*.part"))


def test_weights_are_fetched_once_from_a_zip_and_then_read_from_the_cache(tmp_path, monkeypatch) -> None:
    pytest.importorskip("onnxruntime", reason="the scrfd extra (onnxruntime) is part of the dev extra")
    monkeypatch.setenv("FACEMARGIN_CACHE", str(tmp_path / "cache"))
    served = tmp_path / "served"
    served.mkdir()
    onnx_file = tiny_scrfd_onnx(tmp_path / "det_tiny.onnx")
    with zipfile.ZipFile(served / "pack.zip", "w") as zf:  # insightface's packs: a folder of .onnx files
        zf.writestr("pack/other.onnx", b"not this one")
        zf.write(onnx_file, "pack/det_tiny.onnx")
    with RangeServer(served) as server:
        url = server.url + "pack.zip"
        with pytest.raises(WeightsUnavailable, match="do not have the expected SHA-256 0{64}"):
            SCRFD(url=url, member="det_tiny.onnx", sha256="0" * 64, input_size=INPUT)
        with pytest.raises(WeightsUnavailable, match=r"the archive holds no det_10g\.onnx .*pack/other\.onnx"):
            SCRFD(url=url, input_size=INPUT)
        detector = SCRFD(url=url, member="det_tiny.onnx", sha256=file_sha256(onnx_file), input_size=INPUT)
        assert len(server.requests("/pack.zip")) == 3
        server.down = True  # 503 from now on: the cached copy is used without asking
        again = SCRFD(url=url, member="det_tiny.onnx", input_size=INPUT)
        with pytest.raises(WeightsUnavailable, match=r"\(HTTP 503 Service Unavailable\)"):
            fetch_weights(url, tmp_path / "elsewhere" / "x.onnx", what="test")
    assert again.model_file == detector.model_file and detector.model_file.read_bytes() == onnx_file.read_bytes()
    assert detector.model_file.is_relative_to(tmp_path / "cache" / "detectors" / "scrfd")
    assert [round(f.score, 6) for f in again(np.zeros((64, 64, 3), np.uint8))] == [0.9, 0.6]


@pytest.mark.slow
def test_detect_cli_with_unreachable_scrfd_weights_says_so_in_one_line(tmp_path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(b"")
    url = "http://127.0.0.1:1/buffalo_l.zip"
    proc = subprocess.run([sys.executable, "-m", "facemargin.detect", str(photos), "detector=scrfd", f"detector.url={url}"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FACEMARGIN_CACHE": str(tmp_path / "cache")}, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith(f"facemargin.detect: error: could not fetch the SCRFD weights from {url} (")
    assert lines[1].startswith("hint: no network? use the offline detector (detector=mtcnn)") and len(lines) == 2
