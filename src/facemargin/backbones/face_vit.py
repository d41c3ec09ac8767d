"""insightface's face ViT (arcface_torch ``vit_t/s/b/l/h``), registered in timm as ``face_vit_*``.

Not timm's ImageNet ViT: a 9x9 patch embedding of the 112x112 face (12 x 12 = 144 tokens, no class
token), learned position embeddings, pre-norm blocks (LayerNorm, attention without qkv bias,
an MLP with ReLU6), a final LayerNorm, then a head on *all* tokens flattened:
Linear(144 D -> D, no bias) -> BatchNorm1d(D) -> Linear(D -> E, no bias) -> BatchNorm1d(E)
(eps 2e-5). In training a share ``mask_ratio`` of the tokens is dropped before the blocks and
filled with a learned ``mask_token`` after them (insightface's masking regulariser).

Module names follow insightface's ``vit.py`` (``patch_embed.proj``, ``pos_embed``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``feature.0..3``,
``mask_token``), so an arcface_torch ViT ``backbone.pth`` loads unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import Block

from .timm_api import FaceEmbedderTimmAPI, face_cfg

__all__ = ["FaceViT", "FACE_VIT_SIZES"]


class _PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution -> tokens ``[B, N, D]``."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FaceViT(FaceEmbedderTimmAPI, nn.Module):
    """insightface's face ViT; ``num_classes=0`` returns the ``embedding_size``-d embedding.

    Args:
        embed_dim, depth, num_heads: transformer width, blocks, heads (insightface ``vit_t``: 256, 12, 8).
        patch_size: side of a patch (insightface: 9, a 12x12 grid at 112).
        embedding_size: the output (insightface ``num_features``).
        mask_ratio: share of tokens masked in training (0 disables).
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        dropout: dropout inside the blocks (insightface ``drop_rate``).
    """

    def __init__(
        self,
        embed_dim: int = 256,
        depth: int = 12,
        num_heads: int = 8,
        patch_size: int = 9,
        embedding_size: int = 512,
        num_classes: int = 0,
        dropout: float = 0.0,
        drop_path_rate: float = 0.1,
        mask_ratio: float = 0.1,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        img_size: int = 112,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self._setup_embedder(kwargs, img_size, 1, in_chans, embedding_size, num_classes, dropout)
        self.embed_dim = embed_dim
        self.mask_ratio = mask_ratio
        self.patch_embed = _PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=False, proj_drop=dropout, drop_path=r,
                  act_layer=nn.ReLU6, norm_layer=nn.LayerNorm)
            for r in rates
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * n, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        self.head: nn.Module = nn.Linear(embedding_size, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "mask_token"}

    def _mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random ``1 - mask_ratio`` of each sample's tokens; also the order to undo it."""
        b, n, d = x.shape
        keep = int(n * (1 - self.mask_ratio))
        order = torch.rand(b, n, device=x.device).argsort(dim=1)
        kept = torch.gather(x, 1, order[:, :keep, None].expand(-1, -1, d))
        return kept, order.argsort(dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> normalised tokens ``[B, N, D]`` (masked positions hold ``mask_token`` in training)."""
        x = self.patch_embed(x) + self.pos_embed
        restore = None
        if self.training and self.mask_ratio > 0:
            x, restore = self._mask(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if restore is not None:
            b, kept, d = x.shape
            x = torch.cat([x, self.mask_token.expand(b, self.num_patches - kept, d)], dim=1)
            x = torch.gather(x, 1, restore[:, :, None].expand(-1, -1, d))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.feature(x.flatten(1))
        return x if pre_logits else self.head(x)


#: insightface's published sizes and training defaults (arcface_torch ``get_model``: ``vit_l`` exists only
#: as ``vit_l_dp005_mask_005``, ``vit_h`` trains without masking)
FACE_VIT_SIZES: dict[str, dict[str, Any]] = {
    "t": dict(embed_dim=256, depth=12, num_heads=8, drop_path_rate=0.1, mask_ratio=0.1),
    "s": dict(embed_dim=512, depth=12, num_heads=8, drop_path_rate=0.1, mask_ratio=0.1),
    "b": dict(embed_dim=512, depth=24, num_heads=8, drop_path_rate=0.1, mask_ratio=0.1),
    "l": dict(embed_dim=768, depth=24, num_heads=8, drop_path_rate=0.05, mask_ratio=0.05),
    "h": dict(embed_dim=1024, depth=48, num_heads=8, drop_path_rate=0.1, mask_ratio=0.0),
}

default_cfgs: dict[str, dict[str, Any]] = {
    f"face_vit_{s}": face_cfg("patch_embed.proj", origin_url="https://github.com/deepinsight/insightface")
    for s in FACE_VIT_SIZES
}


def _create(size: str, pretrained: bool, **kwargs: Any) -> FaceViT:
    if pretrained:
        raise ValueError(f"face_vit_{size}: facemargin ships no weights; use backbone.pretrained_file=PATH")
    return build_model_with_cfg(FaceViT, f"face_vit_{size}", False, **{**FACE_VIT_SIZES[size], **kwargs})


@register_model
def face_vit_t(pretrained: bool = False, **kwargs: Any) -> FaceViT:
    """insightface ``vit_t``: width 256, 12 blocks."""
    return _create("t", pretrained, **kwargs)


@register_model
def face_vit_s(pretrained: bool = False, **kwargs: Any) -> FaceViT:
    """insightface ``vit_s``: width 512, 12 blocks."""
    return _create("s", pretrained, **kwargs)


@register_model
def face_vit_b(pretrained: bool = False, **kwargs: Any) -> FaceViT:
    """insightface ``vit_b``: width 512, 24 blocks."""
    return _create("b", pretrained, **kwargs)


@register_model
def face_vit_l(pretrained: bool = False, **kwargs: Any) -> FaceViT:
    """insightface ``vit_l``: width 768, 24 blocks."""
    return _create("l", pretrained, **kwargs)


@register_model
def face_vit_h(pretrained: bool = False, **kwargs: Any) -> FaceViT:
    """insightface ``vit_h``: width 1024, 48 blocks."""
    return _create("h", pretrained, **kwargs)
