"""What every weight search shares: input checks, the data of one search (``_Problem``: fast
losses and gradients of a blend), the estimator base class, BLAS thread limits."""

from __future__ import annotations

import contextlib
import math
from functools import cached_property
from typing import ClassVar

import numpy as np

from ensemble.calibration import log_softmax, row_blocks
from ensemble.combine import COMBINE_RULES, combine
from ensemble.metrics import EPS, METRICS, get_metric
from zoo.errors import UserInputError

_LOG_EPS = math.log(EPS)
# Weights below this are numerical zeros of the solver: the member is dropped.
ZERO_WEIGHT = 1e-6
_BLOCK_VALUES = 1 << 19


@contextlib.contextmanager
def blas_threads(work: float = 0.0):
    """One BLAS/OpenMP thread unless ``work`` (multiply-adds of one product) is large.

    The searches' products are matrix-vector (memory-bound): more threads do not make
    them faster, and on a busy machine (or under ``fit_ensemble``'s two fold threads)
    threads that spin-wait for a core make them many times slower: 50x measured for a
    small logistic regression on 2 cores.
    """
    from threadpoolctl import threadpool_limits

    if work >= 1e9:
        yield
        return
    with threadpool_limits(limits=1):
        yield


class ConvergenceWarning(UserWarning):
    """An optimiser stopped before its convergence test passed."""


def _check_inputs(log_probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    log_probs = np.asarray(log_probs)
    labels = np.asarray(labels)
    if log_probs.ndim != 3 or 0 in log_probs.shape:
        raise ValueError(f"log_probs: expected stacked member log-probabilities [M, N, C] with no empty axis, got shape {log_probs.shape}")
    if not np.issubdtype(log_probs.dtype, np.floating):
        raise ValueError(f"log_probs: expected a float array, got dtype {log_probs.dtype}")
    _, n, c = log_probs.shape
    if labels.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},) to match log_probs {log_probs.shape}, got {labels.shape}")
    if labels.min() < 0 or labels.max() >= c:
        row = int(np.argmax((labels < 0) | (labels >= c)))
        raise ValueError(f"labels: expected known class indices 0..{c - 1} on every row, got {int(labels[row])} at row {row}")
    # C order: each member's [N, C] block contiguous, as the products and slices here expect.
    return np.ascontiguousarray(log_probs), labels.astype(np.int64)


def _normalise(weights: np.ndarray) -> np.ndarray:
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    w[w < ZERO_WEIGHT] = 0.0
    if w.sum() <= 0:
        raise RuntimeError(f"every weight is zero after clipping: {weights}")
    return w / w.sum()


