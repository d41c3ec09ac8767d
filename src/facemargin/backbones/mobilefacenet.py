"""MobileFaceNet (Chen et al. 2018) in insightface's ``mbf`` layout, registered in timm.

Body: a stride-2 3x3 stem, a 3x3 conv with 64 groups, then stages of inverted-residual "depthwise" units
(1x1 expand -> 3x3 depthwise -> 1x1 linear projection, residual when shapes match), with a
stride-2 unit between stages (112 -> 56 -> 28 -> 14 -> 7), a 1x1 conv to 512 channels and the
GDC head: a 7x7 global depthwise conv + BN, flatten, Linear(512, E, bias=False), BatchNorm1d(E).
``scale`` multiplies the body widths (insightface ``mbf``: blocks (1, 4, 6, 2), scale 2).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from timm.models import build_model_with_cfg, register_model

from .timm_api import FaceEmbedderTimmAPI, face_cfg

__all__ = ["MobileFaceNet"]


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> optional PReLU."""

    def __init__(
        self, in_chs: int, out_chs: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_chs),
        )
        if act:
            self.append(nn.PReLU(out_chs))


class DepthwiseUnit(nn.Module):
    """1x1 expand to ``mid`` -> depthwise 3x3 (stride) -> 1x1 linear projection (+ residual)."""

    def __init__(self, in_chs: int, out_chs: int, mid: int, stride: int = 1, residual: bool = False) -> None:
        super().__init__()
        if residual and (stride != 1 or in_chs != out_chs):
            raise ValueError("a residual unit keeps shape")
        self.residual = residual
        self.expand = ConvBNAct(in_chs, mid, 1)
        self.dw = ConvBNAct(mid, mid, 3, stride, groups=mid)
        self.project = ConvBNAct(mid, out_chs, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x)))
        return x + out if self.residual else out


def _residual_stage(chs: int, mid: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[DepthwiseUnit(chs, chs, mid, residual=True) for _ in range(n)])


class MobileFaceNet(FaceEmbedderTimmAPI, nn.Module):
    """MobileFaceNet; ``num_classes=0`` returns the ``embedding_size``-d embedding.

    Args:
        blocks: residual units in the four stages (a first stage of 1 = one grouped 3x3 conv).
        scale: width multiplier of the body (64*scale and 128*scale channels).
        embedding_size: embedding dimension (output of the final BatchNorm1d).
        num_classes: >0 adds a linear classifier on the embedding.
        dropout: dropout on the GDC output before the embedding linear layer.
        in_chans: input channels.
        img_size: input side (multiple of 16); the GDC kernel covers the whole ``img_size/16`` grid.
        feature_chs: channels of the last 1x1 conv (the GDC width), 512 in insightface.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
        embedding_size: int = 512,
        num_classes: int = 0,
        dropout: float = 0.0,
        in_chans: int = 3,
        img_size: int | Sequence[int] = 112,
        feature_chs: int = 512,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        h, w = self._setup_embedder(kwargs, img_size, 16, in_chans, embedding_size, num_classes, dropout)
        c1, c2 = 64 * scale, 128 * scale

        self.stem = ConvBNAct(in_chans, c1, 3, stride=2)  # 56x56
        # insightface's single-block first stage is a grouped 3x3 conv with 64 groups (depthwise at scale 1)
        self.stage1 = ConvBNAct(c1, c1, 3, groups=64) if blocks[0] == 1 else _residual_stage(c1, 128, blocks[0])
        self.down2 = DepthwiseUnit(c1, c1, 128, stride=2)  # 28x28
        self.stage2 = _residual_stage(c1, 128, blocks[1])
        self.down3 = DepthwiseUnit(c1, c2, 256, stride=2)  # 14x14
        self.stage3 = _residual_stage(c2, 256, blocks[2])
        self.down4 = DepthwiseUnit(c2, c2, 512, stride=2)  # 7x7
        self.stage4 = _residual_stage(c2, 256, blocks[3])
        self.conv_sep = ConvBNAct(c2, feature_chs, 1)
        self.feature_info = [
            dict(num_chs=c1, reduction=2, module="stage1"),
            dict(num_chs=c1, reduction=4, module="stage2"),
            dict(num_chs=c2, reduction=8, module="stage3"),
            dict(num_chs=feature_chs, reduction=16, module="conv_sep"),
        ]
        # GDC: global depthwise conv over the whole final grid, then linear embedding.
        self.gdc = nn.Sequential(
            nn.Conv2d(feature_chs, feature_chs, (h // 16, w // 16), groups=feature_chs, bias=False),
            nn.BatchNorm2d(feature_chs),
        )
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(feature_chs, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        self.head: nn.Module = nn.Linear(embedding_size, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # --- timm conventions -------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> feature map [B, 512, H/16, W/16]."""
        x = self.stage1(self.stem(x))
        x = self.stage2(self.down2(x))
        x = self.stage3(self.down3(x))
        x = self.stage4(self.down4(x))
        return self.conv_sep(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> GDC embedding [B, E] (``pre_logits`` or ``num_classes=0``) or logits."""
        x = torch.flatten(self.gdc(x), 1)
        x = self.features(self.fc(self.dropout(x)))
        return x if pre_logits else self.head(x)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return face_cfg("stem.0", **{"paper_ids": "arXiv:1804.07573", **kwargs})


default_cfgs: dict[str, dict[str, Any]] = {"mobilefacenet": _cfg(), "mobilefacenet_large": _cfg()}


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> MobileFaceNet:
    if pretrained:
        raise ValueError(f"{variant}: facemargin ships no pretrained weights; use pretrained=False")
    return build_model_with_cfg(MobileFaceNet, variant, pretrained, **kwargs)


@register_model
def mobilefacenet(pretrained: bool = False, **kwargs: Any) -> MobileFaceNet:
    """MobileFaceNet as insightface ``mbf``: blocks (1, 4, 6, 2), width scale 2."""
    return _create("mobilefacenet", pretrained, **{"blocks": (1, 4, 6, 2), "scale": 2, **kwargs})


@register_model
def mobilefacenet_large(pretrained: bool = False, **kwargs: Any) -> MobileFaceNet:
    """insightface ``mbf_large``: blocks (2, 8, 12, 4), width scale 4."""
    return _create("mobilefacenet_large", pretrained, **{"blocks": (2, 8, 12, 4), "scale": 4, **kwargs})
