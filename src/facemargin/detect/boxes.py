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
    if overlap == "union" and len(boxes) > 32:
        import torch
        from torchvision.ops import nms as union_nms  # the same rule in C++, for the thousands of proposals

        keep = union_nms(torch.from_numpy(boxes), torch.from_numpy(np.asarray(scores, dtype=np.float64)), threshold)
        return keep.numpy().astype(np.intp)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    areas = box_areas(boxes)
    keep: list[int] = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0)
        h = np.maximum(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0)
        inter = w * h
        denom = areas[i] + areas[rest] - inter if overlap == "union" else np.minimum(areas[i], areas[rest])
        ratio = np.divide(inter, denom, out=np.zeros_like(inter), where=denom > 0)
        order = rest[ratio <= threshold]
    return np.array(keep, dtype=np.intp)


def square_boxes(boxes: np.ndarray) -> np.ndarray:
    """Each box grown to a square of its longer side about its centre (the crop a face net takes)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], axis=1)
