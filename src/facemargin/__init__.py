"""facemargin: margin-based softmax losses for face recognition, as a PyTorch Lightning plug-in."""

from . import backbones  # registers iresnet*, mobilefacenet in timm
from .heads import MarginHead
from .margins import Margin, available_margins, build_margin

__version__ = "0.1.0"
__all__ = ["MarginHead", "Margin", "available_margins", "build_margin", "__version__"]
