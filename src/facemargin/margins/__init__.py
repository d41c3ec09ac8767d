"""Margins: turn a block of cosines into scaled logits (see :mod:`facemargin.margins.base`).

psi-margins (:class:`Margin`: softmax, sphereface, cosface, arcface, combined, expface, each
optionally ``dynamic``) change the target logit by a function of its angle; adaptive margins
(:class:`CurricularFace`, :class:`AdaFace`, :class:`MagFace`, :class:`SphereFaceR`) need the
whole block, the embedding norms or running statistics.
"""

from .adaptive import AdaFace, CurricularFace, MagFace, SphereFaceR
from .base import THETA_EPS, BaseMargin, MarginInput, MarginOutput, ParameterError, check_labels
from .psi import GRAD_MODES, MARGINS, Margin, MarginSpec, target_logit
from .registry import ADAPTIVE_MARGINS, as_margin, available_margins, build_margin

__all__ = [
    "ADAPTIVE_MARGINS",
    "GRAD_MODES",
    "MARGINS",
    "THETA_EPS",
    "AdaFace",
    "BaseMargin",
    "CurricularFace",
    "MagFace",
    "Margin",
    "MarginInput",
    "MarginOutput",
    "MarginSpec",
    "ParameterError",
    "SphereFaceR",
    "as_margin",
    "available_margins",
    "build_margin",
    "check_labels",
    "target_logit",
]
