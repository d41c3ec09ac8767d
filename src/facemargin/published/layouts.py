"""Which network a state dict holds, read from its key names and tensor shapes alone.

Four layouts are known, each by a few keys (after any wrapper prefix such as ``model.``, ``net.``,
``module.``):

========================  ===================================================================  =========
layout                    keys it is recognised by                                             networks
========================  ===================================================================  =========
``iresnet``               ``conv1.weight``, ``layer1.0.conv1.weight``, ``fc.weight``          insightface arcface_torch r18-r200, CVLface ``iresnet_insightface``; facemargin ``iresnet*``
``adaface_ir``            ``input_layer.0.weight``, ``body.0.res_layer.1.weight``,             AdaFace IR-18/34/50/101, CVLface ``iresnet``
                          ``output_layer.3.weight``
``mobilefacenet``         insightface: ``layers.0.layers.0.weight``, ``conv_sep.layers.0.weight``,  insightface ``mbf`` / ``mbf_large``; facemargin ``mobilefacenet*``
                          ``features.layers.2.weight``; facemargin: ``stem.0.weight``, ``gdc.0.weight``
``face_vit``              ``patch_embed.proj.weight``, ``pos_embed``, ``feature.0.weight``    insightface ``vit_t/s/b/l/h``; facemargin ``face_vit_*``
========================  ===================================================================  =========

insightface's MobileFaceNet names its modules by position (``layers.N.layers.M...``); its tensors
are renamed to facemargin's ``MobileFaceNet`` names (same shapes, same order of operations) by
:func:`mbf_names`. Every other layout's names are facemargin's names already.

:func:`infer_arch` reads the architecture: the depth (blocks per stage) names it (``iresnet50``,
``adaface_ir101``, ``mobilefacenet``, ``face_vit_b``), and the sizes a name does not fix (embedding
size, input size, widths) are read from the tensors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .files import ModelFileError

__all__ = ["Arch", "LAYOUTS", "family_of", "find_layout", "infer_arch", "mbf_names"]

#: layout -> keys that must all be present (after the prefix)
LAYOUTS: dict[str, tuple[str, ...]] = {
    "iresnet": ("conv1.weight", "layer1.0.conv1.weight", "fc.weight"),
    "adaface_ir": ("input_layer.0.weight", "body.0.res_layer.1.weight", "output_layer.3.weight"),
    "insightface_mbf": ("layers.0.layers.0.weight", "conv_sep.layers.0.weight", "features.layers.2.weight"),
    "mobilefacenet": ("stem.0.weight", "conv_sep.0.weight", "gdc.0.weight"),
    "face_vit": ("patch_embed.proj.weight", "pos_embed", "feature.0.weight"),
}


def family_of(name: str) -> str | None:
    """The layout a facemargin backbone name builds (``None``: not a face backbone of these layouts)."""
    if name.startswith("iresnet"):
        return "iresnet"
    if name.startswith(("adaface_ir", "cvlface_ir")):
        return "adaface_ir"
    if name.startswith("mobilefacenet"):
        return "mobilefacenet"
    if name.startswith("face_vit"):
        return "face_vit"
    return None


def find_layout(keys: list[str]) -> tuple[str, str] | None:
    """``(prefix, layout)`` of the shortest wrapper prefix under which a known layout's keys all exist."""
    present = set(keys)
    found: list[tuple[str, str]] = []
    for layout, signature in LAYOUTS.items():
        first = signature[0]
        for key in keys:
            if key.endswith(first):
                prefix = key[: len(key) - len(first)]
                if (not prefix or prefix.endswith(".")) and all(prefix + s in present for s in signature):
                    found.append((prefix, layout))
    if not found:
        return None
    return min(found, key=lambda pl: len(pl[0]))


