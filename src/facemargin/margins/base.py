"""The margin contract: what a head hands a margin each step, and what the margin hands back.

A head computes the cosines of (its rows of) the batch against (its block of) the class
centres and calls ``margin(MarginInput(...)) -> MarginOutput``. Where the ``[N, C]`` cosine
matrix of the global batch is split across ranks, the input carries two reductions:

- ``reduce_columns``: SUM over the ranks holding the *other column blocks of the same rows*
  (Partial FC: every rank holds every row of the global batch and ``C / world`` centres);
- ``reduce_rows``: SUM over the ranks holding *other rows* (a data-parallel ``MarginHead``:
  every rank holds its own rows and every centre).

Both are the identity on one process. Margins never call them directly: they use
:meth:`MarginInput.target_cos`, :meth:`MarginInput.sum_over_rows` and
:meth:`MarginInput.sum_over_entries`, which are the same on every layout. All three are
collectives under a process group: every rank calls them, in the same order, every step.

Rules for margins: math in float32 (float64 when given float64), autocast off, clamp before
``acos``; running statistics are registered buffers updated only from these reduced values
(so they stay identical on every rank) and only in training mode.

Running statistics' dtype: float32 buffers, whatever the input's dtype (bf16/fp16, under
autocast or not, float32, float64); a cast of the model to bf16/fp16 (``.half()``,
``.to(torch.bfloat16)``, Lightning ``precision="bf16-true"``) leaves them float32 (an EMA
``t <- 0.99 t + 0.01 x`` stalls in bf16's 8 bits: near 0.5 a step of 0.005 is below half a bf16
unit). Only ``.double()`` (``precision="64-true"``) makes them float64. Each update is computed in
float64 and rounded once to the buffer's dtype; the margin reads them in its compute dtype.

Parameters are validated when a margin is built: numbers must be real numbers (not ``bool``, not
strings) within their documented range, flags must be ``bool``; anything else raises
:class:`ParameterError` (a ``UserError`` and a ``ValueError``) naming the margin, the parameter
and what it accepts.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UserError

__all__ = [
    "THETA_EPS",
    "ParameterError",
    "BaseMargin",
    "MarginInput",
    "MarginOutput",
    "check_labels",
    "check_flag",
    "check_int",
    "check_range",
    "compute_dtype",
    "cos_theta_plus",
    "min_angle",
    "sin_theta",
]

# theta is clamped to [THETA_EPS, pi - THETA_EPS] wherever a derivative of psi(acos(cos)) is
# evaluated: d acos / d cos = -1/sin(theta) is then bounded by 1/sin(THETA_EPS) ~ 1e3, so the
# gradient at cos = +-1 is large but finite, never inf or NaN.
THETA_EPS = 1e-3

Reduction = Callable[[Tensor], Tensor]


class ParameterError(UserError, ValueError):
    """A margin's or head's parameter of the wrong type or out of its range (names both)."""


def _identity(t: Tensor) -> Tensor:
    return t


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 for float64 input, float32 for everything else (bf16, fp16, float32)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_labels(labels: Tensor, batch: int, num_classes: int) -> None:
    """Labels must be an integer ``[batch]`` tensor in ``[0, num_classes)`` or ``-1`` (no target)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor; got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(
            f"labels must be an integer tensor; got {labels.dtype} "
            "(cast RecordIO float labels with .long())"
        )
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},); got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) or be -1; got range [{int(labels.min())}, {int(labels.max())}]"
        )


