"""The input convention of a face embedder: what image, in which channel order, normalised how.

Every model facemargin trains, loads or exports carries one :class:`InputSpec`: a facemargin
checkpoint (``checkpoint["facemargin"]``), an exported ONNX / TorchScript file (its metadata), a
backbone built here (``backbone.input_spec``; absent means :data:`DEFAULT`) and a published model
loaded from a file (insightface: RGB; AdaFace: **BGR**; a foreign ONNX: from options). Data is
always decoded to uint8 RGB; :meth:`InputSpec.normalize` is the one place that turns such a batch
into the network's input, so a BGR network is fed BGR wherever it runs (training, validation,
evaluate, embed, compare).

``mean`` / ``std`` are per channel *in the network's channel order*, on the ``[0, 1]`` scale:
``x = (pixel / 255 - mean) / std`` (insightface's ``(pixel - 127.5) / 127.5`` is mean = std = 0.5).
The input is a face aligned to the 5-point ArcFace template (``facemargin.align``) of
``size x size`` pixels; the output is an embedding that is *not* L2-normalised.

Stdlib only at import; torch is imported by :meth:`InputSpec.normalize`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from .errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT", "InputSpec", "input_spec_of"]

_ORDERS = ("RGB", "BGR")


def _triple(value: Any, what: str, source: str) -> tuple[float, float, float]:
    vals = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(vals) != 3:
        raise UserError(f"{source}: {what} needs 1 or 3 numbers, got {value!r}")
    try:
        out = tuple(float(v) for v in vals)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {what} must be numbers, got {value!r}") from None
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class InputSpec:
    """``size`` x ``size`` aligned face, ``channel_order`` RGB or BGR, ``(x / 255 - mean) / std``."""

    size: int = 112
    channel_order: str = "RGB"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    #: how the face is cropped: the 5-point ArcFace template (``facemargin.align``)
    alignment: str = "arcface_5pt"
    #: notes for people reading exported metadata; not used in computation
    notes: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.channel_order not in _ORDERS:
            raise UserError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")
        if int(self.size) <= 0:
            raise UserError(f"input size must be positive, got {self.size!r}")
        if any(s == 0 for s in self.std):
            raise UserError(f"std must not be 0, got {self.std}")

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any], source: str = "model") -> "InputSpec":
        """From metadata keys ``input_size``, ``channel_order``, ``mean``, ``std`` (missing: defaults).

        Accepts the keys facemargin has always written into checkpoints and exports (``mean`` and
        ``std`` as one number or three); ``source`` names the file in errors.
        """
        d = DEFAULT
        order = str(meta.get("channel_order", d.channel_order)).upper()
        if order not in _ORDERS:
            raise UserError(f"{source}: channel_order must be RGB or BGR, got {meta.get('channel_order')!r}")
        size = meta.get("input_size", d.size)
        if isinstance(size, (list, tuple)):  # (H, W) or (C, H, W): square faces only
            if len(set(size[-2:])) != 1:
                raise UserError(f"{source}: only square inputs are supported, got input_size {size}")
            size = size[-1]
        return cls(
            size=int(size),
            channel_order=order,
            mean=_triple(meta.get("mean", d.mean), "mean", source),
            std=_triple(meta.get("std", d.std), "std", source),
            alignment=str(meta.get("alignment", d.alignment)),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain metadata (JSON / ``torch.load(weights_only=True)`` safe), the keys :meth:`from_dict` reads."""
        return {
            "input_size": int(self.size),
            "channel_order": self.channel_order,
            "mean": list(self.mean),
            "std": list(self.std),
            "alignment": self.alignment,
            "input_description": (
                f"uint8 {self.channel_order} face aligned to the 5-point ArcFace template, "
                f"{self.size}x{self.size}, normalised (x / 255 - mean) / std"
            ),
            "output_description": "embedding, not L2-normalised",
        }

    def normalize(self, images: "torch.Tensor") -> "torch.Tensor":
        """uint8 ``[B, 3, H, W]`` **RGB** (on any device) -> the network's float32 input on that device."""
        import torch

        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        x = images.flip(1) if self.channel_order == "BGR" else images
        # x / (255 std) - mean / std: for facemargin's 0.5 / 0.5 that is x / 127.5 - 1, exactly
        # normalize_uint8's arithmetic (127.5 and 1 are exact in float32)
        scale = torch.tensor([255.0 * s for s in self.std], dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        shift = torch.tensor([m / s for m, s in zip(self.mean, self.std)], dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return x.float().div_(scale).sub_(shift)


#: facemargin's own convention: 112x112 RGB, ``(x / 255 - 0.5) / 0.5``.
DEFAULT = InputSpec()


def input_spec_of(model: Any) -> InputSpec:
    """``model.input_spec`` when it has one, else :data:`DEFAULT` at ``model.input_size`` (if set)."""
    spec = getattr(model, "input_spec", None)
    if isinstance(spec, InputSpec):
        return spec
    size = getattr(model, "input_size", None)
    return InputSpec(size=int(size)) if size else DEFAULT