# ---------------------------------------------------------------------------------------------- MobileFaceNet
_PARTS = ("expand", "dw", "project")
_MBF_RULES: tuple[tuple[re.Pattern[str], Any], ...] = (
    (re.compile(r"^layers\.0\.layers\.(\d+)\.(\w+)$"), lambda m: f"stem.{m[1]}.{m[2]}"),
    (re.compile(r"^layers\.1\.layers\.(\d+)\.(\w+)$"), lambda m: f"stage1.{m[1]}.{m[2]}"),
    (re.compile(r"^layers\.([1357])\.layers\.(\d+)\.layers\.(\d)\.layers\.(\d+)\.(\w+)$"),
     lambda m: f"stage{(int(m[1]) + 1) // 2}.{m[2]}.{_PARTS[int(m[3])]}.{m[4]}.{m[5]}"),
    (re.compile(r"^layers\.([246])\.layers\.(\d)\.layers\.(\d+)\.(\w+)$"),
     lambda m: f"down{int(m[1]) // 2 + 1}.{_PARTS[int(m[2])]}.{m[3]}.{m[4]}"),
    (re.compile(r"^conv_sep\.layers\.(\d+)\.(\w+)$"), lambda m: f"conv_sep.{m[1]}.{m[2]}"),
    (re.compile(r"^features\.layers\.0\.layers\.(\d+)\.(\w+)$"), lambda m: f"gdc.{m[1]}.{m[2]}"),
    (re.compile(r"^features\.layers\.2\.(\w+)$"), lambda m: f"fc.{m[1]}"),
    (re.compile(r"^features\.layers\.3\.(\w+)$"), lambda m: f"features.{m[1]}"),
)


def mbf_names(key: str) -> str:
    """insightface MobileFaceNet tensor name -> facemargin ``MobileFaceNet`` name (unchanged if unknown).

    insightface: ``layers`` = [stem ConvBlock, stage-1 ConvBlock or Residual, DepthWise, Residual,
    DepthWise, Residual, DepthWise, Residual], each ``ConvBlock``/``LinearBlock`` a ``layers``
    Sequential (conv, BN[, PReLU]), each ``DepthWise`` ``layers`` = (1x1 expand, depthwise 3x3,
    1x1 projection), ``conv_sep``, and ``features`` = GDC (depthwise 7x7 LinearBlock, flatten,
    Linear, BatchNorm1d).
    """
    for pattern, rename in _MBF_RULES:
        m = pattern.match(key)
        if m:
            return rename(m)
    return key


# ---------------------------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Arch:
    """An architecture read from a state dict: its layout family, facemargin name (if one fits) and sizes."""

    family: str
    name: str | None
    #: e.g. "stages (3, 4, 14, 3)" -- what the name would have to match
    depth: str
    #: sizes the name does not fix, for ``build_embedder(name, **kwargs)``
    kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        what = {"iresnet": "an IResNet (insightface layout)", "adaface_ir": "an IR net (AdaFace layout)",
                "mobilefacenet": "a MobileFaceNet", "face_vit": "a face ViT (insightface layout)"}[self.family]
        return f"{what} with {self.depth}" + (f" = {self.name}" if self.name else " (no facemargin backbone has this depth)")


