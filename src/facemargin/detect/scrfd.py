"""SCRFD (Guo et al. 2021), the detector insightface's ``FaceAnalysis`` runs, on ONNX Runtime.

An optional extra: ``pip install 'facemargin[scrfd]'`` (onnxruntime). The weights are insightface's
published ONNX export (default ``det_10g.onnx`` from the ``buffalo_l`` model pack; insightface's
pretrained models are for non-commercial research use), fetched on first use into
``$FACEMARGIN_CACHE/detectors/scrfd/`` (:mod:`.fetch`), or read from ``model_file=`` (e.g. the copy
insightface already keeps in ``~/.insightface/models/buffalo_l/``).

The photo is resized to fit ``input_size x input_size`` (aspect kept, padded with black at the
right and bottom) and normalised ``(x - 127.5) / 128`` in RGB. The network has one output triple
per feature stride ``s``: face scores ``[A, 1]``, box distances ``[A, 4]`` and keypoint offsets
``[A, 10]`` for ``A = (H / s) * (W / s) * anchors`` anchor points, row-major over the feature map
with the ``anchors`` copies of a cell adjacent; outputs are ordered all scores, then all boxes,
then all keypoints, strides ascending. Strides ``(8, 16, 32)`` with 2 anchors (9 outputs) or
``(8, 16, 32, 64, 128)`` with 1 (15 outputs). An anchor point sits at ``(column * s, row * s)``;
its box is ``(cx - d0 s, cy - d1 s, cx + d2 s, cy + d3 s)`` and keypoint ``k`` is
``(cx + o[2k] s, cy + o[2k + 1] s)`` (:func:`decode_scrfd`). Overlaps above 0.4 IoU are suppressed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import UserError
from .base import Face
from .boxes import nms
from .fetch import detector_cache, fetch_weights, file_sha256

__all__ = ["SCRFD", "SCRFD_URL", "decode_scrfd", "scrfd_layout"]

#: insightface's model pack holding ``det_10g.onnx`` (SCRFD-10GF with keypoints).
SCRFD_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip"


def scrfd_layout(num_outputs: int) -> tuple[tuple[int, ...], int]:
    """``(strides, anchors per cell)`` of an SCRFD export with keypoints, from its number of outputs."""
    layouts = {9: ((8, 16, 32), 2), 15: ((8, 16, 32, 64, 128), 1)}
    if num_outputs not in layouts:
        without = {6: "3 strides", 10: "5 strides"}.get(num_outputs)
        raise UserError(f"not an SCRFD model with 5 keypoints: {num_outputs} outputs (expected 9 or 15"
                        + (f"; {num_outputs} is an export without keypoints, {without}" if without else "") + ")")
    return layouts[num_outputs]


def decode_scrfd(outputs: Sequence[np.ndarray], input_hw: tuple[int, int], threshold: float,
                 strides: Sequence[int] | None = None, anchors: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes [N, 4], scores [N], keypoints [N, 5, 2])`` in the network input's pixels, every anchor
    scoring at least ``threshold``, before suppression (see the module doc for the layout).

    ``outputs``: the network's outputs in order (a leading batch axis of 1 is dropped);
    ``strides`` / ``anchors`` default to the layout implied by their number.
    """
    if strides is None or anchors is None:
        strides, anchors = scrfd_layout(len(outputs))
    n = len(strides)
    if len(outputs) != 3 * n:
        raise UserError(f"{len(outputs)} SCRFD outputs for {n} strides (expected {3 * n})")
    outs = [np.asarray(o, dtype=np.float32) for o in outputs]
    outs = [o[0] if o.ndim == 3 else o for o in outs]
    boxes, scores, points = [], [], []
    for k, stride in enumerate(strides):
        rows, cols = input_hw[0] // stride, input_hw[1] // stride
        score, dist, offs = outs[k].reshape(-1), outs[n + k].reshape(-1, 4), outs[2 * n + k].reshape(-1, 10)
        if not (len(score) == len(dist) == len(offs) == rows * cols * anchors):
            raise UserError(f"SCRFD stride {stride}: {len(score)} scores, {len(dist)} boxes, {len(offs)} keypoint rows "
                            f"for a {rows}x{cols} map with {anchors} anchors ({rows * cols * anchors} expected)")
        ys, xs = np.mgrid[0:rows, 0:cols]
        centres = np.repeat(np.stack([xs.reshape(-1), ys.reshape(-1)], 1) * float(stride), anchors, axis=0)
        hit = score >= threshold
        c, d = centres[hit], dist[hit] * stride
        boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
        points.append(c[:, None, :] + offs[hit].reshape(-1, 5, 2) * stride)
        scores.append(score[hit])
    return (np.concatenate(boxes).astype(np.float64), np.concatenate(scores).astype(np.float64),
            np.concatenate(points).astype(np.float64))


