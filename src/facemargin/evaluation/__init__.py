"""Evaluation: the evaluator contract and the verification protocols (pairs; IJB-B/C)."""

from .base import EncodedImages, Evaluator
from .pairs import BinPairsEvaluator, PairsEvaluator, verification_scores

__all__ = ["BinPairsEvaluator", "EncodedImages", "Evaluator", "PairsEvaluator", "verification_scores"]
