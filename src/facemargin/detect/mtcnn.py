"""The offline default detector: MTCNN (Zhang et al. 2016), the cascade insightface aligned MS1M with.

Three small networks run in turn: **P-Net** slides over an image pyramid (scales ``12 / min_face_size
* factor^k`` down to a 12-pixel face) and proposes boxes; **R-Net** rescores and refines 24x24
crops of the survivors; **O-Net** rescores 48x48 crops and returns the final box and the 5 landmarks.
Each stage keeps boxes scoring at least its threshold, corrects them by the regressed offsets
(fractions of the box's width and height), squares them about their centre and suppresses
overlaps (intersection over union 0.5 within one pyramid level, 0.7 across levels and after
R-Net; 0.7 of the smaller box after O-Net).

The weights are the original MTCNN models as ``facenet-pytorch`` ships them in its wheel
(``facenet_pytorch/data/{pnet,rnet,onet}.pt``, plain state dicts, 1.9 MB together). They are
located with :mod:`importlib.metadata` and read with ``torch.load(weights_only=True)``: that
package's code is never imported. ``weights_dir=`` reads the three files from a folder instead.

The pyramid and the crops are resampled by area (a box filter), the crops padded with black
outside the photo, as MTCNN's were; inputs are normalised as the nets were trained, ``(x - 127.5)
/ 128`` on RGB. torch, Pillow and numpy only (no torchvision: a DataLoader worker imports little).
The networks were converted from a framework that stored images transposed, so their dense layers
read features column-major (hence the ``permute(0, 3, 2, 1)`` before flattening). The landmarks
come out in the ArcFace template's order (image-left eye first), checked on real photos in
``tests/test_detect.py``.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import UserError
from .base import Face
from .boxes import nms, square_boxes

__all__ = ["MTCNN", "WEIGHT_FILES", "WEIGHT_SHA256", "WEIGHTS_PACKAGE", "mtcnn_weight_files"]

#: The registry package whose wheel carries the weights, and the files inside it.
WEIGHTS_PACKAGE = "facenet-pytorch"
WEIGHT_FILES = {"pnet": "facenet_pytorch/data/pnet.pt", "rnet": "facenet_pytorch/data/rnet.pt",
                "onet": "facenet_pytorch/data/onet.pt"}
#: SHA-256 of those files (identical in facenet-pytorch 2.5.3 and 2.6.0): the weights this module was checked with
WEIGHT_SHA256 = {"pnet": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
                 "rnet": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
                 "onet": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d"}
_INSTALL = "pip install 'facenet-pytorch>=2.5.3,<2.6' --no-deps (a weights-only dependency of facemargin)"


class PNet(nn.Module):
    """Proposal net: fully convolutional, one 12x12 window per output cell (stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return F.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


class RNet(nn.Module):
    """Refinement net on 24x24 crops: face probability and box offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).flatten(1)
        x = self.prelu4(self.dense4(x))
        return F.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """Output net on 48x48 crops: face probability, box offsets and 5 landmarks (x1..x5, y1..y5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).flatten(1)
        x = self.prelu5(self.dense5(x))
        return F.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def mtcnn_weight_files(weights_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """``{"pnet": path, "rnet": path, "onet": path}``: from ``weights_dir``, else from the installed
    ``facenet-pytorch`` distribution (found by its metadata, never imported)."""
    if weights_dir is not None:
        files = {net: Path(weights_dir).expanduser() / Path(rel).name for net, rel in WEIGHT_FILES.items()}
        where = f"weights_dir={weights_dir}"
    else:
        try:
            dist = metadata.distribution(WEIGHTS_PACKAGE)
        except metadata.PackageNotFoundError:
            raise UserError(f"the MTCNN detector's weights ship in the {WEIGHTS_PACKAGE} wheel, which is not installed",
                            hint=_INSTALL) from None
        files = {net: Path(str(dist.locate_file(rel))) for net, rel in WEIGHT_FILES.items()}
        where = f"{WEIGHTS_PACKAGE} {dist.version}"
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise UserError(f"MTCNN weights missing ({where}): {', '.join(missing)}",
                        hint=None if weights_dir is not None else _INSTALL)
    return files


def _load_net(net: nn.Module, path: Path) -> nn.Module:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise UserError(f"{path}: not the {type(net).__name__} weights MTCNN expects ({str(err).splitlines()[0]})") from None
    return net.eval().requires_grad_(False)


class MTCNN:
    """MTCNN face detector: ``detector(image uint8 [H, W, 3] RGB) -> list[Face]`` (see the module doc).

    ``min_face_size``: the smallest face searched for, in pixels (the pyramid's first scale is
    ``12 / min_face_size``); ``thresholds``: the P-Net, R-Net and O-Net score thresholds (the last
    is the detector's threshold on :attr:`Face.score`); ``factor``: the pyramid's scale step;
    ``device``: where the nets run; ``weights_dir``: a folder holding ``pnet.pt``, ``rnet.pt`` and
    ``onet.pt`` (default: the ``facenet-pytorch`` wheel). The nets load on the first call, so an
    instance is cheap to build and to send to DataLoader workers (it pickles without them).
    """

    name = "mtcnn"

    def __init__(self, min_face_size: float = 20.0, thresholds: Sequence[float] = (0.6, 0.7, 0.8),
                 factor: float = 0.709, device: str = "cpu", weights_dir: str | None = None,
                 max_batch: int = 512) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)
        if len(self.thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in self.thresholds):
            raise UserError(f"detector.thresholds: three scores in [0, 1] (P-Net, R-Net, O-Net), got {list(thresholds)}")
        if not 0.0 < float(factor) < 1.0:
            raise UserError(f"detector.factor: the pyramid's scale step must be in (0, 1), got {factor}")
        if not float(min_face_size) >= 1.0:
            raise UserError(f"detector.min_face_size: a size in pixels >= 1, got {min_face_size}")
        self.min_face_size, self.factor = float(min_face_size), float(factor)
        self.device, self.max_batch = str(device), int(max_batch)
        self.weights_dir = None if weights_dir in (None, "") else str(weights_dir)
        self._files = mtcnn_weight_files(self.weights_dir)
        self._nets: tuple[PNet, RNet, ONet] | None = None
        self._key: str | None = None

    @property
    def cache_key(self) -> str:
        """``mtcnn-<weights digest>-<options>``: changes with the weights or any option that changes the faces."""
        if self._key is None:
            digest = hashlib.sha256("".join(self._digests().values()).encode()).hexdigest()[:12]
            opts = f"min{self.min_face_size:g}-t{'-'.join(f'{t:g}' for t in self.thresholds)}-f{self.factor:g}"
            self._key = f"mtcnn-{digest}-{opts}"
        return self._key

    def _digests(self) -> dict[str, str]:
        return {net: hashlib.sha256(path.read_bytes()).hexdigest() for net, path in self._files.items()}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_nets": None}

    def __repr__(self) -> str:
        return (f"MTCNN(min_face_size={self.min_face_size:g}, thresholds={list(self.thresholds)}, "
                f"factor={self.factor:g}, device={self.device!r})")

    def _networks(self) -> tuple[PNet, RNet, ONet]:
        if self._nets is None:
            if self.weights_dir is None:
                changed = [str(self._files[n]) for n, d in self._digests().items() if d != WEIGHT_SHA256[n]]
                if changed:
                    raise UserError(f"{', '.join(changed)}: not the MTCNN weights facenet-pytorch 2.5.3 ships "
                                    "(another version of the package?)", hint=_INSTALL)
            nets = (PNet(), RNet(), ONet())
            # channels-last: these few-channel convolutions run several times faster on a CPU
            self._nets = tuple(_load_net(n, self._files[k]).to(self.device, memory_format=torch.channels_last)  # type: ignore[assignment]
                               for n, k in zip(nets, ("pnet", "rnet", "onet")))
        return self._nets  # type: ignore[return-value]

    def scales(self, height: int, width: int) -> list[float]:
        """The pyramid: ``12 / min_face_size * factor^k`` while the shorter side stays >= 12 pixels."""
        out, scale = [], 12.0 / self.min_face_size
        while min(height, width) * scale >= 12.0:
            out.append(scale)
            scale *= self.factor
        return out

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> list[Face]:
        img = np.asarray(image)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise UserError(f"a detector takes a uint8 RGB image [H, W, 3], got {img.dtype} {list(img.shape)}")
        pnet, rnet, onet = self._networks()
        photo = Image.fromarray(np.ascontiguousarray(img))
        boxes = self._propose(pnet, photo)
        if len(boxes):
            boxes = self._refine(rnet, photo, boxes, 24, self.thresholds[1])
        if not len(boxes):
            return []
        return self._output(onet, photo, boxes)

    def _propose(self, pnet: PNet, photo: Image.Image) -> np.ndarray:
        """P-Net over the pyramid: regressed, squared boxes ``[N, 4]``."""
        w, h = photo.size
        found = []
        for scale in self.scales(h, w):
            sh, sw = math.ceil(h * scale), math.ceil(w * scale)
            # area resampling (box filter), as MTCNN's pyramid was built
            level = torch.from_numpy(np.array(photo.resize((sw, sh), Image.BOX))).to(self.device)
            level = (level.permute(2, 0, 1)[None].float() - 127.5) * 0.0078125
            prob, reg = pnet(level.contiguous(memory_format=torch.channels_last))
            ys, xs = torch.nonzero(prob[0] >= self.thresholds[0], as_tuple=True)
            if not len(ys):
                continue
            # output cell (y, x) sees the 12x12 window at (2x, 2y) of the level; map its edges back
            cell = torch.stack([xs, ys, xs + 6, ys + 6], 1).double().cpu().numpy() * 2
            boxes = cell * np.array([w / sw, h / sh, w / sw, h / sh]) - 0.5
            scores = prob[0, ys, xs].double().cpu().numpy()
            offsets = reg[0, :, ys, xs].T.double().cpu().numpy()
            keep = nms(boxes, scores, 0.5)
            found.append((boxes[keep], scores[keep], offsets[keep]))
        if not found:
            return np.zeros((0, 4))
        boxes, scores, offsets = (np.concatenate(parts) for parts in zip(*found))
        keep = nms(boxes, scores, 0.7)
        return square_boxes(_regress(boxes[keep], offsets[keep]))

    def _crops(self, photo: Image.Image, boxes: np.ndarray, size: int) -> Tensor:
        """``[N, 3, size, size]`` normalised crops of ``boxes`` (edges), black outside the photo as in
        MTCNN: the pixels whose centres lie in the box, resampled by area (a box filter)."""
        crops = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
        for i, (x0, y0, x1, y1) in enumerate(np.ceil(boxes).astype(np.int64).tolist()):
            box = (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))
            crops[i] = np.asarray(photo.crop(box).resize((size, size), Image.BOX))  # crop pads with black
        x = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).float()
        return (x - 127.5) * 0.0078125

    def _run(self, net: nn.Module, crops: Tensor) -> list[np.ndarray]:
        crops = crops.contiguous(memory_format=torch.channels_last)
        parts = [net(crops[i:i + self.max_batch]) for i in range(0, len(crops), self.max_batch)]
        return [torch.cat(outs).double().cpu().numpy() for outs in zip(*parts)]

    def _refine(self, rnet: RNet, photo: Image.Image, boxes: np.ndarray, size: int, threshold: float) -> np.ndarray:
        """R-Net: rescored, regressed, squared boxes."""
        scores, offsets = self._run(rnet, self._crops(photo, boxes, size))
        ok = scores >= threshold
        boxes, scores, offsets = boxes[ok], scores[ok], offsets[ok]
        keep = nms(boxes, scores, 0.7)
        return square_boxes(_regress(boxes[keep], offsets[keep]))

    def _output(self, onet: ONet, photo: Image.Image, boxes: np.ndarray) -> list[Face]:
        """O-Net: final scores, boxes and landmarks, best score first."""
        scores, offsets, points = self._run(onet, self._crops(photo, boxes, 48))
        ok = scores >= self.thresholds[2]
        boxes, scores, offsets, points = boxes[ok], scores[ok], offsets[ok], points[ok]
        size = (boxes[:, 2:] - boxes[:, :2])[:, None, :]  # [N, 1, 2] width, height
        # landmarks are fractions of the box measured from its first pixel's centre (half a pixel in)
        marks = boxes[:, None, :2] + 0.5 + np.stack([points[:, :5], points[:, 5:]], axis=2) * size
        boxes = _regress(boxes, offsets)
        keep = nms(boxes, scores, 0.7, overlap="min")
        return [Face(boxes[i], float(scores[i]), marks[i]) for i in keep]


def _regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Boxes moved edge by edge by ``offsets * (width, height, width, height)``."""
    wh = boxes[:, 2:] - boxes[:, :2]
    return boxes + offsets * np.concatenate([wh, wh], axis=1)
