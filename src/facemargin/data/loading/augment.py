"""Face augmentations on uint8 batches, on the batch's device, seeded by counters (exact resume).

:class:`FaceAugment` is AdaFace's training augmentation (Kim et al., CVPR 2022, and its code
``dataset/augmenter.py``), applied per sample with its own probability, in AdaFace's order:

1. **crop** (p = 0.2): a box drawn like ``RandomResizedCrop`` (area 20-100 % of the image, aspect
   3/4-4/3, 10 tries, else the centre fallback) is *kept in place* and everything outside it set to
   zero. The paper calls it cropping; the code never resizes the box, it zero-pads it back to the
   full frame, and we follow the code. A face partly outside the frame is what it simulates.
2. **low resolution** (p = 0.2): downscale to a side ratio drawn from [0.2, 1.0] and upscale back,
   with the down and up interpolations each drawn from nearest / bilinear / area / bicubic. AdaFace
   draws from five OpenCV modes; torch has no Lanczos, so we draw from four.
3. **photometric** (p = 0.2): brightness, contrast and saturation factors each drawn from
   [0.5, 1.5], applied in a random order (``ColorJitter(0.5, 0.5, 0.5, hue=0)``), each step clipped
   to [0, 255] like the PIL/torchvision operations.
4. **grayscale** (p = 0, off in AdaFace's recipe, which has no such step): luma replicated to
   three channels, for sets that mix colour and grey photos.

The call is ``augment(images_uint8 [B, 3, H, W], sample_index int64 [B], epoch) -> uint8 images``.
Every random decision of a sample is a hash of ``(seed, epoch, sample index, operation, draw)``
(:func:`counter_uniform`, splitmix64 in numpy), never a global RNG: the output for a sample does not depend on the rest of
its batch, the worker that loaded it or the process's RNG history, so a resumed run augments
exactly as the uninterrupted one. The image work is batched tensor ops on the input's device;
a low-resolution pass is one pair of per-sample ``[H, H]`` / ``[W, W]`` matrix products (the
down- and up-sampling operators multiplied together).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .plan import hash_uniform

__all__ = ["FaceAugment", "counter_uniform"]

_MODES = ("nearest", "bilinear", "area", "bicubic")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
_CROP_TRIES = 10
# independent streams of draws: adding an operation never changes another's draws
_CROP, _LOWRES, _PHOTO, _GRAY = 1, 2, 3, 4


def counter_uniform(seed: int, epoch: int, index: np.ndarray, stream: int, num: int) -> np.ndarray:
    """``float64 [len(index), num]`` uniforms in [0, 1), a pure function of every argument.

    Draw ``k`` of ``stream`` is :func:`~facemargin.data.loading.plan.hash_uniform` (the flips' splitmix64
    hash of ``(seed, epoch, index)``) under the seed ``seed * 2**16 + stream * 2**8 + k``: streams
    and draws never share a seed with each other or with the flips.
    """
    if not 0 <= stream < 256 or not 0 <= num < 256:
        raise ValueError(f"counter_uniform: stream and num must be in [0, 256), got {stream}, {num}")
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    base = (int(seed) << 16) + (int(stream) << 8)
    return np.stack([hash_uniform(base + k, epoch, index) for k in range(num)], axis=1).reshape(index.size, num)


@lru_cache(maxsize=1024)
def _resize_matrix(n_in: int, n_out: int, mode: str) -> torch.Tensor:
    """The ``[n_out, n_in]`` matrix of torch's 1-D resize ``mode`` (columns = resized unit vectors)."""
    eye = torch.eye(n_in, dtype=torch.float64)
    if mode == "bicubic":
        out = F.interpolate(eye[:, None, None, :], size=(1, n_out), mode="bicubic", align_corners=False)
    elif mode == "bilinear":
        out = F.interpolate(eye[:, None, :], size=n_out, mode="linear", align_corners=False)
    else:
        out = F.interpolate(eye[:, None, :], size=n_out, mode=mode)
    return out.reshape(n_in, n_out).T.contiguous()


def _luma(x: torch.Tensor) -> torch.Tensor:
    """float ``[b, 3, H, W]`` -> ``[b, 1, H, W]``."""
    return _LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]


def _check_pair(name: str, pair: tuple[float, float], upper: float | None) -> tuple[float, float]:
    lo, hi = (float(v) for v in pair)
    if not (0.0 < lo <= hi and (upper is None or hi <= upper)):
        raise ValueError(f"FaceAugment: {name} must be 0 < low <= high{'' if upper is None else f' <= {upper}'}, got {pair}")
    return lo, hi


