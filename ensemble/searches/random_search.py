"""``random``: Dirichlet samples on the simplex, best kept; the baseline the other searches must beat."""

from __future__ import annotations

import numpy as np

from ensemble.searches._base import _Problem, _Search


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
