"""Box arithmetic the detectors share: greedy non-maximum suppression and square boxes (numpy).

Boxes are ``[N, 4]`` float arrays ``(x1, y1, x2, y2)`` of edges in the detector contract's pixel
coordinates (pixel ``(x, y)`` is the centre of column ``x``, row ``y``, so a box around exactly
pixel 0 is ``(-0.5, -0.5, 0.5, 0.5)``); a box's width is ``x2 - x1``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["box_areas", "nms", "square_boxes"]


def box_areas(boxes: np.ndarray) -> np.ndarray:
    """Areas ``[N]`` (0 for an empty box)."""
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, overlap: str = "union") -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first.

    A box is dropped when its overlap with a kept, better-scoring box exceeds ``threshold``;
    ``overlap`` is ``"union"`` (intersection over union) or ``"min"`` (intersection over the
    smaller box: MTCNN's last stage, which also drops a small box inside a larger one).
    Equal scores keep the earlier box.
    """
    if overlap not in ("union", "min"):
        raise ValueError(f"overlap must be 'union' or 'min', got {overlap!r}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = (np.ascontiguousarray(boxes[:, k]) for k in range(4))
    areas = box_areas(boxes)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep: list[int] = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.minimum(x2[rest], x2[i]) - np.maximum(x1[rest], x1[i])
        h = np.minimum(y2[rest], y2[i]) - np.maximum(y1[rest], y1[i])
        inter = np.maximum(w, 0.0) * np.maximum(h, 0.0)
        denom = areas[i] + areas[rest] - inter if overlap == "union" else np.minimum(areas[rest], areas[i])
        order = rest[inter <= threshold * denom]  # ratio <= threshold, without dividing by an empty box
    return np.array(keep, dtype=np.intp)


def square_boxes(boxes: np.ndarray) -> np.ndarray:
    """Each box grown to a square of its longer side about its centre (the crop a face net takes)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], axis=1)
