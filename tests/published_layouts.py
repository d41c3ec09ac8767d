"""State dicts in each peer's published key layout, and reference forwards, written from the peers'
architecture descriptions -- not from facemargin's modules.

- insightface arcface_torch ``iresnet.py``: ``conv1``/``bn1``/``prelu`` stem (3x3, stride 1), stages
  ``layerK.J`` of IBasicBlock (``bn1``, ``conv1`` 3x3, ``bn2``, ``prelu``, ``conv2`` 3x3 with the
  stage's stride on the first block, ``bn3``; ``downsample.0`` 1x1 conv + ``downsample.1`` BN on
  the first block of every stage), ``bn2``, flatten, ``fc``, ``features`` BatchNorm1d. RGB input.
- insightface ``mobilefacenet.py``: ``layers`` = [ConvBlock 3x3/2, ConvBlock 3x3 groups 64 (or a
  Residual), DepthWise/2, Residual, DepthWise/2, Residual, DepthWise/2, Residual], ``conv_sep``
  ConvBlock 1x1 -> 512, ``features`` = GDC (LinearBlock 7x7 depthwise, Flatten, Linear no bias,
  BatchNorm1d). ConvBlock = ``layers`` (conv, BN, PReLU); LinearBlock = (conv, BN); DepthWise =
  ``layers`` (ConvBlock 1x1 -> groups, ConvBlock 3x3 depthwise with the stride, LinearBlock 1x1).
- insightface ``vit.py``: 9x9 patch conv, ``pos_embed``, blocks (LayerNorm, attention without qkv
  bias, LayerNorm, MLP with ReLU6), ``norm``, ``feature`` = (Linear no bias, BN1d eps 2e-5, Linear
  no bias, BN1d eps 2e-5) over all tokens flattened.
- AdaFace ``net.py``: ``input_layer`` (conv 3x3, BN, PReLU), ``body.N`` units with ``res_layer``
  (BN, conv 3x3, BN, PReLU, conv 3x3 with the stride, BN) and ``shortcut_layer`` (MaxPool2d(1,
  stride) when in == out channels, else conv 1x1 + BN), ``output_layer`` (BN2d, Dropout, Flatten,
  Linear, BatchNorm1d(affine=False)); BGR input; forward returns (x / |x|, |x|).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-5


class Params:
    """Random tensors of given shapes from one generator (BN statistics kept plausible)."""

    def __init__(self, seed: int = 0) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.sd: dict[str, torch.Tensor] = {}

    def w(self, name: str, *shape: int) -> None:
        fan_in = max(1, int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else shape[0])
        self.sd[name] = torch.randn(*shape, generator=self.g) / fan_in ** 0.5

    def vec(self, name: str, n: int, scale: float = 0.1) -> None:
        self.sd[name] = torch.randn(n, generator=self.g) * scale

    def bn(self, prefix: str, n: int, affine: bool = True) -> None:
        if affine:
            self.sd[f"{prefix}.weight"] = 0.5 + torch.rand(n, generator=self.g)
            self.vec(f"{prefix}.bias", n)
        self.vec(f"{prefix}.running_mean", n)
        self.sd[f"{prefix}.running_var"] = 0.5 + torch.rand(n, generator=self.g)
        self.sd[f"{prefix}.num_batches_tracked"] = torch.tensor(11)

    def prelu(self, name: str, n: int) -> None:
        self.sd[name] = 0.25 + 0.1 * torch.rand(n, generator=self.g)


def _bn(sd, x, p, eps=EPS, affine=True):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"] if affine else None,
                        sd[f"{p}.bias"] if affine else None, False, 0.0, eps)


def normalise(images: torch.Tensor, bgr: bool = False) -> torch.Tensor:
    """uint8 RGB -> ``(x / 255 - 0.5) / 0.5`` in RGB (insightface) or BGR (AdaFace's ``to_input``)."""
    x = images.float()
    if bgr:
        x = x[:, [2, 1, 0]]
    return (x / 255.0 - 0.5) / 0.5


# ------------------------------------------------------------------------------------------ insightface IResNet
def insightface_iresnet(layers, widths=(8, 16, 32, 64), stem=8, emb=16, grid=7, seed=0) -> dict[str, torch.Tensor]:
    p = Params(seed)
    p.w("conv1.weight", stem, 3, 3, 3)
    p.bn("bn1", stem)
    p.prelu("prelu.weight", stem)
    cin = stem
    for i, (n, c) in enumerate(zip(layers, widths), start=1):
        for j in range(n):
            b, inp = f"layer{i}.{j}", (cin if j == 0 else c)
            p.bn(f"{b}.bn1", inp)
            p.w(f"{b}.conv1.weight", c, inp, 3, 3)
            p.bn(f"{b}.bn2", c)
            p.prelu(f"{b}.prelu.weight", c)
            p.w(f"{b}.conv2.weight", c, c, 3, 3)
            p.bn(f"{b}.bn3", c)
            if j == 0:
                p.w(f"{b}.downsample.0.weight", c, inp, 1, 1)
                p.bn(f"{b}.downsample.1", c)
        cin = c
    p.bn("bn2", cin)
    p.w("fc.weight", emb, cin * grid * grid)
    p.vec("fc.bias", emb)
    p.bn("features", emb)
    return p.sd


def insightface_iresnet_forward(sd, x, layers) -> torch.Tensor:
    x = F.prelu(_bn(sd, F.conv2d(x, sd["conv1.weight"], padding=1), "bn1"), sd["prelu.weight"])
    for i, n in enumerate(layers, start=1):
        for j in range(n):
            b = f"layer{i}.{j}"
            stride = 2 if j == 0 else 1
            out = F.conv2d(_bn(sd, x, f"{b}.bn1"), sd[f"{b}.conv1.weight"], padding=1)
            out = F.prelu(_bn(sd, out, f"{b}.bn2"), sd[f"{b}.prelu.weight"])
            out = _bn(sd, F.conv2d(out, sd[f"{b}.conv2.weight"], stride=stride, padding=1), f"{b}.bn3")
            identity = _bn(sd, F.conv2d(x, sd[f"{b}.downsample.0.weight"], stride=2), f"{b}.downsample.1") if j == 0 else x
            x = out + identity
    x = _bn(sd, x, "bn2").flatten(1)
    return _bn(sd, F.linear(x, sd["fc.weight"], sd["fc.bias"]), "features")


# ------------------------------------------------------------------------------------------ AdaFace IR
def adaface_ir(layers, widths=(8, 16, 32, 64), stem=8, emb=16, grid=7, seed=1) -> dict[str, torch.Tensor]:
    p = Params(seed)
    p.w("input_layer.0.weight", stem, 3, 3, 3)
    p.bn("input_layer.1", stem)
    p.prelu("input_layer.2.weight", stem)
    cin, u = stem, 0
    for n, c in zip(layers, widths):
        for j in range(n):
            b, inp = f"body.{u}", (cin if j == 0 else c)
            p.bn(f"{b}.res_layer.0", inp)
            p.w(f"{b}.res_layer.1.weight", c, inp, 3, 3)
            p.bn(f"{b}.res_layer.2", c)
            p.prelu(f"{b}.res_layer.3.weight", c)
            p.w(f"{b}.res_layer.4.weight", c, c, 3, 3)
            p.bn(f"{b}.res_layer.5", c)
            if inp != c:
                p.w(f"{b}.shortcut_layer.0.weight", c, inp, 1, 1)
                p.bn(f"{b}.shortcut_layer.1", c)
            u += 1
        cin = c
    p.bn("output_layer.0", cin)
    p.w("output_layer.3.weight", emb, cin * grid * grid)
    p.vec("output_layer.3.bias", emb)
    p.bn("output_layer.4", emb, affine=False)
    return p.sd


def adaface_forward(sd, x, layers) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaFace's ``Backbone.forward`` on BGR input: ``(x / |x|, |x|)``."""
    x = F.prelu(_bn(sd, F.conv2d(x, sd["input_layer.0.weight"], padding=1), "input_layer.1"), sd["input_layer.2.weight"])
    u = 0
    for n in layers:
        for j in range(n):
            b, stride = f"body.{u}", (2 if j == 0 else 1)
            if f"{b}.shortcut_layer.0.weight" in sd:
                shortcut = _bn(sd, F.conv2d(x, sd[f"{b}.shortcut_layer.0.weight"], stride=stride), f"{b}.shortcut_layer.1")
            else:
                shortcut = F.max_pool2d(x, kernel_size=1, stride=stride)
            r = F.conv2d(_bn(sd, x, f"{b}.res_layer.0"), sd[f"{b}.res_layer.1.weight"], padding=1)
            r = F.prelu(_bn(sd, r, f"{b}.res_layer.2"), sd[f"{b}.res_layer.3.weight"])
            r = _bn(sd, F.conv2d(r, sd[f"{b}.res_layer.4.weight"], stride=stride, padding=1), f"{b}.res_layer.5")
            x = r + shortcut
            u += 1
    x = _bn(sd, x, "output_layer.0").flatten(1)
    x = _bn(sd, F.linear(x, sd["output_layer.3.weight"], sd["output_layer.3.bias"]), "output_layer.4", affine=False)
    norm = x.norm(2, 1, True)
    return x / norm, norm


# ------------------------------------------------------------------------------------------ insightface MobileFaceNet
def insightface_mbf(blocks=(1, 4, 6, 2), scale=1, emb=16, seed=2) -> dict[str, torch.Tensor]:
    p = Params(seed)

    def conv_block(pre, cin, cout, k, groups=1, act=True):
        p.w(f"{pre}.layers.0.weight", cout, cin // groups, k, k)
        p.bn(f"{pre}.layers.1", cout)
        if act:
            p.prelu(f"{pre}.layers.2.weight", cout)

    def depthwise(pre, cin, cout, groups):
        conv_block(f"{pre}.layers.0", cin, groups, 1)
        conv_block(f"{pre}.layers.1", groups, groups, 3, groups=groups)
        conv_block(f"{pre}.layers.2", groups, cout, 1, act=False)

    def residual(pre, c, n, groups):
        for i in range(n):
            depthwise(f"{pre}.layers.{i}", c, c, groups)

    c1, c2 = 64 * scale, 128 * scale
    conv_block("layers.0", 3, c1, 3)
    if blocks[0] == 1:
        conv_block("layers.1", c1, c1, 3, groups=64)
    else:
        residual("layers.1", c1, blocks[0], 128)
    depthwise("layers.2", c1, c1, 128)
    residual("layers.3", c1, blocks[1], 128)
    depthwise("layers.4", c1, c2, 256)
    residual("layers.5", c2, blocks[2], 256)
    depthwise("layers.6", c2, c2, 512)
    residual("layers.7", c2, blocks[3], 256)
    conv_block("conv_sep", c2, 512, 1)
    conv_block("features.layers.0", 512, 512, 7, groups=512, act=False)
    p.w("features.layers.2.weight", emb, 512)
    p.bn("features.layers.3", emb)
    return p.sd


def insightface_mbf_forward(sd, x, blocks=(1, 4, 6, 2)) -> torch.Tensor:
    def block(x, pre, k, stride=1, groups=1, act=True):
        w = sd[f"{pre}.layers.0.weight"]
        x = _bn(sd, F.conv2d(x, w, stride=stride, padding=k // 2, groups=groups), f"{pre}.layers.1")
        return F.prelu(x, sd[f"{pre}.layers.2.weight"]) if act else x

    def depthwise(x, pre, stride):
        groups = sd[f"{pre}.layers.1.layers.0.weight"].shape[0]
        y = block(x, f"{pre}.layers.0", 1)
        y = block(y, f"{pre}.layers.1", 3, stride, groups)
        return block(y, f"{pre}.layers.2", 1, act=False)

    def residual(x, pre, n):
        for i in range(n):
            x = x + depthwise(x, f"{pre}.layers.{i}", 1)
        return x

    x = block(x, "layers.0", 3, stride=2)
    x = block(x, "layers.1", 3, groups=64) if blocks[0] == 1 else residual(x, "layers.1", blocks[0])
    for down, res, n in ((2, 3, blocks[1]), (4, 5, blocks[2]), (6, 7, blocks[3])):
        x = residual(depthwise(x, f"layers.{down}", 2), f"layers.{res}", n)
    x = block(x, "conv_sep", 1)
    x = _bn(sd, F.conv2d(x, sd["features.layers.0.layers.0.weight"], groups=512), "features.layers.0.layers.1").flatten(1)
    return _bn(sd, F.linear(x, sd["features.layers.2.weight"]), "features.layers.3")


# ------------------------------------------------------------------------------------------ insightface ViT
def insightface_vit(dim=16, depth=12, emb=16, patch=9, tokens=144, seed=3) -> dict[str, torch.Tensor]:
    p = Params(seed)
    p.w("patch_embed.proj.weight", dim, 3, patch, patch)
    p.vec("patch_embed.proj.bias", dim)
    p.sd["pos_embed"] = 0.02 * torch.randn(1, tokens, dim, generator=p.g)
    p.sd["mask_token"] = 0.02 * torch.randn(1, 1, dim, generator=p.g)
    for i in range(depth):
        b = f"blocks.{i}"
        for ln in ("norm1", "norm2"):
            p.sd[f"{b}.{ln}.weight"] = 1 + 0.1 * torch.randn(dim, generator=p.g)
            p.vec(f"{b}.{ln}.bias", dim)
        p.w(f"{b}.attn.qkv.weight", 3 * dim, dim)
        p.w(f"{b}.attn.proj.weight", dim, dim)
        p.vec(f"{b}.attn.proj.bias", dim)
        p.w(f"{b}.mlp.fc1.weight", 4 * dim, dim)
        p.vec(f"{b}.mlp.fc1.bias", 4 * dim)
        p.w(f"{b}.mlp.fc2.weight", dim, 4 * dim)
        p.vec(f"{b}.mlp.fc2.bias", dim)
    p.sd["norm.weight"] = 1 + 0.1 * torch.randn(dim, generator=p.g)
    p.vec("norm.bias", dim)
    p.w("feature.0.weight", dim, dim * tokens)
    p.bn("feature.1", dim)
    p.w("feature.2.weight", emb, dim)
    p.bn("feature.3", emb)
    return p.sd


def insightface_vit_forward(sd, x, heads=8) -> torch.Tensor:
    w = sd["patch_embed.proj.weight"]
    x = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2) + sd["pos_embed"]
    b, n, d = x.shape
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}"
        h = F.layer_norm(x, (d,), sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], 1e-5)
        qkv = F.linear(h, sd[f"{p}.attn.qkv.weight"]).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
        a = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(a, sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"])
        h = F.layer_norm(x, (d,), sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], 1e-5)
        h = F.linear(F.relu6(F.linear(h, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"])), sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])
        x = x + h
        i += 1
    x = F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], 1e-5).reshape(b, n * d)
    x = _bn(sd, F.linear(x, sd["feature.0.weight"]), "feature.1", eps=2e-5)
    return _bn(sd, F.linear(x, sd["feature.2.weight"]), "feature.3", eps=2e-5)