def check_range(
    owner: str, name: str, value: float, low: float = -math.inf, high: float = math.inf,
    low_open: bool = False, high_open: bool = False,
) -> float:
    """``value`` as a float, or a :class:`ParameterError` naming ``owner``'s parameter ``name`` and its range.

    Only real numbers are accepted: ``True``, ``"0.5"`` or ``None`` are refused, not converted."""
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ParameterError(f"{owner}: {name} must be a number in {lo}{low:g}, {high:g}{hi}; got {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        raise ParameterError(f"{owner}: {name} must lie in {lo}{low:g}, {high:g}{hi}; got {value!r}")
    return v


def check_flag(owner: str, name: str, value: object) -> bool:
    """``value`` if it is a ``bool``, else a :class:`ParameterError` (``"no"``, ``"false"``, ``0`` or ``None``
    would otherwise silently mean True or False)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ParameterError(f"{owner}: {name} must be true or false (a bool); got {value!r}")
    return bool(value)


def check_int(owner: str, name: str, value: object, low: int = 1) -> int:
    """``value`` if it is an integer ``>= low`` (not a ``bool``, not ``2.0``), else a :class:`ParameterError`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ParameterError(f"{owner}: {name} must be {what}; got {value!r}")
    return int(value)


def min_angle(dtype: torch.dtype) -> float:
    """The smallest angle a cosine of ``dtype`` can tell from 0: ``acos`` of the largest value
    below 1, ``sqrt(eps)`` (3.5e-4 rad in float32, 1.5e-8 rad in float64)."""
    return math.sqrt(torch.finfo(dtype).eps)


def sin_theta(cos: Tensor) -> Tensor:
    """``sin(acos(c)) = sqrt((1 - c)(1 + c))`` for ``c`` clamped to ``[-1, 1]``, without gradient,
    bounded below by ``sin(min_angle)`` of its dtype.

    ``1 - c`` and ``1 + c`` are exact near ``c = +-1``, so this is accurate to rounding at every
    angle the dtype can represent (``sqrt(1 - c^2)`` loses 1 % at 1e-7 rad in float64); the bound
    only acts at ``c = +-1`` exactly (and beyond), where the derivative of ``acos`` is infinite:
    there the gradient is the one at the nearest representable angle, large but finite.
    """
    c = cos.detach().clamp(-1.0, 1.0)
    return torch.sqrt((1.0 - c) * (1.0 + c)).clamp_min(math.sin(min_angle(cos.dtype)))


def cos_theta_plus(cos: Tensor, m: Tensor | float) -> Tensor:
    """``cos(theta + m)`` from ``cos = cos(theta)``, as ``c cos m - sin(theta) sin m``.

    ``m`` may be a tensor with gradient (MagFace: the margin depends on the feature norm); its
    gradient ``-sin(theta + m)`` is exact. The gradient in ``cos``, ``cos m + c sin m / sin theta``,
    is exact at every angle the dtype can tell from 0 and pi (:func:`sin_theta`; the reference
    implementations' ``sqrt(1 - c^2)`` gives inf and NaN at ``cos = +-1``).
    """
    c0 = cos.detach().clamp(-1.0, 1.0)
    sin0 = torch.sqrt((1.0 - c0) * (1.0 + c0))
    m_t = torch.as_tensor(m, dtype=cos.dtype, device=cos.device)
    cos_m, sin_m = torch.cos(m_t), torch.sin(m_t)
    value = c0 * cos_m - sin0 * sin_m  # carries the exact gradient in m
    slope = (cos_m + c0 * sin_m / sin_theta(cos)).detach()
    return value + (cos - cos.detach()) * slope


@dataclass
class MarginInput:
    """What a head gives its margin every step (built by the head; see the module docstring).

    Attributes:
        cos: ``[N, C_local]`` cosines of this rank's rows against its block of centres
            (float32, float64 when the head computes in float64).
        labels: ``[N]`` int64, the target's column in *this block*, ``-1`` = not in this block.
        valid: ``[N]`` bool, the row has a label in *some* block (rows without are ignored).
        norms: ``[N]`` raw embedding norms, with gradient (``None`` if the head has none).
        num_classes: global number of classes ``C``.
        reduce_columns / reduce_rows: SUM over the ranks holding other column blocks / other
            rows; identity on one process.
    """

    cos: Tensor
    labels: Tensor
    valid: Tensor
    norms: Tensor | None = None
    num_classes: int = 0
    reduce_columns: Reduction = _identity
    reduce_rows: Reduction = _identity
    _target: Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_classes <= 0:
            self.num_classes = int(self.cos.shape[1])

    @classmethod
    def single(cls, cos: Tensor, labels: Tensor, norms: Tensor | None = None) -> "MarginInput":
        """One process holding every row and every column: ``valid = labels >= 0``."""
        return cls(cos, labels.long(), labels >= 0, norms, int(cos.shape[1]))

    def target_rows(self) -> tuple[Tensor, Tensor]:
        """``(rows, cols)`` of the target entries that lie in this block."""
        rows = torch.nonzero(self.labels >= 0, as_tuple=True)[0]
        return rows, self.labels[rows]

    def target_cos(self) -> Tensor:
        """``[N]`` cosine of every row's target (known on every rank), detached; 0 where not valid."""
        if self._target is None:
            rows, cols = self.target_rows()
            local = self.cos.new_zeros(self.cos.shape[0])
            local[rows] = self.cos.detach()[rows, cols]
            self._target = self.reduce_columns(local)
        return self._target

    def sum_over_rows(self, partial: Tensor) -> Tensor:
        """Sum over the global batch of per-row values, given this rank's sum over its rows.

        The per-row values must be known for every row this rank holds (norms, :meth:`target_cos`).
        """
        return self.reduce_rows(partial)

    def sum_over_entries(self, partial: Tensor) -> Tensor:
        """Sum over the whole ``[N_global, C]`` matrix, given this rank's sum over its block."""
        return self.reduce_rows(self.reduce_columns(partial))


@dataclass
class MarginOutput:
    """What a margin returns: scaled logits, extra loss terms, values to log (all float32/64).

    ``extra_losses`` are scalars over the head's rows, added to the objective's loss (MagFace's
    regulariser); ``logs`` are detached scalars (the dynamic ``m``, CurricularFace's ``t``).
    """

    logits: Tensor
    extra_losses: dict[str, Tensor] = field(default_factory=dict)
    logs: dict[str, Tensor] = field(default_factory=dict)


class BaseMargin(nn.Module):
    """A margin: ``forward(MarginInput) -> MarginOutput``. Subclasses set ``name`` and, in
    ``__init__``, ``params`` (their hyper-parameters without ``s``, a dict).

    ``needs_norms`` says whether :attr:`MarginInput.norms` must be given. :meth:`logits` is the
    drop-in convenience for one process: ``[B, C]`` cosines and labels in, scaled logits out.
    """

    name: str = ""
    needs_norms: bool = False
    params: dict[str, float | bool]

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = check_range(type(self).__name__, "s", s, low=0.0, low_open=True)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def,override]
        """Module casts as usual, except that floating buffers (running statistics) never go
        below float32 (see the module docstring)."""
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype not in (torch.float32, torch.float64):
                self._buffers[name] = buf.to(torch.float32)
        return self

    def forward(self, inp: MarginInput) -> MarginOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def logits(self, cos: Tensor, labels: Tensor, norms: Tensor | None = None) -> Tensor:
        """Scaled logits of one process's ``[B, C]`` cosine block (labels ``-1`` = no target)."""
        if cos.dim() != 2:
            raise ValueError(f"cos must be [B, C]; got {tuple(cos.shape)}")
        check_labels(labels, cos.shape[0], cos.shape[1])
        if self.needs_norms and (norms is None or norms.shape != (cos.shape[0],)):
            raise ValueError(f"margin {self.name!r} needs the [B] embedding norms: logits(cos, labels, norms)")
        return self(MarginInput.single(cos, labels, norms)).logits

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}, s={self.s}" + (f", {params}" if params else "")
