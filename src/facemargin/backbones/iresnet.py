"""Improved ResNet (IResNet) for 112x112 aligned faces, registered in timm's model registry.

Architecture follows insightface's ``iresnet`` (Duta et al. 2020 "Improved Residual Networks",
as adapted by insightface/arcface_torch): a stride-1 3x3 stem, pre-activation style
``IBasicBlock`` (BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, no activation after the
residual sum), four stages of widths 64/128/256/512 each starting with stride 2, then the
"output layer": BN2d -> Dropout -> flatten -> Linear(512*7*7, E) -> BatchNorm1d(E).
The BatchNorm1d output is the face embedding (``num_classes=0``).

Layout is compatible with timm conventions: ``forward_features`` returns the 7x7 feature map,
``forward_head(x, pre_logits=True)`` the embedding, ``reset_classifier`` adds/removes a linear
classifier on top of the embedding.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from timm.models import build_model_with_cfg, register_model

from .timm_api import FaceEmbedderTimmAPI, face_cfg

__all__ = ["IBasicBlock", "IResNet"]

_BN_EPS = 1e-5


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus (projected) identity."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs, eps=_BN_EPS)
        self.conv1 = _conv3x3(in_chs, out_chs)
        self.bn2 = nn.BatchNorm2d(out_chs, eps=_BN_EPS)
        self.prelu = nn.PReLU(out_chs)
        self.conv2 = _conv3x3(out_chs, out_chs, stride)
        self.bn3 = nn.BatchNorm2d(out_chs, eps=_BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs, eps=_BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.bn1(x))
        out = self.prelu(self.bn2(out))
        out = self.bn3(self.conv2(out))
        return out + shortcut


class IResNet(FaceEmbedderTimmAPI, nn.Module):
    """IResNet face backbone; ``num_classes=0`` returns the ``embedding_size``-d embedding.

    Args:
        layers: blocks per stage.
        widths: channels per stage (insightface: 64, 128, 256, 512).
        stem_width: stem channels (insightface: 64).
        stem_stride: stride of the stem conv (insightface: 1; the demo model uses 2 with 3 stages).
        embedding_size: size of the embedding (the ``features`` BatchNorm1d).
        num_classes: >0 adds a linear classifier on the embedding (timm convention).
        dropout: dropout before the embedding FC (insightface ``dropout``).
        in_chans: input channels.
        img_size: input side; the FC sees the final ``img_size / reduction`` grid (7x7 at 112),
            where reduction = ``stem_stride * 2**len(layers)`` (16 for insightface models).
        zero_init_residual: zero the last BN of each block (insightface option).
        fix_embedding_bn_weight: freeze the embedding BN scale at 1 as insightface does.
    """

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        stem_stride: int = 1,
        embedding_size: int = 512,
        num_classes: int = 0,
        dropout: float = 0.0,
        in_chans: int = 3,
        img_size: int | Sequence[int] = 112,
        zero_init_residual: bool = False,
        fix_embedding_bn_weight: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers:
            raise ValueError("IResNet needs one width per stage (layers and widths of equal length)")
        reduction = stem_stride * 2 ** len(layers)
        h, w = self._setup_embedder(kwargs, img_size, reduction, in_chans, embedding_size, num_classes, dropout)
        self.grad_checkpointing = False

        self.conv1 = _conv3x3(in_chans, stem_width, stem_stride)
        self.bn1 = nn.BatchNorm2d(stem_width, eps=_BN_EPS)
        self.prelu = nn.PReLU(stem_width)
        self.feature_info = [dict(num_chs=stem_width, reduction=stem_stride, module="prelu")]
        chs = stem_width
        stages = []
        for i, (n, width) in enumerate(zip(layers, widths)):
            blocks = [IBasicBlock(chs, width, stride=2)]
            blocks += [IBasicBlock(width, width) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            stages.append(f"layer{i + 1}")
            chs = width
            self.feature_info.append(dict(num_chs=width, reduction=stem_stride * 2 ** (i + 1), module=stages[-1]))
        self._stages = tuple(stages)
        self.bn2 = nn.BatchNorm2d(chs, eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(chs * (h // reduction) * (w // reduction), embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=_BN_EPS)
        self.head: nn.Module = nn.Linear(embedding_size, num_classes) if num_classes > 0 else nn.Identity()

        self._init_weights(zero_init_residual)
        if fix_embedding_bn_weight:
            self.features.weight.requires_grad_(False)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # insightface draws N(0, 0.1), which makes an untrained r100/r200 overflow to NaN in
                # eval mode (BN running stats still identity, e.g. Lightning's sanity validation);
                # He init (timm's ResNet choice) keeps them finite, though still large before training.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)

    # --- timm conventions -------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block in backward to save activation memory."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^conv1|^bn1|^prelu", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> final feature map [B, widths[-1], H/16, W/16] (after BN2d)."""
        x = self.prelu(self.bn1(self.conv1(x)))
        for stage in (getattr(self, name) for name in self._stages):
            if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
                for block in stage:
                    x = checkpoint(block, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.bn2(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> embedding [B, E] (``pre_logits`` or ``num_classes=0``) or logits."""
        x = self.dropout(x)
        x = self.features(self.fc(torch.flatten(x, 1)))
        return x if pre_logits else self.head(x)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    kwargs = {"license": "apache-2.0", "origin_url": "https://github.com/deepinsight/insightface", **kwargs}
    return face_cfg("conv1", **kwargs)


IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}

# Small CPU-friendly variant for the demo/smoke-test config; NOT an insightface model.
# Stride-2 stem + 3 stages keeps the 7x7 output grid at 112x112 while skipping the full-resolution
# stage that dominates IResNet's CPU cost (see the Part-3 throughput table in the report).
DEMO_ARGS: dict[str, Any] = dict(layers=(1, 1, 1), widths=(32, 64, 128), stem_width=32, stem_stride=2)

default_cfgs: dict[str, dict[str, Any]] = {name: _cfg() for name in IRESNET_LAYERS}
default_cfgs["iresnet_demo"] = _cfg(license=None, origin_url=None)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> IResNet:
    if pretrained:
        raise ValueError(f"{variant}: facemargin ships no pretrained weights; use pretrained=False")
    return build_model_with_cfg(IResNet, variant, pretrained, **kwargs)


@register_model
def iresnet18(pretrained: bool = False, **kwargs: Any) -> IResNet:
    """IResNet-18 (insightface r18)."""
    return _create("iresnet18", pretrained, layers=IRESNET_LAYERS["iresnet18"], **kwargs)


@register_model
def iresnet34(pretrained: bool = False, **kwargs: Any) -> IResNet:
    """IResNet-34 (insightface r34)."""
    return _create("iresnet34", pretrained, layers=IRESNET_LAYERS["iresnet34"], **kwargs)


@register_model
def iresnet50(pretrained: bool = False, **kwargs: Any) -> IResNet:
    """IResNet-50 (insightface r50)."""
    return _create("iresnet50", pretrained, layers=IRESNET_LAYERS["iresnet50"], **kwargs)


@register_model
def iresnet100(pretrained: bool = False, **kwargs: Any) -> IResNet:
    """IResNet-100 (insightface r100)."""
    return _create("iresnet100", pretrained, layers=IRESNET_LAYERS["iresnet100"], **kwargs)


@register_model
def iresnet200(pretrained: bool = False, **kwargs: Any) -> IResNet:
    """IResNet-200 (insightface r200)."""
    return _create("iresnet200", pretrained, layers=IRESNET_LAYERS["iresnet200"], **kwargs)


@register_model
def iresnet_demo(pretrained: bool = False, **kwargs: Any) -> IResNet:
    """Tiny IResNet for CPU demos and tests (stride-2 stem, 3 stages of 1 block, widths 32/64/128).

    Not an insightface model: only meant to make the default synthetic-data run fast on 2 cores.
    """
    return _create("iresnet_demo", pretrained, **{**DEMO_ARGS, **kwargs})
