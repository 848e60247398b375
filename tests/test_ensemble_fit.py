import numpy as np
import pytest

import ensemble.fit as fit_module
from ensemble.fit import FittedFold, cv_folds, fit_ensemble
from ensemble.members import member_names
from ensemble.synthetic import synthetic_members
from zoo.errors import UserInputError
from zoo.predictions import Predictions


def _members(m=4, n=300, c=4, seed=0, **kw):
    kw.setdefault("signal", np.linspace(0.8, 2.0, m))
    kw.setdefault("shared", 0.4)
    return synthetic_members(m, n, c, seed=seed, **kw)


@pytest.mark.parametrize("method", ["slsqp", "greedy", "stacking"])
def test_cv_scores_come_from_fits_that_never_saw_the_scored_rows(monkeypatch, method):
    # Folds are row indices into one stack: spy on which rows each fit, each temperature
    # fit and each prediction touches.
    n = 200
    members = _members(n=n)
    everything = frozenset(range(n))

    def as_set(rows):
        return everything if rows is None else frozenset(np.asarray(rows).tolist())

    fitted_on, predicted, temperature_rows = {}, [], []
    real_fit_fold, real_predict, real_fit_t = fit_module.fit_fold, FittedFold.predict, fit_module.fit_temperature

    def spy_fit_fold(log_probs, labels, spec, rows=None):
        fitted = real_fit_fold(log_probs, labels, spec, rows)
        fitted_on[id(fitted)] = as_set(rows)
        return fitted

    def spy_predict(self, log_probs, labels, rows=None):
        predicted.append((fitted_on[id(self)], as_set(rows)))
        return real_predict(self, log_probs, labels, rows)

    def spy_fit_t(z, labels, rows=None, *args, **kwargs):
        if z.shape[0] == n:  # a member (a blend has the rows of its fit only)
            temperature_rows.append(as_set(rows))
        return real_fit_t(z, labels, rows, *args, **kwargs)

    monkeypatch.setattr(fit_module, "fit_fold", spy_fit_fold)
    monkeypatch.setattr(FittedFold, "predict", spy_predict)
    monkeypatch.setattr(fit_module, "fit_temperature", spy_fit_t)
    ens = fit_ensemble(members, method=method, cv=4)

    in_sample = [(f, p) for f, p in predicted if f == everything]
    held_out = [(f, p) for f, p in predicted if f != everything]
    assert len(in_sample) == 1 and len(held_out) == 4
    for fit_rows, scored_rows in held_out:
        assert not fit_rows & scored_rows  # no scored row was seen by the fit that scored it
        assert fit_rows | scored_rows == everything
    assert sorted(i for _, p in held_out for i in p) == list(range(n))  # each row scored exactly once
    # Member temperatures were fitted inside the folds too: on 150 rows (3 of 4 folds) there,
    # never on all 200. (Final temperatures see a blend of exactly those rows.)
    member_fits = temperature_rows
    assert {len(r) for r in member_fits} == {200, 150}
    test_folds = [p for _, p in held_out]
    assert all(sum(1 for t in test_folds if not r & t) == 1 for r in member_fits if len(r) == 150)
    assert ens.scores["cv"]["folds"] == 4


def test_cv_reveals_overfitting_that_in_sample_scores_hide():
    # Ten members of pure noise: any weights that look good in-sample are luck.
    rng = np.random.default_rng(0)
    n, c = 90, 3
    y = rng.integers(0, c, n)
    members = [Predictions(logits=rng.normal(0, 1.5, (n, c)), labels=y, ids=[f"s{i}" for i in range(n)],
                           classes=["a", "b", "c"], run=f"noise_{j}") for j in range(10)]
    ens = fit_ensemble(members, method="greedy", metric="accuracy", calibrate=False, cv=5)
    in_sample = ens.scores["in_sample"]["ensemble"]["accuracy"]
    held_out = ens.scores["cv"]["ensemble"]["accuracy"]
    assert in_sample > 0.5  # chance is 1/3: greedy found a lucky blend
    assert held_out < in_sample - 0.1  # and the held-out folds see through it
    assert any("worse than equal weights" in w and "over-fit" in w for w in ens.warnings), ens.warnings


def test_cv_folds_are_a_stratified_partition():
    y = np.array([0] * 50 + [1] * 30 + [2] * 7)
    folds = cv_folds(y, 5, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(y)))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    for c, count in ((0, 50), (1, 30), (2, 7)):
        per_fold = [int((y[f] == c).sum()) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == count
    again = cv_folds(y, 5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again))


def test_fit_report_shape_and_zero_weight_members_dropped():
    members = _members(m=5, n=400, signal=[0.2, 2.0, 2.2, 0.1, 1.8])
    ens = fit_ensemble(members, cv=3)
    assert ens.dropped, "the weak members should get weight 0"
    assert all(m.weight > 0 for m in ens.members)
    assert sum(m.weight for m in ens.members) == pytest.approx(1.0)
    assert {m.name for m in ens.members} | {m.name for m in ens.dropped} == {f"member_{j:02d}" for j in range(5)}
    for part in ("in_sample", "cv"):
        for row in ("ensemble", "best_member", "equal_weight"):
            assert set(ens.scores[part][row]) >= {"accuracy", "log_loss", "ece"}
    assert ens.scores["in_sample"]["best_member"]["member"] == "member_02"
    # Weights at T = 1 on calibrated members (the best member alone is one candidate),
    # then a final temperature that can only lower the loss: never worse in-sample than
    # the best member. (Equal weights, with their own final temperature, can be: weights
    # chosen at T = 1 favour fewer members than the tempered blend would.)
    s = ens.scores["in_sample"]
    assert s["ensemble"]["log_loss"] <= s["best_member"]["log_loss"] + 1e-9
    assert len(ens.scores["cv"]["ensemble_by_fold"]) == 3


