"""``slsqp``: log loss over the simplex, convex, solved with the analytic gradient."""

from __future__ import annotations

import warnings

import numpy as np

from ensemble.metrics import EPS
from ensemble.searches._base import ConvergenceWarning, _normalise, _Problem, _Search


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