class SCRFD:
    """insightface's SCRFD detector on ONNX Runtime: ``detector(image uint8 [H, W, 3] RGB) -> list[Face]``.

    ``model_file``: a local ``.onnx`` (skips the fetch); ``url`` / ``member``: where the weights
    are fetched from (a zip and the file inside it, or the ``.onnx`` itself) and ``sha256`` their
    expected digest; ``input_size``: the square the photo is fitted into (a multiple of 32);
    ``threshold``: the score a face needs; ``nms_threshold``: the IoU above which the weaker of two
    boxes is dropped; ``providers``: ONNX Runtime execution providers (default CPU).
    """

    name = "scrfd"

    def __init__(self, model_file: str | None = None, url: str = SCRFD_URL, member: str = "det_10g.onnx",
                 sha256: str | None = None, input_size: int = 640, threshold: float = 0.5,
                 nms_threshold: float = 0.4, providers: Sequence[str] | None = None) -> None:
        if int(input_size) <= 0 or int(input_size) % 32:
            raise UserError(f"detector.input_size: a positive multiple of 32, got {input_size}")
        self.input_size, self.threshold, self.nms_threshold = int(input_size), float(threshold), float(nms_threshold)
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        if model_file:
            self.model_file = Path(model_file).expanduser()
            if not self.model_file.is_file():
                raise UserError(f"detector.model_file: {self.model_file} not found")
        else:
            folder = detector_cache() / "scrfd" / hashlib.sha256(url.encode()).hexdigest()[:16]
            self.model_file = fetch_weights(url, folder / member, member=member, sha256=sha256, what="SCRFD")
        self._session = None
        self._key: str | None = None

    @property
    def cache_key(self) -> str:
        if self._key is None:
            self._key = (f"scrfd-{file_sha256(self.model_file)[:12]}-in{self.input_size}"
                         f"-t{self.threshold:g}-nms{self.nms_threshold:g}")
        return self._key

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_session": None}

    def __repr__(self) -> str:
        return f"SCRFD(model_file={str(self.model_file)!r}, input_size={self.input_size}, threshold={self.threshold:g})"

    def _open(self):
        if self._session is None:
            try:
                import onnxruntime as ort
            except ImportError:
                raise UserError("the SCRFD detector runs on onnxruntime, which is not installed",
                                hint="pip install 'facemargin[scrfd]', or use the offline detector: detector=mtcnn") from None
            try:
                self._session = ort.InferenceSession(os.fspath(self.model_file), providers=self.providers)
            except Exception as err:  # noqa: BLE001 -- onnxruntime raises its own types for a bad file
                raise UserError(f"{self.model_file}: not an ONNX model ONNX Runtime can open ({err})") from None
            scrfd_layout(len(self._session.get_outputs()))
        return self._session

    def __call__(self, image: np.ndarray) -> list[Face]:
        img = np.asarray(image)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise UserError(f"a detector takes a uint8 RGB image [H, W, 3], got {img.dtype} {list(img.shape)}")
        session = self._open()
        h, w = img.shape[:2]
        ratio = min(self.input_size / h, self.input_size / w)
        nh, nw = max(1, min(self.input_size, round(h * ratio))), max(1, min(self.input_size, round(w * ratio)))
        canvas = np.zeros((self.input_size, self.input_size, 3), dtype=np.float32)
        canvas[:nh, :nw] = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR), dtype=np.float32)
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outputs = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(blob)})
        boxes, scores, points = decode_scrfd(outputs, (self.input_size, self.input_size), self.threshold)
        keep = nms(boxes, scores, self.nms_threshold)
        # input pixel u came from photo pixel (u + 0.5) / scale - 0.5 (resampling with centred pixels)
        sx, sy = nw / w, nh / h
        scale = np.array([sx, sy, sx, sy])
        boxes = (boxes[keep] + 0.5) / scale - 0.5
        points = (points[keep] + 0.5) / scale[:2] - 0.5
        return [Face(b, float(s), p) for b, s, p in zip(boxes, scores[keep], points)]
