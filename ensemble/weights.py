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

Each method lives in its own module under ``ensemble/searches/``; this module is the
registry over them and turns user options into constructor arguments.
"""

from __future__ import annotations

from typing import Any

from ensemble.searches._base import ZERO_WEIGHT, ConvergenceWarning, _Search, blas_threads
from ensemble.searches.greedy import GreedyWeights
from ensemble.searches.random_search import RandomWeights
from ensemble.searches.slsqp import SlsqpWeights
from ensemble.searches.stacking import StackingCombiner
from zoo.errors import UserInputError


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


__all__ = ["WEIGHT_SEARCHES", "METHOD_OPTIONS", "get_weight_search", "search_kwargs", "make_search", "ZERO_WEIGHT",
           "ConvergenceWarning", "blas_threads", "SlsqpWeights", "GreedyWeights", "RandomWeights", "StackingCombiner"]
