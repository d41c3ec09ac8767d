"""Evaluation: the evaluator contract and the verification protocols (pairs; IJB-B/C)."""

from .base import EncodedImages, Evaluator, ImageFiles
from .ijb import IJBEvaluator
from .pairs import BinPairsEvaluator, FolderPairsEvaluator, PairsEvaluator, verification_scores

__all__ = [
    "BinPairsEvaluator",
    "EncodedImages",
    "Evaluator",
    "FolderPairsEvaluator",
    "IJBEvaluator",
    "ImageFiles",
    "PairsEvaluator",
    "verification_scores",
]
