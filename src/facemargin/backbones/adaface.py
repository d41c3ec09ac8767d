"""AdaFace's IR networks (IR-18/34/50/101) in AdaFace's own module layout, registered in timm.

AdaFace (Kim et al. 2022, ``mk-minchul/AdaFace`` ``net.py``, from the face.evoLVe lineage) trains
"IR" nets that look like insightface's IResNet but are not the same network:

- module names: ``input_layer`` (conv3x3 -> BN -> PReLU), ``body.N`` (one flat list of units, N
  counting over all stages), each unit a ``res_layer`` (BN -> conv3x3 -> BN -> PReLU ->
  conv3x3(stride) -> BN) plus a ``shortcut_layer``, and ``output_layer`` (BN2d -> Dropout(0.4) ->
  flatten -> Linear -> BatchNorm1d **without** affine parameters);
- the shortcut of a unit that keeps its width is a 1x1 **max-pool** with the unit's stride (the
  first unit of the first stage strides 64 -> 64 through it), where insightface has a 1x1 conv + BN;
  a unit that changes width has a 1x1 conv + BN (``shortcut_layer.0`` / ``.1``);
- input **BGR**, ``(x / 255 - 0.5) / 0.5`` (:attr:`AdaFaceIR.input_spec`).

AdaFace's own forward returns ``(unit embedding, norm)`` with ``unit * norm`` equal to the
``output_layer`` output; this module returns that product, the un-normalised embedding every
facemargin backbone returns (``F.normalize(out)`` is AdaFace's unit embedding, ``out.norm(dim=1)``
its norm), so the weights of an AdaFace ``.ckpt`` load unchanged (``model.`` prefix stripped) and
embed exactly as AdaFace does. CVLface's IR models (``cvlface`` ``models/iresnet``) have this same
layout under a ``net.`` prefix but take **RGB**: they are registered as ``cvlface_ir*``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from timm.models import build_model_with_cfg, register_model

from ..input_spec import InputSpec
from .timm_api import FaceEmbedderTimmAPI, face_cfg

__all__ = ["ADAFACE_LAYERS", "AdaFaceIR", "IRUnit"]


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)


class IRUnit(nn.Module):
    """``res_layer(x) + shortcut_layer(x)``; the shortcut is a strided 1x1 max-pool when widths match."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        if in_chs == out_chs:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(kernel_size=1, stride=stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_chs),
            _conv3x3(in_chs, out_chs),
            nn.BatchNorm2d(out_chs),
            nn.PReLU(out_chs),
            _conv3x3(out_chs, out_chs, stride),
            nn.BatchNorm2d(out_chs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class AdaFaceIR(FaceEmbedderTimmAPI, nn.Module):
    """AdaFace IR net; ``num_classes=0`` returns the ``embedding_size``-d embedding (not normalised).

    Args:
        layers: units per stage (IR-50: 3, 4, 14, 3); each stage starts with a stride-2 unit.
        widths: channels per stage (AdaFace: 64, 128, 256, 512).
        stem_width: channels of ``input_layer`` (AdaFace: 64).
        embedding_size: output of the ``output_layer`` linear (AdaFace: 512).
        num_classes: >0 adds a linear classifier on the embedding (timm convention).
        dropout: dropout in ``output_layer`` (AdaFace trains with 0.4).
        in_chans: input channels.
        img_size: input side; the linear sees the ``img_size / 16`` grid (7x7 at 112).
        channel_order: the input the weights expect: BGR for AdaFace, RGB for CVLface's IR models.
    """

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        embedding_size: int = 512,
        num_classes: int = 0,
        dropout: float = 0.4,
        in_chans: int = 3,
        img_size: int | Sequence[int] = 112,
        channel_order: str = "BGR",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers:
            raise ValueError("AdaFaceIR needs one width per stage (layers and widths of equal length)")
        reduction = 2 ** len(layers)
        h, w = self._setup_embedder(kwargs, img_size, reduction, in_chans, embedding_size, num_classes, dropout)
        if h != w:
            raise ValueError(f"AdaFaceIR input must be square, got {h}x{w}")
        self.input_spec = InputSpec(size=h, channel_order=channel_order)

        self.input_layer = nn.Sequential(_conv3x3(in_chans, stem_width), nn.BatchNorm2d(stem_width), nn.PReLU(stem_width))
        units, chs = [], stem_width
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module="input_layer")]
        for i, (n, width) in enumerate(zip(layers, widths)):
            units += [IRUnit(chs, width, 2)] + [IRUnit(width, width, 1) for _ in range(n - 1)]
            chs = width
            self.feature_info.append(dict(num_chs=width, reduction=2 ** (i + 1), module=f"body.{len(units) - 1}"))
        self.body = nn.Sequential(*units)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(chs),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(chs * (h // reduction) * (w // reduction), embedding_size),
            nn.BatchNorm1d(embedding_size, affine=False),
        )
        self.head: nn.Module = nn.Linear(embedding_size, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():  # AdaFace's initialisation: He (fan out) for convs and linears
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^input_layer", blocks=r"^body\.(\d+)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> feature map [B, widths[-1], H/16, W/16]."""
        return self.body(self.input_layer(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> embedding [B, E] (AdaFace's ``unit * norm``) or logits."""
        x = self.output_layer(x)
        return x if pre_logits else self.head(x)


#: units per stage of AdaFace's IR nets (``net.py`` ``get_blocks``; "IR-101" has 100 layers)
ADAFACE_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    101: (3, 13, 30, 3),
}


def _cfg(origin: str) -> dict[str, Any]:
    # the channel order is not a timm cfg field: facemargin reads AdaFaceIR.input_spec
    return face_cfg("input_layer.0", origin_url=origin)


_ADAFACE = "https://github.com/mk-minchul/AdaFace"
_CVLFACE = "https://github.com/mk-minchul/CVLface"
default_cfgs: dict[str, dict[str, Any]] = {
    **{f"adaface_ir{d}": _cfg(_ADAFACE) for d in ADAFACE_LAYERS},
    **{f"cvlface_ir{d}": _cfg(_CVLFACE) for d in ADAFACE_LAYERS},
}


def _create(variant: str, depth: int, pretrained: bool = False, **kwargs: Any) -> AdaFaceIR:
    if pretrained:
        raise ValueError(f"{variant}: facemargin ships no weights; load a published file with "
                         "backbone.pretrained_file=PATH (or init_weights=PATH)")
    order = "BGR" if variant.startswith("adaface") else "RGB"
    return build_model_with_cfg(AdaFaceIR, variant, False, **{"layers": ADAFACE_LAYERS[depth], "channel_order": order, **kwargs})


@register_model
def adaface_ir18(pretrained: bool = False, **kwargs: Any) -> AdaFaceIR:
    """AdaFace IR-18 (BGR input)."""
    return _create("adaface_ir18", 18, pretrained, **kwargs)


@register_model
def adaface_ir34(pretrained: bool = False, **kwargs: Any) -> AdaFaceIR:
    """AdaFace IR-34 (BGR input)."""
    return _create("adaface_ir34", 34, pretrained, **kwargs)


@register_model
def adaface_ir50(pretrained: bool = False, **kwargs: Any) -> AdaFaceIR:
    """AdaFace IR-50 (BGR input)."""
    return _create("adaface_ir50", 50, pretrained, **kwargs)


@register_model
def adaface_ir101(pretrained: bool = False, **kwargs: Any) -> AdaFaceIR:
    """AdaFace IR-101 (BGR input; 100 layers, AdaFace's name)."""
    return _create("adaface_ir101", 101, pretrained, **kwargs)


@register_model
def cvlface_ir18(pretrained: bool = False, **kwargs: Any) -> AdaFaceIR:
    """CVLface IR-18: AdaFace's layout, RGB input."""
    return _create("cvlface_ir18", 18, pretrained, **kwargs)


@register_model
def cvlface_ir34(pretrained: bool = False, **kwargs: Any) -> AdaFaceIR:
    """CVLface IR-34: AdaFace's layout, RGB input."""
    return _create("cvlface_ir34", 34, pretrained, **kwargs)


@register_model
def cvlface_ir50(pretrained: bool = False, **kwargs: Any) -> AdaFaceIR:
    """CVLface IR-50: AdaFace's layout, RGB input."""
    return _create("cvlface_ir50", 50, pretrained, **kwargs)


@register_model
def cvlface_ir101(pretrained: bool = False, **kwargs: Any) -> AdaFaceIR:
    """CVLface IR-101: AdaFace's layout, RGB input."""
    return _create("cvlface_ir101", 101, pretrained, **kwargs)
