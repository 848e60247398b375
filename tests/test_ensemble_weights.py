import itertools

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from ensemble.calibration import log_softmax
from ensemble.combine import combine
from ensemble.metrics import METRICS, log_loss
from ensemble.synthetic import sample_labels, synthetic_members
from ensemble.weights import (WEIGHT_SEARCHES, GreedyWeights, RandomWeights, SlsqpWeights, StackingCombiner,
                              make_search, search_kwargs)
from zoo.errors import UserInputError


def _stack(members):
    return np.stack([m.log_probabilities().astype(np.float32) for m in members]), members[0].labels


def _two_halves(n=400, frac=0.75):
    """Member A gives the true class 0.9 on the first ``frac`` of the rows and 0.1 on the rest; B the reverse.
    The arithmetic log-loss optimum is w_A = (0.9 frac - 0.1 (1 - frac)) / 0.8."""
    n1 = int(n * frac)
    y = np.zeros(n, dtype=np.int64)
    a = np.where(np.arange(n) < n1, 0.9, 0.1)
    pa = np.stack([a, 1 - a], axis=1)
    pb = np.stack([1 - a, a], axis=1)
    return np.log(np.stack([pa, pb])).astype(np.float32), y, (0.9 * frac - 0.1 * (1 - frac)) / 0.8


@pytest.mark.parametrize("frac", [0.5, 0.75, 0.9])
def test_slsqp_finds_the_closed_form_optimum(frac):
    log_probs, y, w_a = _two_halves(frac=frac)
    fit = SlsqpWeights().fit(log_probs, y)
    assert fit.weights_[0] == pytest.approx(w_a, abs=1e-4)
    assert fit.gap_ < 1e-6


def test_truth_plus_noise_gets_the_weight_and_pure_noise_gets_none():
    rng = np.random.default_rng(0)
    truth = rng.normal(0, 2.0, (3000, 4)).astype(np.float32)
    y = sample_labels(truth, seed=1)  # the "truth" member is the labels' own distribution
    noisy_truth = truth + rng.normal(0, 0.3, truth.shape).astype(np.float32)
    noise = rng.normal(0, 2.0, truth.shape).astype(np.float32)
    log_probs = np.stack([log_softmax(noisy_truth), log_softmax(noise)])
    for combine_rule in ("arithmetic", "geometric"):
        w = SlsqpWeights(combine=combine_rule).fit(log_probs, y).weights_
        assert w[0] > 0.97, (combine_rule, w)


@pytest.mark.parametrize("rule", ["arithmetic", "geometric"])
def test_slsqp_matches_a_one_dimensional_reference(rule):
    log_probs, y = _stack(synthetic_members(2, 500, 4, signal=[1.0, 2.0], shared=0.5, seed=3))
    ref = minimize_scalar(lambda a: log_loss(np.exp(combine(log_probs, [a, 1 - a], rule)), y),
                          bounds=(0, 1), method="bounded", options={"xatol": 1e-9})
    fit = SlsqpWeights(combine=rule).fit(log_probs, y)
    assert fit.weights_[0] == pytest.approx(ref.x, abs=1e-3)
    assert fit.loss_ <= ref.fun + 1e-9


@pytest.mark.parametrize("rule", ["arithmetic", "geometric"])
def test_slsqp_never_worse_than_random_or_greedy_in_sample(rule):
    for seed in range(3):
        log_probs, y = _stack(synthetic_members(6, 400, 5, signal=np.linspace(0.5, 2.5, 6), shared=0.4,
                                                scale=np.linspace(0.5, 2.0, 6), seed=seed))
        slsqp = SlsqpWeights(combine=rule).fit(log_probs, y)
        others = [RandomWeights(combine=rule, n_iter=300, seed=seed).fit(log_probs, y),
                  GreedyWeights(combine=rule, n_iter=40).fit(log_probs, y),
                  GreedyWeights(combine=rule, n_iter=40, bags=5).fit(log_probs, y)]
        for other in others:
            assert slsqp.loss_ <= other.loss_ + 1e-9, (type(other).__name__, slsqp.loss_, other.loss_)
        # and the reported loss is the log loss of the blend it returns
        assert slsqp.loss_ == pytest.approx(log_loss(np.exp(slsqp.predict_log_proba(log_probs)), y), rel=1e-6)


def test_slsqp_grid_check_on_three_members():
    log_probs, y = _stack(synthetic_members(3, 600, 3, signal=[1.0, 1.5, 2.0], shared=[0.2, 0.5, 0.8], seed=7))
    fit = SlsqpWeights().fit(log_probs, y)
    grid = [(a / 40, b / 40, 1 - (a + b) / 40) for a, b in itertools.product(range(41), repeat=2) if a + b <= 40]
    best = min(log_loss(np.exp(combine(log_probs, np.array(w) + 1e-12, "arithmetic")), y) for w in grid)
    assert fit.loss_ <= best + 1e-9