def test_the_ensemble_applies_what_was_fitted():
    members = _members(n=300)
    ens = fit_ensemble(members, cv=0)
    kept = {m.name for m in ens.members}
    by_name = dict(zip(member_names(members), members))
    lp = ens.predict_log_proba([by_name[m.name].logits for m in ens.members])
    from ensemble.metrics import log_loss

    assert log_loss(np.exp(lp), members[0].labels) == pytest.approx(ens.scores["in_sample"]["ensemble"]["log_loss"], rel=1e-5)
    assert kept
    assert any("no cross-validation" in w for w in ens.warnings)


@pytest.mark.parametrize("method, metric, combine", [
    ("greedy", "accuracy", "arithmetic"), ("random", "f1_macro", "geometric"), ("stacking", "log_loss", "arithmetic"),
    ("slsqp", "log_loss", "geometric"), ("greedy", "balanced_accuracy", "geometric"),
])
def test_every_method_metric_and_rule_fits(method, metric, combine):
    ens = fit_ensemble(_members(n=200, c=3), method=method, metric=metric, combine=combine, cv=2,
                       options={"n_iter": 20} if method in ("greedy", "random") else None)
    assert ens.method == method and ens.metric == metric and ens.combine == combine
    assert metric in ens.scores["cv"]["ensemble"]
    if method == "stacking":
        assert ens.stacking is not None and len(ens.members) == 4 and all(m.temperature == 1.0 for m in ens.members)


def test_says_so_when_one_member_is_all_there_is():
    # One excellent member, three useless ones: nothing to gain from blending.
    members = _members(m=4, n=300, signal=[4.0, 0.0, 0.0, 0.0])
    ens = fit_ensemble(members, method="greedy", cv=5)
    assert [m.name for m in ens.members] == ["member_00"]
    assert ens.final_temperature == 1.0  # no second temperature on top of the member's own
    assert any("kept a single member (member_00)" in w for w in ens.warnings), ens.warnings
    cv = ens.scores["cv"]
    assert cv["ensemble"]["log_loss"] == pytest.approx(cv["best_member"]["log_loss"], rel=1e-4)  # float32 blends


def test_warns_when_the_ensemble_does_not_beat_the_best_member_out_of_sample():
    from ensemble.fit import _warnings
    from ensemble.model import Ensemble, Member

    scores = {"accuracy": 0.9, "log_loss": 0.30, "ece": 0.01}
    ens = Ensemble(classes=["a", "b"], members=[Member("x", "", 0.5), Member("y", "", 0.5)], scores={
        "in_sample": {"ensemble": dict(scores, log_loss=0.2), "best_member": scores, "equal_weight": scores},
        "cv": {"folds": 5, "ensemble": dict(scores, log_loss=0.31), "best_member": scores, "equal_weight": dict(scores, log_loss=0.4)},
    })
    (warning,) = _warnings(ens)
    assert warning.startswith("out of sample the ensemble does not beat the best single member (log_loss 0.3100 vs 0.3000, 5-fold CV)")


def test_member_names_are_unique():
    a = _members(m=2, n=20)
    for p in a:
        p.run = ""
    a[0].source, a[1].source = "x/val.safetensors", "y/val.safetensors"
    assert member_names(a) == ["x/val", "y/val"]
    a[1].source = "x/val.safetensors"
    assert member_names(a) == ["val#1", "val#2"]


def test_refuses_unlabelled_predictions():
    members = _members(m=2, n=30)
    for p in members:
        p.labels = p.labels.copy()
        p.labels[5] = -1
    with pytest.raises(UserInputError, match=r"1 of 30 samples have no label \(-1; first id 'img_000005.jpg'\); fitting needs labelled"):
        fit_ensemble(members)


@pytest.mark.parametrize("kwargs, match", [
    ({"cv": 1}, r"cv: expected 0 \(no cross-validation\) or a number of folds >= 2, got 1"),
    ({"cv": 500}, r"cv: 500 folds need at least 500 validation samples, got 40; lower --cv"),
    ({"method": "lbfgs"}, r"method: expected one of slsqp, greedy, random, stacking, got 'lbfgs'"),
    ({"combine": "max"}, r"combine: expected one of arithmetic, geometric, got 'max'"),
    ({"method": "slsqp", "metric": "accuracy"}, r"metric: expected one of log_loss for method 'slsqp', got 'accuracy'"),
    ({"method": "greedy", "options": {"bags": -2}}, r"bags: expected an integer >= 0"),
])
def test_fit_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_ensemble(_members(m=2, n=40), **kwargs)


def test_refuses_no_members_and_mismatched_files():
    with pytest.raises(UserInputError, match="no members given"):
        fit_ensemble([])
    a = _members(m=1, n=20, seed=0)[0]
    b = _members(m=1, n=20, seed=1, c=3)[0]
    with pytest.raises(UserInputError, match=r"classes .* differ"):
        fit_ensemble([a, b])
