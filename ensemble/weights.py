"""Weight searches: which blend of members to trust, fitted on validation predictions.

One registry, ``WEIGHT_SEARCHES``, maps a method name to an sklearn-style estimator:
``__init__`` stores options, ``fit(log_probs, labels)`` returns self and sets attributes
that end in ``_``, ``predict_log_proba(log_probs)`` applies the fit. ``log_probs`` are
stacked member log-probabilities ``[M, N, C]`` (already temperature-scaled if wanted).
For the arithmetic mean under log loss only each member's probability of the true class
matters: ``fit_true_probs(true_probs)`` fits the weighted methods from that [N, M] matrix
alone, without the stack (what ``zoo ensemble fit`` does by default).

- ``SlsqpWeights``: log loss of a weighted mean of probabilities (or of log-probabilities)
  is convex in the weights, so a constrained solver with the analytic gradient reaches the
  optimum; the Frank–Wolfe duality gap certifies how close it is.
- ``GreedyWeights``: Caruana et al. (2004) ensemble selection, for any metric.
- ``RandomWeights``: Dirichlet samples, best kept; the baseline the others must beat.
- ``StackingCombiner``: multinomial logistic regression on the members' log-probabilities.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from ensemble.calibration import log_softmax
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
        rows = max(1, _BLOCK_VALUES // self.c)
        for start in range(0, self.n, rows):
            yield start, min(start + rows, self.n)

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


class SlsqpWeights(_Search):
    """Minimise log loss over the simplex with SLSQP and the analytic gradient.

    The problem is convex, so the result is the optimum; ``gap_`` (the Frank–Wolfe
    duality gap, ``g·w - min_j g_j``) bounds how far its log loss is above the optimum.

    The weights are chosen at T = 1. ``zoo ensemble fit --calibrate`` scales each member
    first and fits the final temperature afterwards, with these weights fixed (pool, then
    calibrate: Rahaman & Thiery 2021). Choosing weights and final temperature together
    was tried and removed: a member that carries no information, softened to near
    uniform, plus a sharp final temperature acts as a two-parameter "floor, then
    sharpen" calibration map, and the joint fit gave such a member most of the weight.

    Attributes: ``weights_``, ``loss_`` and ``score_`` (log loss of the blend), ``gap_``,
    ``n_iter_``, ``message_``.
    """

    name = "slsqp"
    metrics = ("log_loss",)
    description = "minimise log loss over the simplex (convex; SLSQP with the analytic gradient)"

    def __init__(self, metric: str = "log_loss", combine: str = "arithmetic", tol: float = 1e-12,
                 max_iter: int = 1000, gap_tol: float = 1e-6):
        self.metric = metric
        self.combine = combine
        self.tol = tol
        self.max_iter = max_iter
        self.gap_tol = gap_tol

    def _validate_params(self) -> None:
        self._validate_common()
        if not self.tol > 0:
            raise ValueError(f"tol: expected a positive tolerance, got {self.tol}")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ValueError(f"max_iter: expected an integer >= 1, got {self.max_iter!r}")
        if not self.gap_tol > 0:
            raise ValueError(f"gap_tol: expected a positive tolerance, got {self.gap_tol}")

    def _objective(self, problem: _Problem):
        if problem.rule == "geometric":
            return lambda w: problem._geometric_log_loss(w, gradient=True)
        q = problem.true_probs

        def arithmetic(w):
            p = np.maximum(q @ w, EPS)
            return float(-np.mean(np.log(p))), -(q / p[:, None]).mean(axis=0)

        return arithmetic

    def _minimize(self, objective, start, bounds, constraints=()):
        from scipy.optimize import minimize

        result = minimize(objective, start, jac=True, method="SLSQP", bounds=bounds, constraints=list(constraints),
                          options={"ftol": self.tol, "maxiter": self.max_iter})
        self.n_iter_ += int(result.nit)
        self.message_ = str(result.message)
        return result

    def _fit(self, problem: _Problem) -> "SlsqpWeights":
        m = problem.m
        objective = self._objective(problem)
        simplex = {"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}
        start = np.full(m, 1.0 / m)
        self.n_iter_, self.message_ = 0, "single member"
        w = start
        if m > 1:
            result = self._minimize(objective, start, [(0.0, 1.0)] * m, [simplex])
            w = _normalise(result.x)
            if objective(w)[0] > objective(start)[0]:  # never worse than where it started
                w = start
            self._check_gap(objective, w, result)
        _, grad = objective(w)
        self.gap_ = float(grad @ w - grad.min())
        self._finish(problem, w)
        return self

    def _check_gap(self, objective, w, result) -> None:
        _, grad = objective(w)
        gap = float(grad @ w - grad.min())
        # SLSQP often stops on "positive directional derivative" at the optimum itself;
        # the duality gap, not its flag, says whether the answer is good.
        if not result.success and gap > self.gap_tol:
            warnings.warn(f"SLSQP stopped after {result.nit} iterations: {result.message}; the weights' log loss "
                          f"is within {gap:.2e} of the optimum", ConvergenceWarning, stacklevel=3)


class GreedyWeights(_Search):
    """Caruana et al. (2004) ensemble selection: forward selection with replacement.

    Starts from the ``n_init`` best members (sorted initialisation; ``"auto"`` picks the
    size whose equal-weight average scores best, as the paper chooses it on the hillclimb
    set), then adds, ``n_iter`` times, the member (repeats allowed) that most improves the
    metric. ``use_best`` keeps the best prefix of that path, not the last. With ``bags``
    > 0 it runs the selection on ``bags`` random subsets of ``bag_fraction`` of the members
    and averages their weights (bagged ensemble selection), which resists over-fitting the
    validation set when there are many members. Weights are counts / total.

    Attributes: ``weights_``, ``loss_``, ``score_``, ``trajectory_`` (the metric after the
    initialisation and after each step; the first bag's with bagging), ``best_step_``,
    ``selected_`` (member index added at each step), ``n_init_``, ``bag_weights_``.
    """

    name = "greedy"
    description = "Caruana ensemble selection: forward selection with replacement, best prefix kept"

    def __init__(self, metric: str = "log_loss", combine: str = "arithmetic", n_iter: int = 100,
                 n_init: int | str = "auto", use_best: bool = True, bags: int = 0, bag_fraction: float = 0.5,
                 seed: int = 0):
        self.metric = metric
        self.combine = combine
        self.n_iter = n_iter
        self.n_init = n_init
        self.use_best = use_best
        self.bags = bags
        self.bag_fraction = bag_fraction
        self.seed = seed

    def _validate_params(self) -> None:
        self._validate_common()
        if not (isinstance(self.n_iter, int) and self.n_iter >= 0):
            raise ValueError(f"n_iter: expected an integer >= 0 (selection steps), got {self.n_iter!r}")
        if not (self.n_init == "auto" or (isinstance(self.n_init, int) and self.n_init >= 1)):
            raise ValueError(f"n_init: expected 'auto' or an integer >= 1, got {self.n_init!r}")
        if not (isinstance(self.bags, int) and self.bags >= 0):
            raise ValueError(f"bags: expected an integer >= 0 (0 = no bagging), got {self.bags!r}")
        if not (0 < self.bag_fraction <= 1):
            raise ValueError(f"bag_fraction: expected a fraction in (0, 1], got {self.bag_fraction!r}")

    def _fit(self, problem: _Problem) -> "GreedyWeights":
        if self.bags == 0:
            counts, self.trajectory_, self.best_step_, self.selected_, self.n_init_ = self._select(problem, np.arange(problem.m))
            self.bag_weights_ = None
            self._finish(problem, counts)
            return self
        rng = np.random.default_rng(self.seed)
        size = max(1, round(self.bag_fraction * problem.m))
        bag_weights = []
        for b in range(self.bags):
            members = np.sort(rng.choice(problem.m, size=size, replace=False))
            counts, trajectory, best, selected, n_init = self._select(problem, members)
            if b == 0:
                self.trajectory_, self.best_step_, self.selected_, self.n_init_ = trajectory, best, selected, n_init
            bag_weights.append(counts / counts.sum())
        self.bag_weights_ = np.array(bag_weights)
        self._finish(problem, self.bag_weights_.mean(axis=0))
        return self

    def _select(self, problem: _Problem, members: np.ndarray):
        single = problem.losses(np.eye(problem.m)[members])
        order = members[np.argsort(single, kind="stable")]
        if self.n_init == "auto":
            prefixes = np.tril(np.ones((len(order), len(order))))  # row k: the k+1 best, equal weights
            full = np.zeros((len(order), problem.m))
            full[:, order] = prefixes
            n_init = int(np.argmin(problem.losses(full))) + 1
        else:
            n_init = min(self.n_init, len(order))
        counts = np.zeros(problem.m)
        counts[order[:n_init]] = 1.0
        state = _greedy_state(problem, counts)
        trajectory = [problem.loss(counts)]
        history = [counts.copy()]
        selected = []
        for _ in range(self.n_iter):
            candidate = state.candidate_losses(members)
            pick = int(members[int(np.argmin(candidate))])
            state.add(pick)
            counts[pick] += 1.0
            trajectory.append(float(candidate.min()))
            history.append(counts.copy())
            selected.append(pick)
        trajectory = np.array(trajectory)
        best = int(np.argmin(trajectory)) if self.use_best else len(trajectory) - 1  # argmin: the earliest best
        return history[best], trajectory, best, selected, n_init


class _ArithmeticLogLoss:
    """Greedy state for the mean of probabilities under log loss: the running sum of true-class probabilities."""

    def __init__(self, problem: _Problem, counts: np.ndarray):
        self.q = problem.true_probs
        self.s = self.q @ counts
        self.k = counts.sum()

    def candidate_losses(self, members: np.ndarray) -> np.ndarray:
        p = (self.s[:, None] + self.q[:, members]) / (self.k + 1)
        return -np.mean(np.log(np.clip(p, EPS, 1.0)), axis=0)

    def add(self, j: int) -> None:
        self.s += self.q[:, j]
        self.k += 1


class _ArithmeticLabels:
    """Greedy state for the mean of probabilities under a metric of the arg-max.

    Adding member j's probabilities p to the running sum S can move row i's arg-max away
    from its leader a only if some class c has S_c + p_c > S_a + p_a, which needs the
    lead S_a - (second best) to be below max_c p_c - p_a. Only those rows, usually a
    small share once a few members are in, are recomputed for candidate j.
    """

    def __init__(self, problem: _Problem, counts: np.ndarray):
        self.problem = problem
        self.probs = problem.probs
        self.top_prob = problem.probs.max(axis=2)  # [M, N]
        self.total = _weighted_sum(counts, problem.probs)
        self._refresh()

    def _refresh(self) -> None:
        total = self.total
        self.predicted = np.argmax(total, axis=1)
        if total.shape[1] < 2:
            self.lead = np.full(len(total), np.inf)
            return
        # The lead over the second class matters only where it is below 1 (no member can
        # move a row further): find those rows with one cheap pass, partition only them.
        top = total[np.arange(len(total)), self.predicted]
        close = np.flatnonzero(np.count_nonzero(total >= (top - 1.0)[:, None], axis=1) > 1)
        self.lead = np.full(len(total), np.inf)
        if len(close):
            top2 = np.partition(total[close], total.shape[1] - 2, axis=1)[:, -2:]
            self.lead[close] = top2[:, 1] - top2[:, 0]

    def candidate_losses(self, members: np.ndarray) -> np.ndarray:
        out = np.empty(len(members))
        rows = np.arange(len(self.total))
        for i, j in enumerate(members):
            reach = self.top_prob[j] - self.probs[j][rows, self.predicted]
            live = np.flatnonzero(self.lead <= reach + 1e-9)
            predicted = self.predicted.copy()
            if len(live):
                predicted[live] = np.argmax(self.total[live] + self.probs[j][live], axis=1)
            out[i] = self.problem.metric.loss(self.problem.score_predicted(predicted))
        return out

    def add(self, j: int) -> None:
        self.total += self.probs[j]
        self._refresh()


class _Geometric:
    """Greedy state for the mean of log-probabilities (any metric): the running sum of log-probabilities."""

    def __init__(self, problem: _Problem, counts: np.ndarray):
        self.problem = problem
        self.total = _weighted_sum(counts, problem.log_probs)
        self.k = counts.sum()

    def candidate_losses(self, members: np.ndarray) -> np.ndarray:
        problem = self.problem
        out = np.empty(len(members))
        rows = np.arange(problem.n)
        for i, j in enumerate(members):
            z = self.total + problem.log_probs[j]
            if problem.log_loss:
                lp = log_softmax(z / (self.k + 1))
                out[i] = -np.mean(np.clip(lp[rows, problem.labels], _LOG_EPS, 0.0))
            else:
                out[i] = problem.metric.loss(problem.score_predicted(np.argmax(z, axis=1)))
        return out

    def add(self, j: int) -> None:
        self.total += self.problem.log_probs[j]
        self.k += 1


def _weighted_sum(counts: np.ndarray, stack: np.ndarray) -> np.ndarray:
    # Member by member: a tensordot would upcast the whole [M, N, C] stack to float64.
    total = np.zeros(stack.shape[1:], dtype=np.float64)
    for j in np.flatnonzero(counts):
        total += counts[j] * stack[j]
    return total


def _greedy_state(problem: _Problem, counts: np.ndarray):
    if problem.rule == "geometric":
        return _Geometric(problem, counts)
    if problem.log_loss:
        return _ArithmeticLogLoss(problem, counts)
    return _ArithmeticLabels(problem, counts)


class RandomWeights(_Search):
    """Random search: ``n_iter`` Dirichlet(``alpha``) weight vectors, plus equal weights
    and each member alone; the best on the metric is kept.

    Attributes: ``weights_``, ``loss_``, ``score_``, ``n_evaluated_``.
    """

    name = "random"
    description = "random Dirichlet weights, best kept (a baseline)"

    def __init__(self, metric: str = "log_loss", combine: str = "arithmetic", n_iter: int = 1000,
                 alpha: float = 1.0, seed: int = 0):
        self.metric = metric
        self.combine = combine
        self.n_iter = n_iter
        self.alpha = alpha
        self.seed = seed

    def _validate_params(self) -> None:
        self._validate_common()
        if not (isinstance(self.n_iter, int) and self.n_iter >= 0):
            raise ValueError(f"n_iter: expected an integer >= 0 (random samples), got {self.n_iter!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha: expected a positive Dirichlet concentration, got {self.alpha!r}")

    def _fit(self, problem: _Problem) -> "RandomWeights":
        m = problem.m
        rng = np.random.default_rng(self.seed)
        candidates = np.vstack([np.full((1, m), 1.0 / m), np.eye(m), rng.dirichlet(np.full(m, self.alpha), size=self.n_iter)])
        losses = problem.losses(candidates)
        self.n_evaluated_ = len(candidates)
        self._finish(problem, candidates[int(np.argmin(losses))])
        return self


class StackingCombiner(_Search):
    """Multinomial logistic regression on the members' log-probabilities (clipped at ``clip``).

    A learned, non-linear-in-probability combiner: it can undo a member's bias on some
    classes, at the price of C x M x C coefficients that can over-fit a small validation
    set; judge it by its cross-validated score. ``C="auto"`` (default) picks the L2
    strength from ``AUTO_CS`` by an inner 3-fold cross-validation on log loss (so the
    outer CV of ``fit_ensemble`` stays honest: it is nested). It is already fitted on log
    loss, so no member or final temperature is applied. ``weights_`` is the share of
    absolute coefficient mass on each member, for display only.

    Attributes: ``coef_`` [C, M*C], ``intercept_`` [C], ``C_`` (the strength used),
    ``weights_``, ``loss_``, ``score_``, ``converged_``, ``n_iter_``.
    """

    AUTO_CS = (1e-3, 1e-2, 1e-1, 1.0)  # C > 1 (less regularisation) rarely wins on validation-sized data and costs the most iterations

    name = "stacking"
    metrics = ("log_loss",)
    weighted = False
    description = "multinomial logistic regression on the members' log-probabilities"

    def __init__(self, metric: str = "log_loss", combine: str = "arithmetic", C: float | str = "auto",
                 max_iter: int = 1000, clip: float = math.log(1e-7)):
        self.metric = metric
        self.combine = combine  # unused: the regression is the combine rule
        self.C = C
        self.max_iter = max_iter
        self.clip = clip

    def _validate_params(self) -> None:
        self._validate_common()
        if not (self.C == "auto" or (isinstance(self.C, (int, float)) and self.C > 0)):
            raise ValueError(f"C: expected 'auto' or a positive inverse regularisation strength, got {self.C!r}")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ValueError(f"max_iter: expected an integer >= 1, got {self.max_iter!r}")
        if not self.clip < 0:
            raise ValueError(f"clip: expected a negative log-probability floor, got {self.clip!r}")

    def _blas_work(self, shape) -> float:
        m, n, c = shape if len(shape) == 3 else (0, 0, 0)
        return float(n) * m * c * c  # X [N, M*C] times coefficients [M*C, C]

    def features(self, log_probs: np.ndarray) -> np.ndarray:
        """[N, M*C]: member 0's C log-probabilities, then member 1's, ..."""
        m, n, c = log_probs.shape
        return np.clip(np.asarray(log_probs, dtype=np.float64), self.clip, 0.0).transpose(1, 0, 2).reshape(n, m * c)

    def fit(self, log_probs: np.ndarray, labels: np.ndarray) -> "StackingCombiner":
        """Fit on stacked member log-probabilities [M, N, C] (raw, not tempered) and labels [N]; returns self."""
        with blas_threads(self._blas_work(np.shape(log_probs))):
            return self._fit_stacking(log_probs, labels)

    def fit_true_probs(self, true_probs: np.ndarray):
        raise ValueError("fit_true_probs: stacking learns from every class's log-probability; use fit(log_probs, labels)")

    def _fit_stacking(self, log_probs: np.ndarray, labels: np.ndarray) -> "StackingCombiner":
        from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        self._validate_params()
        log_probs, labels = _check_inputs(log_probs, labels)
        m, n, c = log_probs.shape
        present = np.unique(labels)
        if len(present) < 2:
            raise UserInputError(f"labels: stacking needs at least 2 classes among the validation labels, got only class {int(present[0])}")
        features = self.features(log_probs)
        with warnings.catch_warnings():
            # Said once below, in zoo's words; the inner search's strong-C fits may stop early, harmlessly.
            warnings.simplefilter("ignore", SklearnConvergenceWarning)
            self.C_ = self.C if self.C != "auto" else self._choose_c(features, labels)
            model = LogisticRegression(C=self.C_, max_iter=self.max_iter).fit(features, labels)
        self.n_iter_ = int(np.max(model.n_iter_))
        self.converged_ = self.n_iter_ < self.max_iter
        if not self.converged_:
            warnings.warn(f"stacking: logistic regression (lbfgs) did not converge in {self.max_iter} iterations; "
                          "raise max_iter or lower C", ConvergenceWarning, stacklevel=2)
        coef, intercept = model.coef_, model.intercept_
        if len(model.classes_) == 2:  # sklearn fits one logit for two classes: log-odds of the second
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
        # Classes absent from the fitted labels get a probability of about e^-50 of the rest.
        self.coef_ = np.zeros((c, m * c))
        self.intercept_ = np.full(c, float(intercept.min()) - 50.0)
        self.coef_[model.classes_] = coef
        self.intercept_[model.classes_] = intercept
        mass = np.abs(self.coef_).reshape(c, m, c).sum(axis=(0, 2))
        self.weights_ = mass / mass.sum() if mass.sum() > 0 else np.full(m, 1.0 / m)
        self.loss_ = float(-np.mean(np.clip(self.predict_log_proba(log_probs)[np.arange(n), labels], _LOG_EPS, 0.0)))
        self.score_ = self.loss_
        return self

    def _choose_c(self, features: np.ndarray, labels: np.ndarray) -> float:
        """The strength from ``AUTO_CS`` with the best inner 3-fold log loss (1.0 when a class is too rare to split)."""
        from sklearn.linear_model import LogisticRegressionCV

        if np.bincount(labels)[np.unique(labels)].min() < 3:
            return 1.0
        options = dict(Cs=list(self.AUTO_CS), cv=3, scoring="neg_log_loss", max_iter=self.max_iter, refit=False)
        accepted = inspect.signature(LogisticRegressionCV).parameters
        # scikit-learn >= 1.8 wants these said explicitly (pure L2, new attributes); older ones lack them.
        options.update({k: v for k, v in (("l1_ratios", (0.0,)), ("use_legacy_attributes", False)) if k in accepted})
        search = LogisticRegressionCV(**options)
        search.fit(features, labels)
        chosen = float(np.ravel(search.C_)[0])  # sklearn hands it back with rounding noise
        return min(self.AUTO_CS, key=lambda c: abs(math.log(c) - math.log(chosen)))

    def predict_log_proba(self, log_probs: np.ndarray) -> np.ndarray:
        self._check_fitted()
        log_probs = np.asarray(log_probs)
        if log_probs.ndim != 3 or log_probs.shape[0] * log_probs.shape[2] != self.coef_.shape[1]:
            raise ValueError(f"log_probs: expected [M, N, C] with M*C = {self.coef_.shape[1]}, got shape {log_probs.shape}")
        return log_softmax(self.features(log_probs) @ self.coef_.T + self.intercept_)

    @classmethod
    def from_params(cls, coef, intercept, clip: float) -> "StackingCombiner":
        """A fitted combiner from stored coefficients (the ensemble file's, no pickle)."""
        out = cls(clip=clip)
        out.C_ = None
        out.coef_ = np.asarray(coef, dtype=np.float64)
        out.intercept_ = np.asarray(intercept, dtype=np.float64)
        c = len(out.intercept_)
        if out.coef_.ndim != 2 or out.coef_.shape[0] != c or out.coef_.shape[1] % c:
            raise ValueError(f"coef: expected shape [C, M*C] with C = {c}, got {out.coef_.shape}")
        m = out.coef_.shape[1] // c
        mass = np.abs(out.coef_).reshape(c, m, c).sum(axis=(0, 2))
        out.weights_ = mass / mass.sum() if mass.sum() > 0 else np.full(m, 1.0 / m)
        return out


WEIGHT_SEARCHES: dict[str, type[_Search]] = {
    cls.name: cls for cls in (SlsqpWeights, GreedyWeights, RandomWeights, StackingCombiner)
}

# Options a user may set, per method (CLI option -> constructor argument).
METHOD_OPTIONS: dict[str, dict[str, str]] = {
    "slsqp": {},
    "greedy": {"iterations": "n_iter", "init": "n_init", "use_best": "use_best", "bags": "bags", "bag_fraction": "bag_fraction"},
    "random": {"iterations": "n_iter"},
    "stacking": {"C": "C"},
}


def get_weight_search(method: str) -> type[_Search]:
    if method not in WEIGHT_SEARCHES:
        raise UserInputError(f"method: expected one of {', '.join(WEIGHT_SEARCHES)}, got {method!r}")
    return WEIGHT_SEARCHES[method]


def search_kwargs(method: str, **options: Any) -> dict[str, Any]:
    """Constructor arguments of ``method`` from user options; ``None`` means "not given".

    An option given for a method that has no use for it is refused, not ignored.
    """
    get_weight_search(method)
    accepted = METHOD_OPTIONS[method]
    kwargs = {}
    for option, value in options.items():
        if value is None:
            continue
        if option not in accepted:
            users = [name for name, opts in METHOD_OPTIONS.items() if option in opts]
            raise UserInputError(f"{option}: applies to method {' or '.join(users) or 'none'}, not {method!r}; drop it or change the method")
        if option == "init" and isinstance(value, str) and value != "auto":
            try:
                value = int(value)
            except ValueError:
                raise UserInputError(f"init: expected 'auto' or a number of members, got {value!r}") from None
        kwargs[accepted[option]] = value
    return kwargs


def make_search(method: str, metric: str = "log_loss", combine: str = "arithmetic", seed: int = 0, **kwargs: Any) -> _Search:
    """A configured, unfitted weight search; ``kwargs`` are constructor arguments (see ``search_kwargs``)."""
    cls = get_weight_search(method)
    if "seed" in cls.__init__.__code__.co_varnames:
        kwargs.setdefault("seed", seed)
    search = cls(metric=metric, combine=combine, **kwargs)
    search._validate_params()
    return search