@pytest.mark.parametrize("method", ["slsqp", "greedy", "random"])
def test_fit_from_true_class_probabilities_equals_fit_on_the_stack(method):
    # Arithmetic rule, log loss: the [N, M] true-class probabilities are all the objective sees.
    log_probs, y = _stack(synthetic_members(5, 500, 6, signal=np.linspace(0.5, 2.5, 5), shared=0.4, seed=4))
    q = np.exp(log_probs[:, np.arange(len(y)), y].astype(np.float64)).T
    kwargs = {"n_iter": 30} if method != "slsqp" else {}
    full = make_search(method, **kwargs).fit(log_probs, y)
    fast = make_search(method, **kwargs).fit_true_probs(q)
    np.testing.assert_allclose(fast.weights_, full.weights_, atol=1e-6)
    assert fast.loss_ == pytest.approx(full.loss_, rel=1e-9)


def test_true_class_fit_is_refused_where_other_classes_matter():
    q = np.full((4, 2), 0.5)
    with pytest.raises(ValueError, match=r"only the arithmetic rule under log loss .* got combine 'geometric'"):
        SlsqpWeights(combine="geometric").fit_true_probs(q)
    with pytest.raises(ValueError, match=r"true_probs: expected probabilities in \[0, 1\] of shape \[N, M\], got shape \(4,\)"):
        SlsqpWeights().fit_true_probs(np.full(4, 0.5))


def test_slsqp_gives_a_member_without_information_no_weight_at_t1():
    from ensemble.fit import calibrated, fit_temperatures

    # Two good members and one whose logits are independent of the labels, calibrated
    # first: at T = 1 a near-uniform member only dilutes the blend.
    log_probs, y = _stack(synthetic_members(3, 4000, 10, signal=[2.0, 2.0, 0.0], seed=0))
    cal = calibrated(log_probs, fit_temperatures(log_probs, y))
    fit = SlsqpWeights().fit(cal, y)
    assert fit.weights_[2] <= 1e-6
    assert fit.weights_[:2].min() > 0.3


def test_greedy_recovers_the_closed_form_weights_to_its_granularity():
    log_probs, y, w_a = _two_halves(frac=0.75)
    fit = GreedyWeights(n_iter=200, n_init=1).fit(log_probs, y)
    assert fit.weights_[0] == pytest.approx(w_a, abs=0.01)


@pytest.mark.parametrize("metric", ["log_loss", "accuracy", "f1_macro"])
@pytest.mark.parametrize("rule", ["arithmetic", "geometric"])
def test_greedy_use_best_returns_its_best_prefix(metric, rule):
    log_probs, y = _stack(synthetic_members(6, 300, 4, signal=np.linspace(0.3, 1.5, 6), shared=0.5, seed=11))
    fit = GreedyWeights(metric=metric, combine=rule, n_iter=30).fit(log_probs, y)
    # The trajectory is the metric after the initialisation and after each step...
    assert len(fit.trajectory_) == 31
    # ... and the returned weights score exactly its best prefix, never worse.
    assert fit.loss_ <= fit.trajectory_.min() + 1e-9
    assert fit.loss_ == pytest.approx(fit.trajectory_[fit.best_step_], abs=1e-9)
    assert fit.best_step_ == int(np.argmin(fit.trajectory_))
    last = GreedyWeights(metric=metric, combine=rule, n_iter=30, use_best=False).fit(log_probs, y)
    assert last.loss_ == pytest.approx(last.trajectory_[-1], abs=1e-9)
    assert fit.loss_ <= last.loss_ + 1e-12


def _reference_greedy(probs, y, metric, n_iter, n_init):
    """Caruana's selection the plain way, for comparison: full blends, one candidate at a time."""
    m = len(probs)
    singles = [metric.loss(metric.fn(p, y)) for p in probs]
    order = np.argsort(singles, kind="stable")
    counts = np.zeros(m)
    counts[order[:n_init]] = 1
    for _ in range(n_iter):
        trial = [counts + np.eye(m)[j] for j in range(m)]
        scores = [metric.loss(metric.fn(np.tensordot(c / c.sum(), probs, axes=1), y)) for c in trial]
        counts[int(np.argmin(scores))] += 1
    return counts


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy", "log_loss"])
def test_greedy_fast_paths_match_the_plain_implementation(metric):
    log_probs, y = _stack(synthetic_members(5, 400, 6, signal=np.linspace(0.5, 1.5, 5), shared=0.4, seed=4))
    fit = GreedyWeights(metric=metric, n_iter=15, n_init=2, use_best=False).fit(log_probs, y)
    counts = _reference_greedy(np.exp(log_probs.astype(np.float64)), y, METRICS[metric], 15, 2)
    np.testing.assert_allclose(fit.weights_, counts / counts.sum(), atol=1e-12)


