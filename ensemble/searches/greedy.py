"""``greedy``: Caruana et al. (2004) ensemble selection with replacement, and its incremental
blend states (one per combine rule and metric kind)."""

from __future__ import annotations

import numpy as np

from ensemble.calibration import log_softmax
from ensemble.metrics import EPS
from ensemble.searches._base import _LOG_EPS, _Problem, _Search


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
