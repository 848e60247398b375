"""The probe's torch fit (finetune/probe.py ``LinearProbe``) against scikit-learn's LogisticRegressionCV, its reference."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from finetune.probe import DEFAULT_CS, LinearProbe, ProbeConvergenceWarning
from zoo.errors import UserInputError


def make_problem(n: int, d: int, priors, separation: float, seed: int, n_test: int = 2000):
    """Correlated, non-negative rows (ReLU of a low-rank mix) around class means ``separation`` apart."""
    rng = np.random.default_rng(seed)
    priors = np.asarray(priors, dtype=float) / np.sum(priors)
    mix = rng.normal(size=(d // 2, d)) / np.sqrt(d // 2)
    means = rng.normal(size=(len(priors), d // 2)) * separation

    def draw(m):
        y = rng.choice(len(priors), size=m, p=priors)
        x = np.maximum((means[y] + rng.normal(size=(m, d // 2))) @ mix + 0.1 * rng.normal(size=(m, d)) + 0.3, 0.0)
        return x, y

    return (*draw(n), *draw(n_test))


def sklearn_probe(x, y, groups, Cs=DEFAULT_CS, cv=5, seed=0):
    """The fit LinearProbe did before: LogisticRegressionCV on standardised rows over the same splits."""
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-12] = 1.0
    groups = np.arange(len(y)) if groups is None else groups
    folds = min(cv, min(len(np.unique(groups[y == c])) for c in np.unique(y)))  # as many as the rarest class allows
    if len(np.unique(groups)) == len(y):  # a row per group: LinearProbe's splits are plain stratified folds
        splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(y, y))
    else:
        splits = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(y, y, groups))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegressionCV(Cs=list(Cs), cv=splits, scoring="neg_log_loss", l1_ratios=(0.0,), max_iter=2000,
                                     use_legacy_attributes=False).fit((x - mean) / scale, y)
    return model, mean, scale, splits


def sklearn_proba(model, mean, scale, x, num_classes):
    p = np.zeros((len(x), num_classes))
    p[:, model.classes_] = model.predict_proba((x - mean) / scale)
    return p


PROBLEMS = {  # name: (rows, features, class priors, separation)
    "separable": (400, 40, (1, 1, 1), 3.0),
    "noisy": (600, 60, (1, 1, 1, 1), 0.35),
    "rare class": (500, 40, (30, 30, 1), 0.6),
}


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_agrees_with_logistic_regression_cv(name):
    n, d, priors, separation = PROBLEMS[name]
    x, y, test_x, test_y = make_problem(n, d, priors, separation, seed=1)
    k = len(priors)
    assert name != "rare class" or np.bincount(y).min() <= 15
    probe = LinearProbe().fit(x, y, k)
    model, mean, scale, _ = sklearn_probe(x, y, None)
    reference_C = float(np.ravel(model.C_)[0])
    grid = list(DEFAULT_CS)
    assert abs(grid.index(probe.C_) - grid.index(reference_C)) <= 1, (probe.C_, reference_C)
    ours, theirs = probe.predict_proba(test_x), sklearn_proba(model, mean, scale, test_x, k)
    assert log_loss(test_y, ours, labels=range(k)) == pytest.approx(log_loss(test_y, theirs, labels=range(k)), abs=1e-3)
    # The refit: at least as close to the exact solution at its C (scikit-learn, tol 1e-10) as scikit-learn's own refit
    # at tol 1e-4 is (on separable rows neither is close: the optimum is far out along a flat valley).
    exact = LogisticRegression(C=probe.C_, tol=1e-10, max_iter=10000).fit((x - mean) / scale, y)
    exact_p = sklearn_proba(exact, mean, scale, test_x, k)
    reference_error = np.abs(theirs - exact_p).max() if probe.C_ == reference_C else 0.0
    assert np.abs(ours - exact_p).max() <= max(1e-3, reference_error)
    if probe.C_ == reference_C:  # the same inner-CV score for the same C
        assert probe.cv_log_loss_ == pytest.approx(-np.asarray(model.scores_).mean(0).max(), abs=1e-3)


def test_two_classes_match_the_binomial_fit():
    x, y, test_x, test_y = make_problem(400, 30, (1, 1), 0.5, seed=2)
    probe = LinearProbe().fit(x, y, 2)
    model, mean, scale, _ = sklearn_probe(x, y, None)
    assert probe.standardised_coef_.shape == (1, 30)  # one logit, as scikit-learn's binomial
    assert np.all(probe.coef_[0] == 0) and probe.intercept_[0] == 0  # the head's rows [0, w]
    assert probe.C_ == float(np.ravel(model.C_)[0])
    assert probe.cv_log_loss_ == pytest.approx(-np.asarray(model.scores_).mean(0).max(), abs=1e-4)
    np.testing.assert_allclose(probe.predict_proba(test_x), sklearn_proba(model, mean, scale, test_x, 2), atol=5e-3)
    # scikit-learn's C means the same here: one logit and its penalty, not two.
    exact = LogisticRegression(C=probe.C_, tol=1e-10, max_iter=10000).fit((x - mean) / scale, y)
    np.testing.assert_allclose(probe.standardised_coef_, exact.coef_, atol=1e-3 * np.abs(exact.coef_).max())
    np.testing.assert_allclose(probe.standardised_intercept_, exact.intercept_, atol=1e-3)


def test_a_class_absent_from_an_inner_fold_scores_like_scikit_learn():
    # Class 2 lives in 3 large groups mixed with class 0: 3 folds are possible, yet two of its groups share one.
    x, y, _, _ = make_problem(300, 20, (10, 10, 1), 0.8, seed=3)
    rng = np.random.default_rng(13)
    groups = np.arange(len(y)) + 100
    rare, common = np.flatnonzero(y == 2), np.flatnonzero(y == 0)[:100]
    groups[rare], groups[common] = rng.integers(0, 4, len(rare)), rng.integers(0, 4, len(common))
    model, _, _, splits = sklearn_probe(x, y, groups, cv=3)
    assert len(splits) == 3 and any(2 not in y[test] for _, test in splits)  # the case under test
    probe = LinearProbe(cv=3).fit(x, y, 3, groups=groups)
    assert probe.C_ == float(np.ravel(model.C_)[0])
    reference = -np.asarray(model.scores_).mean(0).ravel()
    strong = np.asarray(DEFAULT_CS) <= 1.0  # where the fit is not yet a flat valley that both solvers stop early in
    np.testing.assert_allclose(probe.cv_log_losses_[strong], reference[strong], atol=1e-3)


def test_too_rare_a_class_fits_at_C_1_without_cv():
    x, y, test_x, _ = make_problem(200, 10, (1, 1), 0.5, seed=4)
    y[:1] = 2  # one row of class 2: no 2 folds possible
    probe = LinearProbe().fit(x, y, 3)
    assert probe.C_ == 1.0 and np.isnan(probe.cv_log_loss_)
    mean, scale = x.mean(0), x.std(0)
    exact = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit((x - mean) / scale, y)
    np.testing.assert_allclose(probe.predict_proba(test_x), sklearn_proba(exact, mean, scale, test_x, 3), atol=2e-3)


def test_a_refit_tighter_than_float32_finishes_in_float64():
    x, y, test_x, _ = make_problem(300, 20, (1, 1), 0.5, seed=4)
    y[:1] = 2  # no CV: the refit alone, asked for 1e-8 (the CPU's float32 matmuls stop near 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbeConvergenceWarning)
        probe = LinearProbe(tol=1e-7).fit(x, y, 3)
    mean, scale = x.mean(0), x.std(0)
    exact = LogisticRegression(C=1.0, tol=1e-12, max_iter=10000).fit((x - mean) / scale, y)
    np.testing.assert_allclose(probe.predict_proba(test_x), sklearn_proba(exact, mean, scale, test_x, 3), atol=1e-5)


def test_same_seed_same_coefficients_bit_for_bit():
    x, y, _, _ = make_problem(300, 20, (1, 1, 1), 0.5, seed=5)
    first, second = LinearProbe(seed=3).fit(x, y, 3), LinearProbe(seed=3, device="cpu").fit(x, y, 3)
    assert np.array_equal(first.coef_, second.coef_) and np.array_equal(first.intercept_, second.intercept_)
    other = LinearProbe(seed=4, device=torch.device("cpu")).fit(x, y, 3)  # other folds: another path
    assert not np.array_equal(first.cv_log_losses_, other.cv_log_losses_)


def test_warm_start_reaches_the_cold_solution():
    x, y, test_x, _ = make_problem(900, 40, (1, 1, 1), 0.4, seed=6)
    previous = LinearProbe().fit(x[:600], y[:600], 3)  # like the previous outer fold: most rows shared
    cold = LinearProbe().fit(x[300:], y[300:], 3)
    warm = LinearProbe().fit(x[300:], y[300:], 3, warm_start=previous)
    assert warm.C_ == cold.C_
    np.testing.assert_allclose(warm.cv_log_losses_, cold.cv_log_losses_, atol=1e-3)
    np.testing.assert_allclose(warm.predict_proba(test_x), cold.predict_proba(test_x), atol=1e-3)
    # A warm start that is this fit's solution already (its raw coefficients re-expressed on these rows'
    # standardisation): the refit starts there and has nothing left to do.
    again = LinearProbe().fit(x[300:], y[300:], 3, warm_start=cold)
    assert again.n_iter_ <= 1 < cold.n_iter_
    np.testing.assert_allclose(again.predict_proba(test_x), cold.predict_proba(test_x), atol=1e-3)


def test_warm_start_from_a_probe_on_other_classes():
    x, y, test_x, _ = make_problem(600, 20, (1, 1, 1), 0.6, seed=7)
    two = LinearProbe().fit(x[y < 2], y[y < 2], 3)  # never saw class 2
    cold = LinearProbe().fit(x, y, 3)
    warm = LinearProbe().fit(x, y, 3, warm_start=two)
    assert warm.C_ == cold.C_
    np.testing.assert_allclose(warm.predict_proba(test_x), cold.predict_proba(test_x), atol=1e-3)


def test_a_stopped_fit_warns():
    x, y, _, _ = make_problem(300, 20, (1, 1, 1), 0.5, seed=8)
    with pytest.warns(ProbeConvergenceWarning) as caught:
        LinearProbe(max_iter=2).fit(x, y, 3)
    messages = [str(w.message) for w in caught]
    assert any("at the chosen C=" in m and "CV log loss is approximate" in m for m in messages), messages
    assert any("the refit at C=" in m and "coefficients are approximate" in m for m in messages), messages


@pytest.mark.parametrize("options, message", [
    (dict(Cs=()), "Cs: expected a non-empty sequence"),
    (dict(Cs=(1.0, -1.0)), "Cs: expected a non-empty sequence"),
    (dict(cv=1), "cv: expected an integer of at least 2"),
    (dict(max_iter=0), "max_iter: expected an integer of at least 1"),
    (dict(tol=0.0), "tol: expected a positive number"),
])
def test_bad_options(options, message):
    x, y, _, _ = make_problem(50, 4, (1, 1), 1.0, seed=9, n_test=0)
    with pytest.raises(ValueError, match=message):
        LinearProbe(**options).fit(x, y, 2)


def test_bad_inputs():
    x, y, _, _ = make_problem(50, 4, (1, 1), 1.0, seed=9, n_test=0)
    with pytest.raises(ValueError, match="features: expected"):
        LinearProbe().fit(x[:, 0], y, 2)
    with pytest.raises(ValueError, match="groups: expected one group per row"):
        LinearProbe().fit(x, y, 2, groups=np.arange(3))
    with pytest.raises(ValueError, match="labels: expected classes 0..1"):
        LinearProbe().fit(x, y + 1, 2)
    with pytest.raises(UserInputError, match="at least 2 classes"):
        LinearProbe().fit(x, np.zeros_like(y), 2)
    with pytest.raises(ValueError, match="warm_start: expected a probe of 3 classes on 4 features"):
        LinearProbe().fit(x, y, 3, warm_start=LinearProbe().fit(x, y, 2))
