"""The verification thresholds a model carries: written by validation, read by ``compare``.

Validation runs insightface's protocol (:mod:`facemargin.evaluation.pairs`) and stores, per set
that can support it, the threshold it chose and the accuracy at it::

    record["verification"] = {"lfw": {"threshold_cosine": 0.2712, "acc": 0.9955}, ...}
    record["verification_notes"] = {"small_lfw": "small_lfw: 10 same-person pairs, ..."}

``threshold_cosine`` is a **cosine similarity** of L2-normalised embeddings: two faces are the
same person when their cosine is above it. A set whose accuracy is undefined (one kind of pair
only, or a fold without both kinds) stores no threshold at all; ``verification_notes`` says why,
so that a user of the model learns which set could not choose one. Checkpoints and exports
written before stored ``threshold``: insightface's squared L2 distance ``d`` between the
normalised embeddings; :func:`stored_thresholds` converts it on read (``cos = 1 - d / 2``).

Stdlib only.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from ..errors import UserError

__all__ = [
    "THRESHOLD_KEY",
    "THRESHOLD_UNIT",
    "NoThresholdError",
    "choose_threshold",
    "stored_thresholds",
    "threshold_entry",
]

#: the key of a stored threshold (its unit is in its name)
THRESHOLD_KEY = "threshold_cosine"
#: the key facemargin wrote before: insightface's squared L2 distance on normalised embeddings
LEGACY_KEY = "threshold"
#: what exported metadata and checkpoint records say about the stored thresholds
THRESHOLD_UNIT = (
    "cosine similarity of the L2-normalised embeddings (image + horizontal flip, summed): "
    "the same person when cosine > threshold_cosine"
)


class NoThresholdError(UserError, ValueError):
    """The model stores no usable threshold (or none for the set asked for)."""


def threshold_entry(scores: Mapping[str, Any]) -> dict[str, float] | None:
    """What validation stores for a set from its figures: ``{"threshold_cosine", "acc"}``, or
    ``None`` when the set could not choose a threshold (its threshold is null)."""
    value = scores.get(THRESHOLD_KEY)
    if value is None or not math.isfinite(float(value)):
        return None
    entry = {THRESHOLD_KEY: float(value)}
    acc = scores.get("acc")
    if acc is not None and math.isfinite(float(acc)):
        entry["acc"] = float(acc)
    return entry


def stored_thresholds(verification: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """``{set: {"threshold_cosine", "acc"?}}`` from a record's ``verification``, old or new.

    An entry with ``threshold_cosine`` is taken as it is; one with only ``threshold`` (written
    before thresholds were stored as cosines) is insightface's squared distance ``d`` and becomes
    ``1 - d / 2``. Entries without a finite threshold are dropped.
    """
    out: dict[str, dict[str, float]] = {}
    for name, entry in (verification or {}).items():
        if not isinstance(entry, Mapping):
            continue
        if entry.get(THRESHOLD_KEY) is not None:
            cos = float(entry[THRESHOLD_KEY])
        elif entry.get(LEGACY_KEY) is not None:
            cos = 1.0 - float(entry[LEGACY_KEY]) / 2.0
        else:
            continue
        if not math.isfinite(cos):
            continue
        converted = {THRESHOLD_KEY: cos}
        if entry.get("acc") is not None:
            converted["acc"] = float(entry["acc"])
        out[str(name)] = converted
    return out


def choose_threshold(
    metadata: Mapping[str, Any], set_name: str | None = None, source: str = "model"
) -> tuple[float, str, str]:
    """``(cosine threshold, set name, "chosen by validation on <set> (accuracy ...)")``.

    ``metadata``: a checkpoint record or exported metadata (``verification``,
    ``verification_notes``). Without ``set_name`` the first stored set is used. Raises
    :class:`NoThresholdError` naming ``source``, the sets that could not choose one and why.
    """
    stored = stored_thresholds(metadata.get("verification"))
    notes = dict(metadata.get("verification_notes") or {})
    if set_name is not None and set_name not in stored:
        why = f" ({notes[set_name]})" if set_name in notes else ""
        raise NoThresholdError(
            f"{source}: no threshold for set {set_name!r}{why}; stored: {sorted(stored) or 'none'}",
            hint=None if stored else "pass threshold=<cosine similarity>",
        )
    if not stored:
        refused = "; ".join(notes.values())
        raise NoThresholdError(
            f"{source}: no verification threshold is stored with this model"
            + (f"; no validation set could choose one: {refused}" if refused else ""),
            hint="pass threshold=<cosine similarity>, or validate on a set with same-person and different-person "
                 "pairs in every fold (python -m facemargin.evaluate prints threshold_cosine)",
        )
    name = set_name if set_name is not None else next(iter(stored))
    entry = stored[name]
    acc = entry.get("acc")
    said = f"chosen by validation on {name}" + (f" (accuracy {acc:.4f})" if acc is not None else "")
    return entry[THRESHOLD_KEY], name, said
