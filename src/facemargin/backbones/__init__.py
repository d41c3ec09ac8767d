"""Face backbones registered in timm, and ``build_embedder`` (images -> embeddings).

Importing this package registers ``iresnet18/34/50/100/200``, ``iresnet_demo``,
``mobilefacenet`` and ``mobilefacenet_large`` (insightface's layouts), ``adaface_ir18/34/50/101``
and ``cvlface_ir18/34/50/101`` (AdaFace's IR layout; BGR and RGB input) and ``face_vit_t/s/b/l/h``
(insightface's face ViTs) in timm's model registry, so ``timm.create_model("iresnet100")`` works
afterwards. ``build_embedder(..., pretrained_file=PATH)`` starts any of them -- and any timm
model -- from a published weights file (:mod:`facemargin.published`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..install_check import import_timm

timm = import_timm()  # first: a torchvision built for another torch is named in one line

from . import adaface as _adaface  # noqa: E402
from . import face_vit as _face_vit  # noqa: E402
from . import iresnet as _iresnet  # noqa: E402
from . import mobilefacenet as _mobilefacenet  # noqa: E402
from ..config import to_plain  # noqa: E402
from .adaface import AdaFaceIR  # noqa: E402
from .face_vit import FaceViT  # noqa: E402
from .iresnet import IBasicBlock, IResNet  # noqa: E402
from .mobilefacenet import MobileFaceNet  # noqa: E402
from .neck import EmbeddingNeck  # noqa: E402

__all__ = [
    "AdaFaceIR",
    "FACE_BACKBONES",
    "FaceViT",
    "EmbeddingNeck",
    "IBasicBlock",
    "IResNet",
    "MobileFaceNet",
    "TimmEmbedder",
    "build_embedder",
]

#: Face backbones defined here (they output the embedding themselves; no neck is added).
FACE_BACKBONES: tuple[str, ...] = (
    tuple(_iresnet.default_cfgs) + tuple(_mobilefacenet.default_cfgs) + tuple(_adaface.default_cfgs)
    + tuple(_face_vit.default_cfgs)
)


class TimmEmbedder(nn.Module):
    """A generic timm backbone (``num_classes=0``, pooled features) followed by an ``EmbeddingNeck``."""

    def __init__(self, backbone: nn.Module, embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112):
        super().__init__()
        in_features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.backbone = backbone
        self.neck = EmbeddingNeck(in_features, embedding_size, dropout)
        self.embedding_size = embedding_size
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x))


def build_embedder(
    name: str,
    embedding_size: int = 512,
    input_size: int = 112,
    dropout: float = 0.0,
    pretrained_file: str | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """Build a model mapping images ``[B, 3, input_size, input_size]`` to ``[B, embedding_size]``.

    Face backbones (``FACE_BACKBONES``) are created through timm with the embedding size, dropout
    and input size passed through. Any other timm model is created with ``pretrained=False,
    num_classes=0`` (``img_size=input_size`` where the model has a fixed input size, e.g. ViTs) and
    followed by an ``EmbeddingNeck``. A ``kwargs`` mapping (the Hydra config's field) is merged into
    ``timm_kwargs``. The returned module has ``.embedding_size`` and ``.input_size``.

    ``pretrained_file``: a local weights file to start from (never a download). A face backbone
    takes any file :mod:`facemargin.published` reads (insightface ``backbone.pth``, AdaFace
    ``.ckpt``, CVLface, a facemargin checkpoint) and must fit it exactly; another timm model takes
    that model's timm weights (``.pth`` / ``.safetensors``), adapted by timm's own filter (e.g. a
    ViT's position embeddings resized to ``input_size``), its classifier dropped.
    """
    kw: dict[str, Any] = to_plain(timm_kwargs)
    nested = kw.pop("kwargs", None)
    if nested:
        kw = {**to_plain(nested), **kw}
    pretrained = bool(kw.pop("pretrained", False))
    kw.pop("num_classes", None)  # an embedder never has a classifier

    if name in FACE_BACKBONES:
        kw.setdefault("img_size", input_size)
        model = timm.create_model(
            name, pretrained=pretrained, num_classes=0, embedding_size=embedding_size, dropout=dropout, **kw
        )
        model.input_size = input_size
        if pretrained_file:
            from ..published import load_weights_into

            load_weights_into(model, pretrained_file, name)
        return model
    if not timm.is_model(name):
        raise ValueError(
            f"unknown backbone {name!r}: face backbones are {', '.join(FACE_BACKBONES)}; "
            "any other timm architecture also works, see timm.list_models()"
        )
    if timm.get_pretrained_cfg_value(name, "fixed_input_size"):
        kw.setdefault("img_size", input_size)
    if not pretrained_file:
        backbone = timm.create_model(name, pretrained=pretrained, num_classes=0, **kw)
    else:
        from ..published import load_timm_weights

        backbone = load_timm_weights(name, pretrained_file, **kw)
    return TimmEmbedder(backbone, embedding_size, dropout, input_size)
