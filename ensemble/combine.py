"""Combine rules: how member log-probabilities and weights make one prediction.

- ``arithmetic`` (default): the weighted mean of probabilities. Robust: one member's
  confident mistake is diluted, never amplified.
- ``geometric``: the weighted mean of log-probabilities, renormalised (a product of
  experts). Sharper; it rewards members that are confident together, and one member's
  near-zero probability vetoes a class.

Inputs are stacked log-probabilities ``[M, N, C]``; outputs are log-probabilities ``[N, C]``.
Member temperatures and a subset of rows can be applied on the fly, block by block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ensemble.calibration import log_softmax_into, row_blocks
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


def _members(log_probs: np.ndarray, weights: np.ndarray, temperatures, rows, log: bool):
    """For each member with a nonzero weight and each block of ``rows``: (weight, start, stop,
    its probabilities, or log-probabilities when ``log``, at its temperature), in the stack's
    precision. Member by member and block by block: nothing as large as the stack is made."""
    weights = _check(log_probs, weights)
    temps = np.ones(len(weights)) if temperatures is None else np.asarray(temperatures, dtype=np.float64)
    if temps.shape != weights.shape or not (temps > 0).all():
        raise ValueError(f"temperatures: expected one positive temperature per member, shape {weights.shape}, got {temps.tolist()}")
    dtype = np.dtype(log_probs.dtype if log_probs.dtype in (np.float32, np.float64) else np.float64)
    n = log_probs.shape[1] if rows is None else len(rows)
    for j in np.flatnonzero(weights):
        z, t = log_probs[j], float(temps[j])
        for start, stop in row_blocks(n, log_probs.shape[2]):
            block = z[start:stop] if rows is None else z[rows[start:stop]]
            if t == 1.0:  # already log-probabilities: nothing to renormalise
                x = block.astype(dtype, copy=False)
                yield weights[j], start, stop, (x if log else np.exp(x))
                continue
            x = np.multiply(block, dtype.type(1.0 / t), dtype=dtype)
            x -= x.max(axis=1, keepdims=True)
            e = np.exp(x)
            norm = e.sum(axis=1, keepdims=True)
            if log:
                x -= np.log(norm)
                yield weights[j], start, stop, x
            else:
                e /= norm
                yield weights[j], start, stop, e


def _out(log_probs: np.ndarray, weights: np.ndarray, rows) -> np.ndarray:
    _check(log_probs, weights)
    dtype = np.dtype(log_probs.dtype if log_probs.dtype in (np.float32, np.float64) else np.float64)
    n = log_probs.shape[1] if rows is None else len(rows)
    return np.zeros((n, log_probs.shape[2]), dtype=dtype)


def arithmetic(log_probs: np.ndarray, weights: np.ndarray, temperatures=None, rows=None) -> np.ndarray:
    """``log(sum_j w_j p_j)`` in the members' precision (float32 members: float32 sums, ample
    for probabilities); ``p_j = softmax(log_probs[j, rows] / temperatures[j])``."""
    total = _out(log_probs, weights, rows)
    for w, start, stop, p in _members(log_probs, weights, temperatures, rows, log=False):
        p *= total.dtype.type(w)
        total[start:stop] += p
    np.maximum(total, np.finfo(total.dtype).tiny, out=total)
    return np.log(total, out=total)


def geometric(log_probs: np.ndarray, weights: np.ndarray, temperatures=None, rows=None) -> np.ndarray:
    """``log_softmax(sum_j w_j log p_j)``: the normalised weighted geometric mean."""
    total = _out(log_probs, weights, rows)
    for w, start, stop, lp in _members(log_probs, weights, temperatures, rows, log=True):
        total[start:stop] += total.dtype.type(w) * lp
    return log_softmax_into(total, total)


@dataclass(frozen=True)
class CombineRule:
    name: str
    fn: Callable[..., np.ndarray]
    description: str


COMBINE_RULES: dict[str, CombineRule] = {
    "arithmetic": CombineRule("arithmetic", arithmetic, "weighted mean of probabilities"),
    "geometric": CombineRule("geometric", geometric, "weighted mean of log-probabilities, renormalised"),
}


def get_combine_rule(name: str) -> CombineRule:
    if name not in COMBINE_RULES:
        raise UserInputError(f"combine: expected one of {', '.join(COMBINE_RULES)}, got {name!r}")
    return COMBINE_RULES[name]


def combine(log_probs: np.ndarray, weights: np.ndarray, rule: str = "arithmetic", temperatures=None,
            rows: np.ndarray | None = None) -> np.ndarray:
    """Combined log-probabilities [N, C] of stacked member log-probabilities [M, N, C].

    ``temperatures``: one per member, applied on the fly (no tempered copy of the stack);
    ``rows``: combine only these rows (an index array), in that order.
    """
    return get_combine_rule(rule).fn(np.asarray(log_probs), weights, temperatures, rows)
