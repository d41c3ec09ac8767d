"""Every margin by name: ``available_margins()``, ``build_margin(name, **params)``, ``as_margin``."""

from __future__ import annotations

from .adaptive import AdaFace, CurricularFace, MagFace, SphereFaceR
from .base import BaseMargin
from .psi import MARGINS, Margin

__all__ = ["ADAPTIVE_MARGINS", "as_margin", "available_margins", "build_margin"]

#: name -> class of the margins that need more than the target angle
ADAPTIVE_MARGINS: dict[str, type[BaseMargin]] = {
    cls.name: cls for cls in (CurricularFace, AdaFace, MagFace, SphereFaceR)
}


def available_margins() -> list[str]:
    """Every name :func:`build_margin` accepts: the psi-margins, then the adaptive ones."""
    return [*MARGINS, *ADAPTIVE_MARGINS]


def build_margin(name: str = "expface", **params: object) -> BaseMargin:
    """A margin by name with its paper defaults overridden by ``params``; an unknown name raises
    ``ValueError`` listing the valid ones, an unknown parameter ``TypeError``/``ValueError``."""
    if name in ADAPTIVE_MARGINS:
        cls = ADAPTIVE_MARGINS[name]
        params = {k: v for k, v in params.items() if v is not None or k not in ("s", "grad", "dynamic")}
        for key in ("grad", "dynamic"):
            if key in params:
                raise ValueError(f"margin {name!r} has no {key!r} option (it is only for the psi-margins)")
        try:
            return cls(**params)  # type: ignore[arg-type]
        except TypeError as err:
            raise ValueError(f"margin {name!r}: {err}") from None
    return Margin(name, **params)  # type: ignore[arg-type]


def as_margin(margin: str | BaseMargin, s: float | None = None, grad: str | None = None, **params: object) -> BaseMargin:
    """A head's ``margin`` argument -> a margin module.

    A name is built with ``s``, ``grad`` (psi-margins; default ``"detached"``) and the parameters.
    A ready margin is used as is: passing ``s``, ``grad`` or parameters alongside it raises, since
    they would be silently ignored.
    """
    if isinstance(margin, BaseMargin):
        given = [k for k, v in (("s", s), ("grad", grad)) if v is not None] + sorted(params)
        if given:
            raise ValueError(
                f"margin is a ready {type(margin).__name__}: pass {', '.join(given)} to it, not to the head"
            )
        return margin
    if not isinstance(margin, str):
        raise TypeError(f"margin must be a name or a margin module; got {type(margin).__name__}")
    if margin in MARGINS:
        return Margin(margin, s=s, grad=grad or "detached", **params)  # type: ignore[arg-type]
    return build_margin(margin, s=s, grad=grad, **params)