class FaceAugment:
    """AdaFace's augmentations as a seeded batch transform (see the module docstring).

    ``*_p`` are per-sample probabilities (0 turns a step off); the ranges are AdaFace's defaults.
    :meth:`params` returns every per-sample decision; ``__call__`` applies them.
    """

    def __init__(
        self,
        seed: int = 0,
        crop_p: float = 0.2,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        low_res_p: float = 0.2,
        low_res_ratio: tuple[float, float] = (0.2, 1.0),
        low_res_modes: tuple[str, ...] = _MODES,
        photometric_p: float = 0.2,
        brightness: float = 0.5,
        contrast: float = 0.5,
        saturation: float = 0.5,
        grayscale_p: float = 0.0,
    ) -> None:
        for name, p in (("crop_p", crop_p), ("low_res_p", low_res_p), ("photometric_p", photometric_p),
                        ("grayscale_p", grayscale_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"FaceAugment: {name} must be in [0, 1], got {p}")
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0.0 <= v < 1.0:
                raise ValueError(f"FaceAugment: {name} must be in [0, 1), got {v}")
        bad = [m for m in low_res_modes if m not in _MODES]
        if bad or not low_res_modes:
            raise ValueError(f"FaceAugment: low_res_modes must be a non-empty subset of {_MODES}, got {tuple(low_res_modes)}")
        self.seed = int(seed)
        self.crop_p, self.low_res_p = float(crop_p), float(low_res_p)
        self.photometric_p, self.grayscale_p = float(photometric_p), float(grayscale_p)
        self.crop_scale = _check_pair("crop_scale", crop_scale, 1.0)
        self.crop_ratio = _check_pair("crop_ratio", crop_ratio, None)
        self.low_res_ratio = _check_pair("low_res_ratio", low_res_ratio, 1.0)
        self.low_res_modes = tuple(low_res_modes)
        self.jitter = np.array([brightness, contrast, saturation], dtype=np.float64)

    def __repr__(self) -> str:
        return (f"FaceAugment(seed={self.seed}, crop_p={self.crop_p}, low_res_p={self.low_res_p}, "
                f"photometric_p={self.photometric_p}, grayscale_p={self.grayscale_p})")

    def params(self, sample_index: np.ndarray | torch.Tensor, epoch: int, height: int, width: int) -> dict[str, np.ndarray]:
        """Every random decision for these samples (a pure function of seed, epoch and index).

        ``crop`` / ``low_res`` / ``photometric`` / ``grayscale``: bool [B], whether the step runs;
        ``box``: [B, 4] (top, left, height, width) kept by the crop; ``low_res_size``: [B, 2] the
        small (height, width); ``low_res_modes``: [B, 2] indices into ``low_res_modes`` for the
        down- and up-sampling; ``factors``: [B, 3] brightness, contrast, saturation; ``order``:
        [B, 3] the order they are applied in (0 = brightness, 1 = contrast, 2 = saturation).
        """
        index = np.asarray(torch.as_tensor(sample_index).reshape(-1).to("cpu", torch.int64))
        H, W, k = int(height), int(width), _CROP_TRIES
        c = counter_uniform(self.seed, epoch, index, _CROP, 3 + 2 * k)
        area = H * W * (self.crop_scale[0] + (self.crop_scale[1] - self.crop_scale[0]) * c[:, 3:3 + k])
        lo, hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        aspect = np.exp(lo + (hi - lo) * c[:, 3 + k:])
        w = np.round(np.sqrt(area * aspect)).astype(np.int64)
        h = np.round(np.sqrt(area / aspect)).astype(np.int64)
        ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
        rows, first = np.arange(index.size), ok.argmax(axis=1)
        h, w = h[rows, first], w[rows, first]
        top = np.floor(c[:, 1] * (H - h + 1)).astype(np.int64)
        left = np.floor(c[:, 2] * (W - w + 1)).astype(np.int64)
        fallback = ~ok.any(axis=1)  # torchvision's centre fallback: the whole image within the aspect range
        fh = int(round(W / self.crop_ratio[0])) if W / H < self.crop_ratio[0] else H
        fw = int(round(H * self.crop_ratio[1])) if W / H > self.crop_ratio[1] else W
        h[fallback], w[fallback], top[fallback], left[fallback] = fh, fw, (H - fh) // 2, (W - fw) // 2

        r = counter_uniform(self.seed, epoch, index, _LOWRES, 4)
        ratio = self.low_res_ratio[0] + (self.low_res_ratio[1] - self.low_res_ratio[0]) * r[:, 1]
        small = np.stack([np.maximum(1, (ratio * H).astype(np.int64)), np.maximum(1, (ratio * W).astype(np.int64))], 1)
        modes = np.minimum((r[:, 2:4] * len(self.low_res_modes)).astype(np.int64), len(self.low_res_modes) - 1)

        p = counter_uniform(self.seed, epoch, index, _PHOTO, 7)
        g = counter_uniform(self.seed, epoch, index, _GRAY, 1)
        return {
            "crop": c[:, 0] < self.crop_p, "box": np.stack([top, left, h, w], 1),
            "low_res": r[:, 0] < self.low_res_p, "low_res_size": small, "low_res_modes": modes,
            "photometric": p[:, 0] < self.photometric_p,
            "factors": 1.0 + self.jitter * (2.0 * p[:, 1:4] - 1.0), "order": np.argsort(p[:, 4:7], axis=1),
            "grayscale": g[:, 0] < self.grayscale_p,
        }

    def __call__(self, images: torch.Tensor, sample_index: torch.Tensor, epoch: int) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FaceAugment expects uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if torch.as_tensor(sample_index).numel() != images.shape[0]:
            raise ValueError(f"FaceAugment: {images.shape[0]} images but {torch.as_tensor(sample_index).numel()} sample indices")
        prm = self.params(sample_index, epoch, images.shape[2], images.shape[3])
        out = images
        for flag, step in (("crop", self._crop), ("low_res", self._low_res),
                           ("photometric", self._photometric), ("grayscale", self._gray)):
            chosen = np.flatnonzero(prm[flag])
            if chosen.size == 0:
                continue
            if chosen.size == len(prm[flag]):
                out = step(out, prm)
                continue
            if out is images:
                out = images.clone()
            rows = torch.as_tensor(chosen, device=out.device)
            out[rows] = step(out[rows], {k: v[chosen] for k, v in prm.items()})
        return out

    # ---- the steps: ``x`` uint8 [b, 3, H, W] of the chosen samples, ``prm`` their parameters
    @staticmethod
    def _crop(x: torch.Tensor, prm: dict[str, np.ndarray]) -> torch.Tensor:
        dev, (H, W) = x.device, x.shape[-2:]
        top, left, h, w = (torch.as_tensor(prm["box"][:, i], device=dev)[:, None] for i in range(4))
        ys, xs = torch.arange(H, device=dev)[None], torch.arange(W, device=dev)[None]
        keep = (((ys >= top) & (ys < top + h))[:, None, :, None]) & (((xs >= left) & (xs < left + w))[:, None, None, :])
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=dev))

    def _low_res(self, x: torch.Tensor, prm: dict[str, np.ndarray]) -> torch.Tensor:
        H, W = x.shape[-2:]
        names, sizes, modes = self.low_res_modes, prm["low_res_size"], prm["low_res_modes"]

        def operators(n: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Down [b, 1, s_max, n] and up [b, 1, n, s_max], zero-padded to the largest small side."""
            s_max = int(sizes[:, axis].max())
            down = torch.zeros(len(sizes), 1, s_max, n, dtype=torch.float32)
            up = torch.zeros(len(sizes), 1, n, s_max, dtype=torch.float32)
            for i, (s, (d, u)) in enumerate(zip(sizes[:, axis].tolist(), modes.tolist())):
                down[i, 0, :s] = _resize_matrix(n, s, names[d])
                up[i, 0, :, :s] = _resize_matrix(s, n, names[u])
            return down.to(x.device), up.to(x.device)

        dh, uh = operators(H, 0)
        dw, uw = (dh, uh) if H == W else operators(W, 1)
        small = dh @ x.to(torch.float32) @ dw.transpose(-1, -2)  # [b, 3, s_max, s_max]; padding stays 0
        y = uh @ small @ uw.transpose(-1, -2)
        return y.round_().clamp_(0, 255).to(torch.uint8)

    @staticmethod
    def _photometric(x: torch.Tensor, prm: dict[str, np.ndarray]) -> torch.Tensor:
        """Each step blends ``y`` with black (brightness), its mean grey (contrast) or its grey image (saturation)."""
        dev = x.device
        factors = torch.as_tensor(prm["factors"], dtype=torch.float32, device=dev)
        order = torch.as_tensor(prm["order"], device=dev)
        luma = torch.tensor(_LUMA, dtype=torch.float32, device=dev)
        y = x.to(torch.float32)
        for step in range(3):
            op = order[:, step]
            f = factors.gather(1, op[:, None])[:, 0]
            mean_gray = (y.mean(dim=(2, 3)) * luma).sum(1)
            gray = _luma(y) if bool((op == 2).any()) else None
            y.mul_(f.view(-1, 1, 1, 1)).add_(torch.where(op == 1, (1 - f) * mean_gray, 0.0).view(-1, 1, 1, 1))
            if gray is not None:
                y.addcmul_(gray, torch.where(op == 2, 1 - f, 0.0).view(-1, 1, 1, 1))
            y.clamp_(0, 255)
        return y.round_().to(torch.uint8)

    @staticmethod
    def _gray(x: torch.Tensor, prm: dict[str, np.ndarray]) -> torch.Tensor:
        return _luma(x.to(torch.float32)).round_().to(torch.uint8).expand(-1, 3, -1, -1)
