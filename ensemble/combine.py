"""Combine rules: how member log-probabilities and weights make one prediction.

- ``arithmetic`` (default): the weighted mean of probabilities. Robust: one member's
  confident mistake is diluted, never amplified.
- ``geometric``: the weighted mean of log-probabilities, renormalised (a product of
  experts). Sharper; it rewards members that are confident together, and one member's
  near-zero probability vetoes a class.

Inputs are stacked log-probabilities ``[M, N, C]``; outputs are log-probabilities ``[N, C]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ensemble.calibration import log_softmax
from zoo.errors import UserInputError

def _check(log_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    if log_probs.ndim != 3:
        raise ValueError(f"log_probs: expected stacked member log-probabilities [M, N, C], got shape {log_probs.shape}")
    if weights.shape != (log_probs.shape[0],):
        raise ValueError(f"weights: expected one weight per member, shape ({log_probs.shape[0]},), got {weights.shape}")
    if (weights < 0).any() or not np.isfinite(weights).all() or weights.sum() <= 0:
        raise ValueError(f"weights: expected finite non-negative weights with a positive sum, got {weights.tolist()}")
    return weights / weights.sum()


def arithmetic(log_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``log(sum_j w_j p_j)``, accumulated member by member (no [M, N, C] temporary),
    in the members' precision (float32 members: float32 sums, ample for probabilities)."""
    weights = _check(log_probs, weights)
    dtype = np.dtype(log_probs.dtype if log_probs.dtype in (np.float32, np.float64) else np.float64)
    total = np.zeros(log_probs.shape[1:], dtype=dtype)
    for w, lp in zip(weights, log_probs):
        if w > 0:
            total += dtype.type(w) * np.exp(lp.astype(dtype, copy=False))
    return np.log(np.maximum(total, np.finfo(dtype).tiny))


def geometric(log_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``log_softmax(sum_j w_j log p_j)``: the normalised weighted geometric mean."""
    weights = _check(log_probs, weights)
    dtype = np.dtype(log_probs.dtype if log_probs.dtype in (np.float32, np.float64) else np.float64)
    total = np.zeros(log_probs.shape[1:], dtype=dtype)
    for w, lp in zip(weights, log_probs):
        if w > 0:
            total += dtype.type(w) * lp
    return log_softmax(total)


@dataclass(frozen=True)
class CombineRule:
    name: str
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray]
    description: str


COMBINE_RULES: dict[str, CombineRule] = {
    "arithmetic": CombineRule("arithmetic", arithmetic, "weighted mean of probabilities"),
    "geometric": CombineRule("geometric", geometric, "weighted mean of log-probabilities, renormalised"),
}


def get_combine_rule(name: str) -> CombineRule:
    if name not in COMBINE_RULES:
        raise UserInputError(f"combine: expected one of {', '.join(COMBINE_RULES)}, got {name!r}")
    return COMBINE_RULES[name]


def combine(log_probs: np.ndarray, weights: np.ndarray, rule: str = "arithmetic") -> np.ndarray:
    """Combined log-probabilities [N, C] of stacked member log-probabilities [M, N, C]."""
    return get_combine_rule(rule).fn(np.asarray(log_probs), weights)