def _count(keys: list[str], prefix: str) -> int:
    """Number of distinct ``prefix<i>.`` children."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m[1] for k in keys if (m := pat.match(k))})


def _grid(linear_in: int, chs: int, what: str) -> int:
    grid = math.isqrt(linear_in // chs) if chs else 0
    if grid * grid * chs != linear_in:
        raise ModelFileError(f"{what}: {linear_in} inputs are not a square grid of {chs} channels")
    return grid


def _iresnet(sd: Mapping[str, Any], keys: list[str]) -> Arch:
    from ..backbones.iresnet import IRESNET_LAYERS

    layers = []
    while n := _count(keys, f"layer{len(layers) + 1}."):
        layers.append(n)
    widths = tuple(int(sd[f"layer{i + 1}.0.conv1.weight"].shape[0]) for i in range(len(layers)))
    emb, fin = (int(s) for s in sd["fc.weight"].shape)
    grid = _grid(fin, widths[-1], "fc.weight")
    name = next((n for n, lay in IRESNET_LAYERS.items() if lay == tuple(layers)), None)
    if name is None and tuple(layers) == (1, 1, 1):
        name = "iresnet_demo"
    kwargs = dict(embedding_size=emb, input_size=grid * 16, widths=widths, stem_width=int(sd["conv1.weight"].shape[0]))
    return Arch("iresnet", name, f"stages {tuple(layers)}", kwargs)


def _adaface(sd: Mapping[str, Any], keys: list[str], order: str | None) -> Arch:
    from ..backbones.adaface import ADAFACE_LAYERS

    n_units = _count(keys, "body.")
    if any(f"body.{i}.res_layer.1.weight" not in sd for i in range(n_units)):
        raise ModelFileError("body: units are not numbered 0..N-1")
    if sd["body.0.res_layer.1.weight"].shape[-1] == 1 or any(".se_block." in k or ".res_layer.6." in k for k in keys):
        return Arch("adaface_ir", None, "bottleneck or SE units (IR-152/200, IR-SE)", {})
    widths_per_unit = [int(sd[f"body.{i}.res_layer.1.weight"].shape[0]) for i in range(n_units)]
    layers, widths = [], []
    for w in widths_per_unit:  # stages = runs of equal width (every stage widens in these nets)
        if widths and widths[-1] == w:
            layers[-1] += 1
        else:
            layers.append(1)
            widths.append(w)
    emb, fin = (int(s) for s in sd["output_layer.3.weight"].shape)
    grid = _grid(fin, widths[-1], "output_layer.3.weight")
    depth = next((d for d, lay in ADAFACE_LAYERS.items() if lay == tuple(layers)), None)
    family = "cvlface_ir" if order == "RGB" else "adaface_ir"
    kwargs = dict(embedding_size=emb, input_size=grid * 16, widths=tuple(widths),
                  stem_width=int(sd["input_layer.0.weight"].shape[0]))
    return Arch("adaface_ir", f"{family}{depth}" if depth else None, f"stages {tuple(layers)}", kwargs)


def _mobilefacenet(sd: Mapping[str, Any], keys: list[str]) -> Arch:
    blocks = (1 if "stage1.0.weight" in sd else _count(keys, "stage1."),
              *(_count(keys, f"stage{s}.") for s in (2, 3, 4)))
    name = {(1, 4, 6, 2): "mobilefacenet", (2, 8, 12, 4): "mobilefacenet_large"}.get(blocks)
    kwargs = dict(embedding_size=int(sd["fc.weight"].shape[0]), input_size=int(sd["gdc.0.weight"].shape[-1]) * 16,
                  scale=int(sd["stem.0.weight"].shape[0]) // 64, feature_chs=int(sd["conv_sep.0.weight"].shape[0]))
    return Arch("mobilefacenet", name, f"blocks {blocks}, scale {kwargs['scale']}", kwargs)


def _face_vit(sd: Mapping[str, Any], keys: list[str]) -> Arch:
    from ..backbones.face_vit import FACE_VIT_SIZES

    n, dim = (int(s) for s in sd["pos_embed"].shape[1:])
    depth = _count(keys, "blocks.")
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    grid = math.isqrt(n)
    size = 112 if grid == 112 // patch else grid * patch
    name = next((f"face_vit_{s}" for s, a in FACE_VIT_SIZES.items() if (a["embed_dim"], a["depth"]) == (dim, depth)), None)
    kwargs = dict(embedding_size=int(sd["feature.2.weight"].shape[0]), input_size=size, embed_dim=dim, patch_size=patch,
                  mlp_ratio=int(sd["blocks.0.mlp.fc1.weight"].shape[0]) / dim)
    return Arch("face_vit", name, f"width {dim} and {depth} blocks", kwargs)


def infer_arch(layout: str, sd: Mapping[str, Any], channel_order: str | None = None) -> Arch:
    """The architecture of a state dict in ``layout`` (facemargin names; insightface mbf already renamed)."""
    keys = list(sd)
    if layout == "iresnet":
        return _iresnet(sd, keys)
    if layout == "adaface_ir":
        return _adaface(sd, keys, channel_order)
    if layout == "mobilefacenet":
        return _mobilefacenet(sd, keys)
    if layout == "face_vit":
        return _face_vit(sd, keys)
    raise ValueError(f"unknown layout {layout!r}")
