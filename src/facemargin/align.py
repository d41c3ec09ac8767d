"""5-point face alignment to the ArcFace template: a similarity transform and one affine warp (numpy).

insightface aligns every face the same way before embedding it (IJB-B/C evaluation, the training
sets' packer, ``insightface.utils.face_align.norm_crop``): the 5 landmarks (left eye, right eye,
nose tip, left and right mouth corners, in image pixels) are mapped onto :data:`ARCFACE_TEMPLATE`
by the least-squares similarity transform (rotation, uniform scale, translation; what skimage's
``SimilarityTransform.estimate`` returns), and the image is resampled with one bilinear affine
warp whose outside is black (OpenCV ``warpAffine(..., borderValue=0)``). Pixel ``(x, y)`` is the
centre of column ``x``, row ``y`` in both images, as in OpenCV. OpenCV rounds each sampling
position to 1/32 pixel and its weights to 1/1024; this warp computes them exactly, so a pixel can
differ from OpenCV's by a grey level.

Stable API (the packer imports it): :func:`estimate_similarity`, :func:`warp_affine`,
:func:`align_face`, :func:`arcface_template`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ARCFACE_TEMPLATE", "align_face", "arcface_template", "estimate_similarity", "warp_affine"]

#: Landmark positions of the 112x112 ArcFace crop: insightface's 96x112 template moved 8 px right.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],  # left eye (image left)
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float64,
)


def arcface_template(size: int = 112) -> np.ndarray:
    """The template for a ``size x size`` crop (insightface ``estimate_norm``).

    Multiples of 112 scale the 112 template; multiples of 128 scale it by ``size / 128`` and
    shift it right by ``8 * size / 128`` pixels (the 128 crop keeps the face centred).
    """
    if size > 0 and size % 112 == 0:
        return ARCFACE_TEMPLATE * (size / 112.0)
    if size > 0 and size % 128 == 0:
        ratio = size / 128.0
        return ARCFACE_TEMPLATE * ratio + np.array([8.0 * ratio, 0.0])
    raise ValueError(f"aligned crop size must be a multiple of 112 or 128, got {size}")


def _as_points(points: np.ndarray, what: str) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape == (10,):
        pts = pts.reshape(5, 2)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 2:
        raise ValueError(f"{what}: expected points [N >= 2, 2] (x, y), got shape {np.shape(points)}")
    if not np.isfinite(pts).all():
        raise ValueError(f"{what}: landmarks must be finite, got {pts.tolist()}")
    return pts


def estimate_similarity(landmarks: np.ndarray, template: np.ndarray | None = None) -> np.ndarray:
    """The ``2x3`` similarity ``M`` minimising ``sum |M @ [x, y, 1] - template|^2`` over the points.

    ``landmarks``: ``[5, 2]`` (or 10 numbers ``x1 y1 ... x5 y5``) in image pixels; ``template``:
    where they should land (default :data:`ARCFACE_TEMPLATE`). A similarity ``[[a, -b, tx],
    [b, a, ty]]`` is linear in ``(a, b, tx, ty)``, so this is one linear least-squares solve; it
    equals Umeyama's closed form (skimage) because ``[[a, -b], [b, a]]`` spans exactly the scaled
    rotations. Raises ``ValueError`` for coincident landmarks (no transform is defined).
    """
    src = _as_points(landmarks, "landmarks")
    dst = _as_points(ARCFACE_TEMPLATE if template is None else template, "template")
    if src.shape != dst.shape:
        raise ValueError(f"{src.shape[0]} landmarks for a template of {dst.shape[0]} points")
    if np.ptp(src, axis=0).max() < 1e-6:
        raise ValueError(f"landmarks are all at one point {src[0].tolist()}: no similarity transform")
    n = src.shape[0]
    x, y = src[:, 0], src[:, 1]
    one, zero = np.ones(n), np.zeros(n)
    # rows for u = a x - b y + tx, then v = b x + a y + ty
    A = np.concatenate([np.stack([x, -y, one, zero], 1), np.stack([y, x, zero, one], 1)])
    rhs = np.concatenate([dst[:, 0], dst[:, 1]])
    a, b, tx, ty = np.linalg.lstsq(A, rhs, rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int] | int) -> np.ndarray:
    """Resample ``image`` (``[H, W]`` or ``[H, W, C]`` uint8) so output pixel ``p`` = input at ``M^-1 p``.

    ``matrix`` maps input to output pixel coordinates (``2x3``, as for OpenCV's ``warpAffine``);
    ``size`` is the output ``(width, height)`` or one int. Bilinear interpolation; samples outside
    the input read 0. Returns uint8 (rounded to nearest).
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 image [H, W] or [H, W, C], got {img.dtype} {img.shape}")
    out_w, out_h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    M = np.asarray(matrix, dtype=np.float64)
    if M.shape != (2, 3):
        raise ValueError(f"expected a 2x3 affine matrix, got shape {M.shape}")
    inv = np.linalg.inv(np.vstack([M, [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    h, w = img.shape[:2]
    # one pixel of black around the input: every sample with -1 < x < w, -1 < y < h reads its four
    # neighbours from the padded image; samples further out are black
    inside = (sx > -1) & (sx < w) & (sy > -1) & (sy < h)
    sx, sy = np.where(inside, sx, 0.0), np.where(inside, sy, 0.0)
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = (sx - x0).astype(np.float32)[..., None], (sy - y0).astype(np.float32)[..., None]
    padded = np.pad(img.reshape(h, w, -1), ((1, 1), (1, 1), (0, 0))).astype(np.float32)
    xi, yi = x0.astype(np.intp) + 1, y0.astype(np.intp) + 1
    top = padded[yi, xi] * (1 - fx) + padded[yi, xi + 1] * fx
    bottom = padded[yi + 1, xi] * (1 - fx) + padded[yi + 1, xi + 1] * fx
    out = (top * (1 - fy) + bottom * fy) * inside[..., None]
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out[:, :, 0] if img.ndim == 2 else out


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The ``size x size`` ArcFace crop of ``image`` (uint8 ``[H, W, C]``) given its 5 landmarks."""
    return warp_affine(image, estimate_similarity(landmarks, arcface_template(size)), size)