def test_greedy_sorted_init_auto_and_bagging():
    log_probs, y = _stack(synthetic_members(8, 300, 4, signal=np.linspace(0.3, 2.0, 8), shared=0.3, seed=5))
    fit = GreedyWeights(n_iter=0).fit(log_probs, y)
    single = [log_loss(np.exp(lp), y) for lp in log_probs]
    top = np.argsort(single)[: fit.n_init_]
    assert set(np.flatnonzero(fit.weights_)) == set(top)  # the N best, equal weights
    bagged = GreedyWeights(n_iter=20, bags=6, bag_fraction=0.5, seed=1).fit(log_probs, y)
    assert bagged.bag_weights_.shape == (6, 8)
    np.testing.assert_allclose(bagged.weights_, bagged.bag_weights_.mean(axis=0))
    for w in bagged.bag_weights_:  # each bag used only half of the members
        assert np.count_nonzero(w) <= 4
    again = GreedyWeights(n_iter=20, bags=6, bag_fraction=0.5, seed=1).fit(log_probs, y)
    np.testing.assert_array_equal(again.weights_, bagged.weights_)


def test_greedy_and_random_never_below_the_best_single_member_on_accuracy():
    log_probs, y = _stack(synthetic_members(6, 300, 5, signal=np.linspace(0.3, 1.5, 6), shared=0.5, seed=9))
    best = max(METRICS["accuracy"].fn(np.exp(lp), y) for lp in log_probs)
    assert GreedyWeights(metric="accuracy", n_iter=20).fit(log_probs, y).score_ >= best
    assert RandomWeights(metric="accuracy", n_iter=50).fit(log_probs, y).score_ >= best


def test_stacking_undoes_a_permuted_member_that_averaging_cannot():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 600)
    good = np.eye(4)[(y + 1) % 4] * 3.0 + rng.normal(0, 1.0, (600, 4))  # right, but names the next class
    noise = rng.normal(0, 1.0, (600, 4))
    log_probs = np.stack([log_softmax(good), log_softmax(noise)]).astype(np.float32)
    stacking = StackingCombiner().fit(log_probs, y)
    slsqp = SlsqpWeights().fit(log_probs, y)
    assert stacking.loss_ < 0.5 * slsqp.loss_
    assert stacking.weights_[0] > stacking.weights_[1]
    restored = StackingCombiner.from_params(stacking.coef_.tolist(), stacking.intercept_.tolist(), stacking.clip)
    np.testing.assert_allclose(restored.predict_log_proba(log_probs), stacking.predict_log_proba(log_probs))


def test_stacking_two_classes_and_a_class_missing_from_the_fit():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    lp = np.stack([log_softmax(np.eye(3)[y] * 2 + rng.normal(0, 1, (200, 3)))]).astype(np.float32)
    fit = StackingCombiner().fit(lp, y)  # class 2 never appears
    out = np.exp(fit.predict_log_proba(lp))
    assert out.shape == (200, 3)
    assert out[:, 2].max() < 1e-10
    assert (out.argmax(1) == y).mean() > 0.8


def test_registry_and_options():
    # Every registered method answers to its own name and fits (the CLI's --method choices come from the registry).
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    lp = np.log(np.stack([np.full((40, 3), 0.2) + 0.4 * np.eye(3)[y] for _ in range(2)])).astype(np.float32)
    for name, cls in WEIGHT_SEARCHES.items():
        assert cls.name == name
        assert make_search(name).fit(lp, y).predict_log_proba(lp).shape == (40, 3)
    assert search_kwargs("greedy", iterations=10, init="3", bags=None, use_best=False) == {"n_iter": 10, "n_init": 3, "use_best": False}
    assert search_kwargs("greedy", init="auto") == {"n_init": "auto"}
    assert isinstance(make_search("random", seed=4), RandomWeights) and make_search("random", seed=4).seed == 4


@pytest.mark.parametrize("method, options, match", [
    ("slsqp", {"bags": 3}, r"bags: applies to method greedy, not 'slsqp'"),
    ("random", {"C": 2.0}, r"C: applies to method stacking, not 'random'"),
    ("greedy", {"init": "many"}, r"init: expected 'auto' or a number of members, got 'many'"),
    ("nelder", {}, r"method: expected one of slsqp, greedy, random, stacking, got 'nelder'"),
])
def test_search_kwargs_errors(method, options, match):
    with pytest.raises(UserInputError, match=match):
        search_kwargs(method, **options)