class _Problem:
    """The data of one weight search and fast ways to score blends of it.

    For the arithmetic mean under log loss only each member's probability of the true
    class matters, so an [N, M] matrix replaces the [M, N, C] stack.
    """

    def __init__(self, log_probs: np.ndarray | None, labels: np.ndarray | None, metric: str, rule: str,
                 true_probs: np.ndarray | None = None):
        self.log_probs, self.labels = log_probs, labels
        self.metric = get_metric(metric, searchable=True)
        self.rule = rule
        self.log_loss = metric == "log_loss"
        if true_probs is not None:  # the arithmetic log-loss problem needs nothing else
            self.true_probs = np.ascontiguousarray(true_probs, dtype=np.float64)
            self.n, self.m = self.true_probs.shape
            self.c = None
        else:
            self.m, self.n, self.c = log_probs.shape

    @cached_property
    def true_log_probs(self) -> np.ndarray:  # [M, N] float64
        return self.log_probs[:, np.arange(self.n), self.labels].astype(np.float64)

    @cached_property
    def true_probs(self) -> np.ndarray:  # [N, M] float64, C-contiguous for fast matmuls
        return np.ascontiguousarray(np.exp(self.true_log_probs).T)

    @cached_property
    def probs(self) -> np.ndarray:  # [M, N, C] float32
        return np.exp(self.log_probs, dtype=np.float32)

    def score_predicted(self, predicted: np.ndarray) -> float:
        return self.metric.from_predicted(predicted, self.labels, self.c)

    def loss(self, weights: np.ndarray) -> float:
        """The target metric of one blend, as something to minimise (the reported score's sign flipped if needed)."""
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        if self.log_loss and self.rule == "arithmetic":
            p = self.true_probs @ w
            return float(-np.mean(np.log(np.clip(p, EPS, 1.0))))
        if self.log_loss:
            return float(self._geometric_log_loss(w, gradient=False)[0])
        if np.count_nonzero(w) == 1:  # one member: its own arg-max, under either rule
            return self.metric.loss(self.score_predicted(np.argmax(self.log_probs[int(np.flatnonzero(w)[0])], axis=1)))
        blend = combine(self.log_probs, w, self.rule)
        return self.metric.loss(self.score_predicted(np.argmax(blend, axis=1)))

    def losses(self, weights: np.ndarray) -> np.ndarray:
        """``loss`` of many blends at once, ``weights`` [B, M]."""
        weights = np.asarray(weights, dtype=np.float64)
        if self.log_loss and self.rule == "arithmetic":
            weights = weights / weights.sum(axis=1, keepdims=True)
            out = np.empty(len(weights))
            step = max(1, 2_000_000 // self.n)  # keep the [N, B] block near 16 MB
            for start in range(0, len(weights), step):
                p = self.true_probs @ weights[start:start + step].T
                out[start:start + step] = -np.mean(np.log(np.clip(p, EPS, 1.0)), axis=0)
            return out
        return np.array([self.loss(w) for w in weights])

    @cached_property
    def _exact(self) -> bool:
        # float64 products where they fit in ~200 MB; float32 (halving time and memory)
        # on big stacks, where the mean over many rows averages the rounding out.
        return self.m * self.n * self.c <= 25_000_000

    @cached_property
    def _log_probs_blas(self) -> np.ndarray:
        return self.log_probs.astype(np.float64) if self._exact else self.log_probs

    @cached_property
    def _probs_blas(self) -> np.ndarray:
        return self.probs.astype(np.float64) if self._exact else self.probs

    def _chunks(self):
        # Row blocks of about half a million values: the chain of elementwise steps on a
        # block stays in cache, and each block is one BLAS matrix-vector product over
        # [M, rows * C] views; partial sums are gathered in float64.
        return row_blocks(self.n, self.c, _BLOCK_VALUES)

    def _geometric_log_loss(self, w: np.ndarray, gradient: bool) -> tuple[float, np.ndarray | None]:
        """Log loss of ``log_softmax(sum_j w_j log p_j)`` (``w`` need not sum to 1: its sum is
        an inverse temperature) and its gradient. Convex in ``w``:
        loss = mean_i [logsumexp_c z_ic - z_iy];  d/dw_j = mean_i [E_softmax(z_i) log p_j,i - log p_j,iy]."""
        total = 0.0
        grad = np.zeros(self.m) if gradient else None
        stack = self._log_probs_blas
        w32 = w.astype(stack.dtype)
        for start, stop in self._chunks():
            block = stack[:, start:stop].reshape(self.m, -1)
            z = (w32 @ block).astype(np.float64).reshape(stop - start, self.c)
            lp = log_softmax(z)
            lp_true = lp[np.arange(stop - start), self.labels[start:stop]]
            total += float(np.sum(lp_true if gradient else np.maximum(lp_true, _LOG_EPS)))
            if gradient:
                grad += block @ np.exp(lp).astype(stack.dtype, copy=False).ravel()
        loss = -total / self.n
        if gradient:
            grad = grad / self.n - self.true_log_probs.mean(axis=1)
        return loss, grad


class _Search:
    """What every method shares: options, checks, and applying the fit."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]] = tuple(name for name, m in METRICS.items() if m.searchable)
    weighted: ClassVar[bool] = True  # False for a learned combiner (no weights on the simplex)
    description: ClassVar[str]

    def _validate_common(self) -> None:
        if self.metric not in self.metrics:
            hint = "" if self.metric not in METRICS else f"; method {self.name!r} optimises {', '.join(self.metrics)} only, use greedy or random for {self.metric}"
            raise UserInputError(f"metric: expected one of {', '.join(self.metrics)} for method {self.name!r}, got {self.metric!r}{hint}")
        if self.combine not in COMBINE_RULES:
            raise UserInputError(f"combine: expected one of {', '.join(COMBINE_RULES)}, got {self.combine!r}")

    def fit(self, log_probs: np.ndarray, labels: np.ndarray):
        """Fit on stacked member log-probabilities [M, N, C] and labels [N]; returns self."""
        with blas_threads(self._blas_work(np.shape(log_probs))):
            self._validate_params()
            log_probs, labels = _check_inputs(log_probs, labels)
            return self._fit(_Problem(log_probs, labels, self.metric, self.combine))

    def fit_true_probs(self, true_probs: np.ndarray):
        """Fit from each member's probability of the true class, [N, M] (arithmetic rule,
        log loss only: nothing else enters that objective); returns self."""
        self._validate_params()
        if self.combine != "arithmetic" or self.metric != "log_loss":
            raise ValueError(f"fit_true_probs: only the arithmetic rule under log loss depends on the true-class "
                             f"probabilities alone, got combine {self.combine!r} and metric {self.metric!r}; use fit")
        q = np.asarray(true_probs, dtype=np.float64)
        if q.ndim != 2 or 0 in q.shape or not np.all((q >= 0) & (q <= 1 + 1e-5)):
            raise ValueError(f"true_probs: expected probabilities in [0, 1] of shape [N, M], got shape {q.shape} "
                             f"with values in [{q.min() if q.size else 0:.3g}, {q.max() if q.size else 0:.3g}]")
        q = np.minimum(q, 1.0)  # exp of a float32 log-probability may round just above 1
        with blas_threads():
            return self._fit(_Problem(None, None, self.metric, self.combine, true_probs=q))

    def _blas_work(self, shape) -> float:
        return 0.0

    def _check_fitted(self) -> None:
        if not hasattr(self, "weights_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(log_probs, labels) first")

    def predict_log_proba(self, log_probs: np.ndarray) -> np.ndarray:
        """Combined log-probabilities [N, C] of stacked member log-probabilities [M, N, C]."""
        self._check_fitted()
        return combine(log_probs, self.weights_, self.combine)

    def _finish(self, problem: _Problem, weights: np.ndarray) -> None:
        self.weights_ = _normalise(weights)
        self.loss_ = problem.loss(self.weights_)
        self.score_ = problem.metric.loss(self.loss_)  # the target metric, its own sign
