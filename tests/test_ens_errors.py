"""Argument errors not covered beside their features: each names the argument, what was expected and what came."""

import numpy as np
import pytest

from ensemble.combine import combine
from ensemble.diversity import kuncheva_whitaker_kappa
from ensemble.model import Ensemble, Member
from ensemble.weights import StackingCombiner
from zoo.errors import UserInputError

LP = np.log(np.full((2, 3, 4), 0.25))


@pytest.mark.parametrize("log_probs, weights, rule, match", [
    (LP[0], [1.0], "arithmetic", r"log_probs: expected stacked member log-probabilities \[M, N, C\], got shape \(3, 4\)"),
    (LP, [1.0], "arithmetic", r"weights: expected one weight per member, shape \(2,\), got \(1,\)"),
    (LP, [1.0, -0.5], "geometric", r"weights: expected finite non-negative weights with a positive sum, got \[1.0, -0.5\]"),
    (LP, [0.0, 0.0], "arithmetic", r"weights: expected finite non-negative weights with a positive sum, got \[0.0, 0.0\]"),
    (LP, [1.0, np.nan], "arithmetic", r"weights: expected finite non-negative weights"),
    (LP, [0.5, 0.5], "harmonic", r"combine: expected one of arithmetic, geometric, got 'harmonic'"),
])
def test_combine_errors(log_probs, weights, rule, match):
    with pytest.raises(ValueError, match=match):
        combine(log_probs, weights, rule)


def test_unknown_combine_rule_is_a_user_error():
    with pytest.raises(UserInputError):
        combine(LP, [0.5, 0.5], "harmonic")


@pytest.mark.parametrize("coef, intercept, match", [
    (np.zeros((3, 8)), np.zeros(4), r"coef: expected shape \[C, M\*C\] with C = 4, got \(3, 8\)"),
    (np.zeros((4, 7)), np.zeros(4), r"coef: expected shape \[C, M\*C\] with C = 4, got \(4, 7\)"),
])
def test_stacking_from_params_errors(coef, intercept, match):
    with pytest.raises(ValueError, match=match):
        StackingCombiner.from_params(coef, intercept, clip=-10.0)


def test_stacking_predict_and_fit_errors():
    fitted = StackingCombiner.from_params(np.zeros((4, 8)), np.zeros(4), clip=-10.0)
    with pytest.raises(ValueError, match=r"log_probs: expected \[M, N, C\] with M\*C = 8, got shape \(3, 3, 4\)"):
        fitted.predict_log_proba(np.zeros((3, 3, 4)))
    with pytest.raises(UserInputError, match=r"labels: stacking needs at least 2 classes among the validation labels, got only class 1"):
        StackingCombiner().fit(LP, np.array([1, 1, 1]))


@pytest.mark.parametrize("log_probs, match", [
    ([np.zeros((3, 2))], r"log_probs: expected one array per member \(2\), got 1"),
    ([np.zeros((3, 2)), np.zeros((4, 2))], r"log_probs: expected \[N, 2\] arrays of one shape, got shapes \[\(3, 2\), \(4, 2\)\]"),
    ([np.zeros((3, 5)), np.zeros((3, 5))], r"log_probs: expected \[N, 2\] arrays of one shape, got shapes \[\(3, 5\)\]"),
])
def test_ensemble_predict_errors(log_probs, match):
    ens = Ensemble(classes=["a", "b"], members=[Member("x", "", 0.5), Member("y", "", 0.5)])
    with pytest.raises(ValueError, match=match):
        ens.predict_log_proba(log_probs)


def test_kappa_error():
    with pytest.raises(ValueError, match=r"correct: expected a 2-D array \[members, samples\], got shape \(3,\)"):
        kuncheva_whitaker_kappa(np.ones(3, dtype=bool))