@pytest.mark.parametrize("method, kwargs, match", [
    ("slsqp", {"metric": "accuracy"}, r"metric: expected one of log_loss for method 'slsqp', got 'accuracy'; .*use greedy or random"),
    ("stacking", {"metric": "f1_macro"}, r"metric: expected one of log_loss for method 'stacking', got 'f1_macro'"),
    ("greedy", {"metric": "ece"}, r"metric: expected one of log_loss, accuracy, balanced_accuracy, f1_macro for method 'greedy', got 'ece'"),
    ("greedy", {"combine": "median"}, r"combine: expected one of arithmetic, geometric, got 'median'"),
    ("greedy", {"n_iter": -1}, r"n_iter: expected an integer >= 0 \(selection steps\), got -1"),
    ("greedy", {"n_init": 0}, r"n_init: expected 'auto' or an integer >= 1, got 0"),
    ("greedy", {"bags": 1.5}, r"bags: expected an integer >= 0 \(0 = no bagging\), got 1.5"),
    ("greedy", {"bag_fraction": 0.0}, r"bag_fraction: expected a fraction in \(0, 1\], got 0.0"),
    ("random", {"alpha": 0}, r"alpha: expected a positive Dirichlet concentration, got 0"),
    ("random", {"n_iter": "10"}, r"n_iter: expected an integer >= 0 \(random samples\), got '10'"),
    ("slsqp", {"tol": 0}, r"tol: expected a positive tolerance, got 0"),
    ("slsqp", {"max_iter": 0}, r"max_iter: expected an integer >= 1, got 0"),
    ("stacking", {"C": -1}, r"C: expected 'auto' or a positive inverse regularisation strength, got -1"),
    ("stacking", {"C": "best"}, r"C: expected 'auto' or a positive inverse regularisation strength, got 'best'"),
    ("stacking", {"clip": 0.5}, r"clip: expected a negative log-probability floor, got 0.5"),
])
def test_bad_parameters(method, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_search(method, **kwargs)


@pytest.mark.parametrize("log_probs, labels, match", [
    (np.zeros((2, 3)), np.zeros(2, int), r"log_probs: expected stacked member log-probabilities \[M, N, C\] with no empty axis, got shape \(2, 3\)"),
    (np.zeros((2, 3, 2), dtype=int), np.zeros(3, int), r"log_probs: expected a float array, got dtype int"),
    (np.zeros((2, 3, 2)), np.zeros(4, int), r"labels: expected shape \(3,\) to match log_probs \(2, 3, 2\), got \(4,\)"),
    (np.zeros((2, 3, 2)), np.array([0, -1, 1]), r"labels: expected known class indices 0..1 on every row, got -1 at row 1"),
])
def test_bad_inputs(log_probs, labels, match):
    with pytest.raises(ValueError, match=match):
        SlsqpWeights().fit(log_probs, labels)


def test_predict_before_fit():
    with pytest.raises(RuntimeError, match="GreedyWeights is not fitted"):
        GreedyWeights().predict_log_proba(np.zeros((1, 2, 2)))


def test_stacking_auto_strength_is_chosen_by_inner_cross_validation():
    members = synthetic_members(6, 600, 5, signal=np.linspace(1.5, 3.0, 6), shared=np.linspace(0.3, 0.7, 6),
                                scale=np.linspace(0.7, 2.0, 6), seed=1)
    log_probs, y = _stack(members)
    auto = StackingCombiner().fit(log_probs, y)
    assert auto.C_ in StackingCombiner.AUTO_CS
    fixed = StackingCombiner(C=10.0).fit(log_probs, y)
    assert fixed.C_ == 10.0
    assert auto.C_ < 1.0  # 30 features x 5 classes on 600 rows: the inner folds ask for regularisation
    assert auto.loss_ > fixed.loss_  # which costs in-sample log loss (and is what the held-out folds reward)


def _numeric_gradient(objective, point, step=1e-5):
    return np.array([(objective(point + step * e)[0] - objective(point - step * e)[0]) / (2 * step) for e in np.eye(len(point))])


def test_analytic_gradients_match_finite_differences():
    from ensemble.searches._base import _Problem

    log_probs, y = _stack(synthetic_members(4, 300, 5, signal=[1, 2, 3, 1.5], shared=0.4, scale=[0.5, 1, 3, 2], seed=1))
    problem = _Problem(log_probs, y, "log_loss", "arithmetic")
    arithmetic = SlsqpWeights()._objective(problem)
    point = np.linspace(1, 2, 4) / np.linspace(1, 2, 4).sum()
    np.testing.assert_allclose(arithmetic(point)[1], _numeric_gradient(arithmetic, point), rtol=1e-4, atol=1e-6)
    # unnormalised weights of the geometric blend
    geometric = lambda v: problem._geometric_log_loss(v, gradient=True)  # noqa: E731
    point = np.linspace(0.2, 0.9, 4)
    np.testing.assert_allclose(geometric(point)[1], _numeric_gradient(geometric, point), rtol=1e-4, atol=1e-6)
