"""timm pretrained-cfg shared by the face backbones defined here."""

from __future__ import annotations

from typing import Any


def face_cfg(first_conv: str, **kwargs: Any) -> dict[str, Any]:
    """A face model's cfg: 112x112 RGB, mean/std 0.5, no weights to download, embedding output."""
    cfg: dict[str, Any] = dict(
        url="",
        num_classes=0,
        input_size=(3, 112, 112),
        pool_size=None,
        fixed_input_size=False,
        interpolation="bilinear",
        crop_pct=1.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        first_conv=first_conv,
        classifier="head",
    )
    cfg.update(kwargs)
    return cfg
