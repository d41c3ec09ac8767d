"""Procedural demo face set: the default data of facemargin (numpy only, no downloads).

Every identity is a cartoon "face" drawn from its own random parameters: skin tone, head shape,
hair colour and style, eye spacing/size/iris colour, brows, nose, mouth, and for some identities
glasses, a beard, a mole or freckles. Every image of an identity varies the nuisances: pose
(shift, in-plane rotation, scale, a small yaw-like shift of the features), expression (mouth
opening, eye openness), lighting (brightness, a directional gradient, a colour cast), background
colour and pixel noise. Identity cues are strong next to the nuisances, so a small CNN trained
for a couple of minutes verifies held-out identities well above chance, while no two images are
pixel-identical.

:func:`make_demo_dataset` writes, in the insightface layout::

    out_dir/train.rec, train.idx, property   training identities (RGB JPEG, 112x112)
    out_dir/demo_val.bin                     verification pairs of *held-out* identities:
                                             half same-identity, half different, each block of
                                             ``num_val_pairs / 10`` pairs balanced (10-fold protocol)
    out_dir/manifest.json                    the generation parameters

:func:`ensure_demo_dataset` builds it once under ``$FACEMARGIN_CACHE/demo-v1`` (default
``~/.cache/facemargin/demo-v1``), atomically, and returns the path on every later call.
Output is deterministic for a given seed (same bytes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from ...config import cache_home
from ..formats.verification import write_bin
from .pack import write_faceset

__all__ = ["DEMO_VERSION", "DEFAULT_PARAMS", "make_demo_dataset", "ensure_demo_dataset", "render_identity"]

DEMO_VERSION = "demo-v1"
DEFAULT_PARAMS = dict(
    num_identities=200,
    images_per_identity=12,
    num_val_identities=40,
    num_val_pairs=300,
    image_size=112,
    seed=0,
)
_JPEG_QUALITY = 90
log = logging.getLogger(__name__)
_TRAIN, _VAL = 0, 1

_HAIR_COLOURS = np.array(
    [[25, 20, 18], [60, 40, 25], [110, 70, 35], [190, 150, 80], [160, 60, 25], [150, 150, 150],
     [235, 225, 200], [40, 40, 90], [120, 30, 90], [30, 80, 60]], dtype=np.float32)
_IRIS_COLOURS = np.array(
    [[70, 45, 25], [40, 90, 160], [60, 120, 60], [110, 110, 120], [20, 15, 10]], dtype=np.float32)


# --------------------------------------------------------------------------- identities
def _identity_params(rng: np.random.Generator) -> dict:
    """Random, fixed appearance of one identity (canonical coordinates in [-1, 1], y down)."""
    tone = rng.uniform(0.0, 1.0)
    skin = np.array([95, 60, 40], np.float32) + tone * np.array([150, 145, 135], np.float32)
    skin = skin * rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    p = dict(
        skin=np.clip(skin, 30, 250),
        head_rx=rng.uniform(0.50, 0.70), head_ry=rng.uniform(0.66, 0.86), head_cy=rng.uniform(0.0, 0.10),
        hair=_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * rng.uniform(0.85, 1.15),
        bald=rng.random() < 0.12, long_hair=rng.random() < 0.35,
        hairline=rng.uniform(0.35, 0.75), hair_tilt=rng.uniform(-0.35, 0.35), hair_puff=rng.uniform(1.02, 1.20),
        eye_dx=rng.uniform(0.20, 0.34), eye_y=rng.uniform(-0.18, 0.02),
        eye_rx=rng.uniform(0.07, 0.12), eye_ry=rng.uniform(0.035, 0.065),
        iris=_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] * rng.uniform(0.8, 1.2),
        brow_gap=rng.uniform(0.08, 0.17), brow_w=rng.uniform(0.08, 0.15), brow_h=rng.uniform(0.015, 0.04),
        brow_tilt=rng.uniform(-0.5, 0.5),
        nose_len=rng.uniform(0.12, 0.30), nose_w=rng.uniform(0.04, 0.10),
        mouth_y=rng.uniform(0.32, 0.52), mouth_w=rng.uniform(0.12, 0.26), mouth_h=rng.uniform(0.025, 0.06),
        lips=np.array([150, 60, 60], np.float32) * rng.uniform(0.7, 1.25, size=3).astype(np.float32),
        ear_ry=rng.uniform(0.10, 0.18),
        glasses=rng.random() < 0.25, frame=rng.uniform(0, 200, size=3).astype(np.float32),
        beard=rng.random() < 0.2,
        mole=(rng.uniform(-0.35, 0.35), rng.uniform(-0.05, 0.45)) if rng.random() < 0.4 else None,
        freckles=rng.uniform([-0.4, 0.0], [0.4, 0.3], size=(12, 2)) if rng.random() < 0.25 else None,
        blush=rng.uniform(0.0, 0.35),
    )
    return p


def _nuisance(rng: np.random.Generator, n: int) -> dict:
    """Per-image pose, expression, lighting and background (arrays of length n)."""
    return dict(
        tx=rng.uniform(-0.07, 0.07, n), ty=rng.uniform(-0.07, 0.07, n),
        rot=rng.uniform(-0.17, 0.17, n), scale=rng.uniform(0.92, 1.08, n),
        yaw=rng.uniform(-0.05, 0.05, n),
        mouth_open=rng.uniform(0.0, 1.0, n) * (rng.random(n) < 0.5), eye_open=rng.uniform(0.55, 1.0, n),
        bright=rng.uniform(0.78, 1.22, n), grad=rng.uniform(0.0, 0.30, n), grad_dir=rng.uniform(0, 2 * np.pi, n),
        cast=rng.uniform(0.94, 1.06, (n, 3)),
        bg=rng.uniform(40, 220, (n, 3)), noise=rng.uniform(2.0, 7.0, n),
    )


# --------------------------------------------------------------------------- drawing
def _ellipse(u: np.ndarray, v: np.ndarray, cx, cy, rx, ry, soft: float = 0.15) -> np.ndarray:
    """Soft-edged filled ellipse mask in [0, 1]."""
    d = ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2
    return np.clip((1.0 - d) / soft, 0.0, 1.0)


def _paint(img: np.ndarray, mask: np.ndarray, colour) -> None:
    """img = img * (1 - mask) + mask * colour, in place (img [H, W, 3], mask [H, W])."""
    m = mask[..., None]
    img += m * (np.asarray(colour, np.float32) - img)


class _Canvas:
    """One image being drawn: canonical coordinates (u, v) of every pixel and windowed painting."""

    def __init__(self, X: np.ndarray, Y: np.ndarray, tx: float, ty: float, rot: float, scale: float, yaw: float):
        c, s = float(np.cos(rot)), float(np.sin(rot))
        x0, y0 = X - tx, Y - ty
        self.u = (c * x0 + s * y0) / scale
        self.v = (-s * x0 + c * y0) / scale
        self.f = self.u - yaw  # facial features shift sideways a little with "yaw"
        self.c, self.s, self.tx, self.ty, self.scale, self.yaw = c, s, tx, ty, scale, yaw
        self.H, self.W = X.shape
        self.img = np.empty((self.H, self.W, 3), np.float32)

    def window(self, cu: float, cv: float, r: float) -> tuple[slice, slice] | None:
        """Pixel slices covering the canonical disc (cu, cv, r) (cu in u coordinates)."""
        x = self.scale * (self.c * cu - self.s * cv) + self.tx
        y = self.scale * (self.s * cu + self.c * cv) + self.ty
        col, row = (x + 1) * 0.5 * self.W - 0.5, (y + 1) * 0.5 * self.H - 0.5
        rp = r * self.scale * 0.5 * self.W + 2
        r0, r1 = max(int(row - rp), 0), min(int(row + rp) + 2, self.H)
        c0, c1 = max(int(col - rp), 0), min(int(col + rp) + 2, self.W)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def ellipse(self, cx, cy, rx, ry, colour, soft: float = 0.15, alpha: float = 1.0, feature: bool = True) -> None:
        """Paint a soft ellipse; ``feature`` ellipses move with the yaw shift."""
        sl = self.window(cx + (self.yaw if feature else 0.0), cy, max(rx, ry))
        if sl is None:
            return
        uu = (self.f if feature else self.u)[sl]
        m = _ellipse(uu, self.v[sl], cx, cy, rx, ry, soft)
        _paint(self.img[sl], m if alpha == 1.0 else alpha * m, colour)


def _draw(p: dict, q: dict, i: int, X: np.ndarray, Y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render image ``i`` of an identity; returns uint8 [H, W, 3] RGB."""
    cv = _Canvas(X, Y, q["tx"][i], q["ty"][i], q["rot"][i], q["scale"][i], q["yaw"][i])
    u, v, f, img = cv.u, cv.v, cv.f, cv.img
    img[:] = q["bg"][i] * (1.0 + 0.15 * Y[..., None])
    skin, hair = p["skin"], p["hair"]
    hrx, hry, hcy = p["head_rx"], p["head_ry"], p["head_cy"]
    if p["long_hair"] and not p["bald"]:
        _paint(img, _ellipse(u, v, 0.0, hcy + 0.15, hrx * 1.22, hry * 1.08) * (v > hcy - 0.2), hair)
    _paint(img, np.clip((0.14 - np.abs(u)) / 0.02, 0, 1) * (v > hcy + 0.5), skin * 0.85)  # neck
    for side in (-1.0, 1.0):
        cv.ellipse(side * hrx, hcy - 0.02, 0.07, p["ear_ry"], skin * 0.9, feature=False)
    _paint(img, _ellipse(u, v, 0.0, hcy, hrx, hry, soft=0.08), skin)
    if not p["bald"]:
        line = hcy - hry * p["hairline"] + p["hair_tilt"] * 0.25 * u
        cap = _ellipse(u, v, 0.0, hcy - 0.02, hrx * p["hair_puff"], hry * 1.05, soft=0.08)
        _paint(img, cap * np.clip((line - v) / 0.03, 0, 1), hair)
    ey, dx = p["eye_y"], p["eye_dx"]
    if p["blush"] > 0.05:
        for side in (-1.0, 1.0):
            cv.ellipse(side * (dx + 0.05), ey + 0.22, 0.1, 0.07, (220, 90, 90), soft=1.0, alpha=p["blush"])
    if p["beard"]:
        sl = cv.window(cv.yaw, p["mouth_y"] + 0.1, max(hrx * 0.75, 0.3))
        if sl is not None:
            m = _ellipse(f[sl], v[sl], 0.0, p["mouth_y"] + 0.1, hrx * 0.75, 0.3, 0.3) * (v[sl] > p["mouth_y"] - 0.08)
            _paint(img[sl], 0.85 * m, hair)
    open_ry = p["eye_ry"] * q["eye_open"][i]
    for side in (-1.0, 1.0):
        ex = side * dx
        cv.ellipse(ex, ey, p["eye_rx"], open_ry, (245, 245, 240), soft=0.3)
        cv.ellipse(ex, ey, p["eye_ry"] * 1.1, min(open_ry, p["eye_ry"]) * 1.1, p["iris"], soft=0.3)
        cv.ellipse(ex, ey, 0.022, 0.022, (10, 10, 10), soft=0.4)
        by = ey - p["eye_ry"] - p["brow_gap"]
        sl = cv.window(ex + cv.yaw, by, p["brow_w"] * 1.3)
        if sl is not None:
            bu = f[sl] - ex
            bv = v[sl] - by - side * p["brow_tilt"] * 0.3 * bu
            _paint(img[sl], _ellipse(bu, bv, 0.0, 0.0, p["brow_w"], p["brow_h"], 0.4), hair * 0.8)
        if p["glasses"]:
            sl = cv.window(ex + cv.yaw, ey, p["eye_rx"] * 1.7)
            if sl is not None:
                ring = _ellipse(f[sl], v[sl], ex, ey, p["eye_rx"] * 1.7, p["eye_rx"] * 1.35, 0.25)
                inner = _ellipse(f[sl], v[sl], ex, ey, p["eye_rx"] * 1.5, p["eye_rx"] * 1.15, 0.25)
                _paint(img[sl], np.clip(ring - inner, 0, 1), p["frame"])
    if p["glasses"]:
        sl = cv.window(cv.yaw, ey, dx)
        if sl is not None:
            m = (np.abs(f[sl]) < dx - p["eye_rx"] * 1.5) * (np.abs(v[sl] - ey) < 0.015)
            _paint(img[sl], m.astype(np.float32), p["frame"])
    nose_top, nose_bot = ey + 0.05, ey + 0.05 + p["nose_len"]
    sl = cv.window(cv.yaw, (nose_top + nose_bot) / 2, p["nose_len"] / 2 + p["nose_w"])
    if sl is not None:
        fs, vs = f[sl], v[sl]
        width = p["nose_w"] * np.clip((vs - nose_top) / (nose_bot - nose_top), 0.2, 1.0)
        nose = np.clip((width - np.abs(fs)) / 0.02, 0, 1) * (vs > nose_top) * (vs < nose_bot)
        _paint(img[sl], 0.5 * nose, skin * 0.72)
    for side in (-1.0, 1.0):
        cv.ellipse(side * p["nose_w"] * 0.6, nose_bot, 0.025, 0.015, skin * 0.45, soft=0.5)
    my, mo = p["mouth_y"], q["mouth_open"][i]
    cv.ellipse(0.0, my, p["mouth_w"], p["mouth_h"] * (1 + mo), p["lips"], soft=0.3)
    if mo > 0.2:
        cv.ellipse(0.0, my, p["mouth_w"] * 0.7, p["mouth_h"] * mo, (60, 20, 25), soft=0.4)
    if p["mole"] is not None:
        cv.ellipse(p["mole"][0], p["mole"][1], 0.03, 0.03, skin * 0.35, soft=0.5)
    if p["freckles"] is not None:
        for fx, fy in p["freckles"]:
            cv.ellipse(fx, fy, 0.018, 0.018, skin * 0.6, soft=0.6, alpha=0.6)
    a = q["grad_dir"][i]
    light = q["bright"][i] * (1.0 + q["grad"][i] * (np.cos(a) * X + np.sin(a) * Y))
    img *= light[..., None] * q["cast"][i].astype(np.float32)
    img += rng.standard_normal(size=img.shape, dtype=np.float32) * np.float32(q["noise"][i])
    return np.clip(img, 0, 255).astype(np.uint8)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    Y, X = np.meshgrid(t, t, indexing="ij")
    return X, Y


