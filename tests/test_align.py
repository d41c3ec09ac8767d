"""facemargin.align: similarity estimate against Umeyama's closed form, exact warps, a face aligned back."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facemargin.align import ARCFACE_TEMPLATE, align_face, arcface_template, estimate_similarity, warp_affine
from facemargin.data.tools.synthetic import render_identity


def similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    c, s = math.cos(math.radians(angle_deg)) * scale, math.sin(math.radians(angle_deg)) * scale
    return np.array([[c, -s, tx], [s, c, ty]])


def apply(M: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ M[:, :2].T + M[:, 2]


def invert(M: np.ndarray) -> np.ndarray:
    return np.linalg.inv(np.vstack([M, [0, 0, 1]]))[:2]


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Umeyama (1991) closed form, eqs. 34-43, as skimage's SimilarityTransform.estimate."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    U, D, Vt = np.linalg.svd(cov)
    S = np.eye(2)
    if np.linalg.det(cov) < 0:
        S[1, 1] = -1
    R = U @ S @ Vt
    scale = np.trace(np.diag(D) @ S) / (s**2).sum(1).mean()
    t = mu_d - scale * R @ mu_s
    return np.hstack([scale * R, t[:, None]])


def test_known_landmarks_land_on_the_template() -> None:
    T = similarity(23.0, 1.7, 140.0, 65.0)  # template -> image: rotated, scaled, moved
    landmarks = apply(T, ARCFACE_TEMPLATE)
    M = estimate_similarity(landmarks)
    assert np.abs(apply(M, landmarks) - ARCFACE_TEMPLATE).max() < 1e-4
    np.testing.assert_allclose(M, invert(T), atol=1e-9)
    assert M.shape == (2, 3)
    # the flat insightface text layout x1 y1 ... x5 y5 is accepted too
    np.testing.assert_allclose(estimate_similarity(landmarks.reshape(-1)), M)


def test_noisy_landmarks_give_umeyamas_least_squares_solution() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        T = similarity(rng.uniform(-60, 60), rng.uniform(0.3, 3), *rng.uniform(0, 300, 2))
        landmarks = apply(T, ARCFACE_TEMPLATE) + rng.normal(scale=3.0, size=(5, 2))
        np.testing.assert_allclose(estimate_similarity(landmarks), umeyama(landmarks, ARCFACE_TEMPLATE), atol=1e-9)


def test_templates_of_other_sizes() -> None:
    np.testing.assert_allclose(arcface_template(224), 2 * ARCFACE_TEMPLATE)
    t128 = arcface_template(128)  # insightface estimate_norm: ratio 1, x + 8
    np.testing.assert_allclose(t128[:, 0], ARCFACE_TEMPLATE[:, 0] + 8.0)
    np.testing.assert_allclose(t128[:, 1], ARCFACE_TEMPLATE[:, 1])
    with pytest.raises(ValueError, match="multiple of 112 or 128, got 100"):
        arcface_template(100)


def test_warp_integer_shift_and_quarter_turn_are_exact() -> None:
    img = np.random.default_rng(1).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    shifted = warp_affine(img, np.array([[1.0, 0, 2], [0, 1.0, 1]]), (8, 6))
    want = np.zeros_like(img)
    want[1:, 2:] = img[:-1, :-2]
    np.testing.assert_array_equal(shifted, want)
    # output (x, y) = input (y, 5 - x)... i.e. np.rot90 of a square image, counter-clockwise
    sq = img[:6, :6]
    rot = warp_affine(sq, np.array([[0.0, 1, 0], [-1, 0, 5]]), 6)
    np.testing.assert_array_equal(rot, np.rot90(sq))


def test_warp_half_pixel_is_the_neighbour_average_and_gray_images_work() -> None:
    img = np.array([[0, 100, 200, 50]], dtype=np.uint8).repeat(2, 0)
    out = warp_affine(img, np.array([[1.0, 0, -0.5], [0, 1.0, 0]]), (4, 2))
    assert out.shape == (2, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], [50, 150, 125, 25])  # last column mixes with the black outside


def test_rotated_and_scaled_face_aligns_back() -> None:
    face = render_identity(5, 1)[0]  # a 112x112 demo face; pretend it is the aligned crop
    T = similarity(-31.0, 1.6, 30.0, 100.0)  # the face as it appears in a loose 300x300 photo
    photo = warp_affine(face, T, (300, 300))
    landmarks = apply(T, ARCFACE_TEMPLATE)  # where a detector would find the template points
    aligned = align_face(photo, landmarks)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    inner = (slice(8, 104), slice(8, 104))
    err = np.abs(aligned[inner].astype(float) - face[inner]).mean()
    # a 4-degree error about the crop centre is visible: the exact transform must do far better
    about_centre = np.vstack([similarity(4.0, 1.0, 0, 0), [0, 0, 1]])
    about_centre[:2, 2] = np.array([56.0, 56.0]) - about_centre[:2, :2] @ [56.0, 56.0]
    off = warp_affine(photo, (about_centre @ np.vstack([estimate_similarity(landmarks), [0, 0, 1]]))[:2], 112)
    err_off = np.abs(off[inner].astype(float) - face[inner]).mean()
    assert err < 2.5 and err < err_off / 3, (err, err_off)


def test_bad_landmarks_are_refused() -> None:
    with pytest.raises(ValueError, match=r"all at one point"):
        estimate_similarity(np.ones((5, 2)))
    with pytest.raises(ValueError, match=r"expected points \[N >= 2, 2\]"):
        estimate_similarity(np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"must be finite"):
        estimate_similarity(np.full((5, 2), np.nan))
    with pytest.raises(ValueError, match=r"4 landmarks for a template of 5"):
        estimate_similarity(ARCFACE_TEMPLATE[:4])
    with pytest.raises(ValueError, match=r"expected a uint8 image"):
        align_face(np.zeros((10, 10, 3), np.float32), ARCFACE_TEMPLATE)