def _rng(seed: int, split: int, identity: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, split, identity, stream]))


def render_identity(identity: int, num_images: int, image_size: int = 112, seed: int = 0,
                    split: int = _TRAIN, stream: int = 0) -> list[np.ndarray]:
    """``num_images`` uint8 RGB images ``[H, W, 3]`` of one procedural identity."""
    params = _identity_params(_rng(seed, split, identity))
    rng = _rng(seed, split, identity, 1 + stream)
    q = _nuisance(rng, num_images)
    X, Y = _grid(image_size)
    return [_draw(params, q, i, X, Y, rng) for i in range(num_images)]


def _jpeg(img: np.ndarray) -> bytes:
    import simplejpeg

    return simplejpeg.encode_jpeg(np.ascontiguousarray(img), quality=_JPEG_QUALITY, colorspace="RGB")


# --------------------------------------------------------------------------- dataset
def _val_pairs(num_ids: int, num_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(issame [N], identities [N, 2]): alternating same/different, shuffled inside each of 10 folds."""
    issame = np.arange(num_pairs) % 2 == 0
    for fold in np.array_split(np.arange(num_pairs), 10):
        issame[fold] = rng.permutation(issame[fold])
    ids = np.empty((num_pairs, 2), np.int64)
    for k in range(num_pairs):
        a = rng.integers(num_ids)
        b = a if issame[k] else (a + rng.integers(1, num_ids)) % num_ids
        ids[k] = (a, b)
    return issame, ids


def make_demo_dataset(
    out_dir: str | os.PathLike,
    num_identities: int = 200,
    images_per_identity: int = 12,
    num_val_identities: int = 40,
    num_val_pairs: int = 300,
    image_size: int = 112,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Generate the demo set into ``out_dir`` (train.rec/.idx/property, demo_val.bin, manifest.json);
    ``progress`` shows a bar of the images drawn on a terminal."""
    if num_val_identities < 2:
        raise ValueError("make_demo_dataset: num_val_identities must be >= 2 (different-identity pairs)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.repeat(np.arange(num_identities), images_per_identity)

    from tqdm import tqdm

    bar = tqdm(total=num_identities * images_per_identity + 2 * num_val_pairs, unit="img", desc="demo face set",
               disable=None if progress else True)  # None: shown on a terminal only

    def train_images() -> Iterator[bytes]:
        for ident in range(num_identities):
            for img in render_identity(ident, images_per_identity, image_size, seed, _TRAIN):
                bar.update()
                yield _jpeg(img)

    write_faceset(out, labels, train_images(), num_identities, (image_size, image_size))
    issame, ids = _val_pairs(num_val_identities, num_val_pairs, _rng(seed, _VAL, 1 << 30))
    need = np.bincount(ids.reshape(-1), minlength=num_val_identities)
    rendered = {j: iter(render_identity(j, int(need[j]), image_size, seed, _VAL)) for j in range(num_val_identities)
                if need[j]}
    val_images = []
    for j in ids.reshape(-1):
        val_images.append(_jpeg(next(rendered[int(j)])))
        bar.update()
    bar.close()
    write_bin(out / "demo_val.bin", val_images, issame)
    manifest = dict(version=DEMO_VERSION, **_params(num_identities, images_per_identity, num_val_identities,
                                                    num_val_pairs, image_size, seed))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return out


def _params(num_identities, images_per_identity, num_val_identities, num_val_pairs, image_size, seed) -> dict:
    return dict(num_identities=int(num_identities), images_per_identity=int(images_per_identity),
                num_val_identities=int(num_val_identities), num_val_pairs=int(num_val_pairs),
                image_size=int(image_size), seed=int(seed))


_REQUIRED = ("train.rec", "train.idx", "property", "demo_val.bin", "manifest.json")


def ensure_demo_dataset(cache_dir: str | os.PathLike | None = None, **overrides) -> Path:
    """Path of the demo set, generated on first use (atomically: temp dir, then rename).

    ``cache_dir`` is the cache root (default :func:`cache_home`); the default-parameter
    set lives in ``<root>/demo-v1``. Keyword overrides of :data:`DEFAULT_PARAMS` (e.g. a smaller
    set for tests) go to ``<root>/demo-v1-<hash>``.
    """
    unknown = set(overrides) - set(DEFAULT_PARAMS)
    if unknown:
        raise TypeError(f"ensure_demo_dataset: unknown parameters {sorted(unknown)}; valid: {sorted(DEFAULT_PARAMS)}")
    params = _params(**{**DEFAULT_PARAMS, **overrides})
    name = DEMO_VERSION
    if params != _params(**DEFAULT_PARAMS):
        name += "-" + hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_home()
    target = root / name
    if all((target / f).is_file() for f in _REQUIRED):
        return target
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists but is incomplete; delete it to regenerate the demo set")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    main_process = os.environ.get("LOCAL_RANK", "0") == "0"  # DDP ranks > 0 generate silently
    if main_process:
        log.info("generating the demo face set once into %s: %d identities x %d images + %d verification pairs",
                 target, params["num_identities"], params["images_per_identity"], params["num_val_pairs"])
    started = time.monotonic()
    try:
        make_demo_dataset(tmp, **params, progress=main_process)
        try:
            os.rename(tmp, target)  # atomic; also replaces an empty target directory
        except OSError:
            if not all((target / f).is_file() for f in _REQUIRED):
                raise  # not a concurrent writer that finished first
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if main_process:
        log.info("demo face set ready in %.0f s: %s", time.monotonic() - started, target)
    return target
