import numpy as np
import pytest
from sklearn import metrics as skm

from ensemble.metrics import (METRICS, SEARCHABLE_METRICS, expected_calibration_error, get_metric, log_loss,
                              log_loss_from_log_probs, reported_metrics, score_table)
from zoo.errors import UserInputError


def _probs(n=300, c=4, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(c, 0.7), size=n)
    y = rng.integers(0, c, n)
    return p, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_sklearn(seed):
    p, y = _probs(seed=seed)
    pred = p.argmax(1)
    assert METRICS["accuracy"].fn(p, y) == pytest.approx(skm.accuracy_score(y, pred))
    assert METRICS["balanced_accuracy"].fn(p, y) == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert METRICS["f1_macro"].fn(p, y) == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert log_loss(p, y) == pytest.approx(skm.log_loss(y, p, labels=range(4)), rel=1e-9)
    assert log_loss_from_log_probs(np.log(p), y) == pytest.approx(log_loss(p, y), rel=1e-12)


def test_f1_macro_with_a_class_never_true_but_predicted():
    p = np.eye(3)[[0, 1, 2, 2]]
    y = np.array([0, 1, 1, 1])
    assert METRICS["f1_macro"].fn(p, y) == pytest.approx(skm.f1_score(y, p.argmax(1), average="macro", zero_division=0))


def test_ece_zero_when_confidence_matches_accuracy_and_large_when_overconfident():
    # 10 samples at confidence 0.8 with 8 right: perfectly calibrated.
    p = np.tile([0.8, 0.2], (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(p, y) == pytest.approx(0.0, abs=1e-12)
    # Confidence 0.99, accuracy 0.5.
    p = np.tile([0.99, 0.01], (10, 1))
    y = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(p, y) == pytest.approx(0.49)


def test_directions_and_registry():
    assert not METRICS["log_loss"].greater_is_better and METRICS["accuracy"].greater_is_better
    assert METRICS["accuracy"].loss(0.9) == -0.9 and METRICS["log_loss"].loss(0.3) == 0.3
    assert "ece" in METRICS and "ece" not in SEARCHABLE_METRICS
    assert reported_metrics("log_loss") == ("accuracy", "log_loss", "ece")
    assert reported_metrics("f1_macro")[-1] == "f1_macro"
    p, y = _probs()
    assert set(score_table(p, y)) == {"accuracy", "log_loss", "ece"}


@pytest.mark.parametrize("name, searchable, match", [
    ("auc", False, r"metric: expected one of log_loss, accuracy, balanced_accuracy, f1_macro, ece, got 'auc'"),
    ("ece", True, r"metric: expected one of log_loss, accuracy, balanced_accuracy, f1_macro, got 'ece'"),
])
def test_unknown_metric_lists_the_valid_names(name, searchable, match):
    with pytest.raises(UserInputError, match=match):
        get_metric(name, searchable=searchable)


@pytest.mark.parametrize("probs, labels, match", [
    (np.ones(3), np.zeros(3, int), r"probs: expected a 2-D array \[N, C\], got shape \(3,\)"),
    (np.ones((3, 2)) / 2, np.zeros(4, int), r"labels: expected shape \(3,\) to match probs \(3, 2\), got \(4,\)"),
    (np.ones((3, 2)) / 2, np.array([0, 1, 2]), r"labels: expected class indices in 0..1, got values 0..2"),
    (np.ones((3, 2)) / 2, np.array([0, -1, 1]), r"labels: expected class indices in 0..1, got values -1..1"),
])
def test_metric_input_errors(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        log_loss(probs, labels)


def test_ece_bins_error():
    p, y = _probs()
    with pytest.raises(ValueError, match=r"n_bins: expected a positive number of bins, got 0"):
        expected_calibration_error(p, y, n_bins=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_from_log_probabilities_match_scores_from_probabilities(seed):
    from ensemble.metrics import score_table_from_log_probs

    p, y = _probs(seed=seed)
    names = ("accuracy", "log_loss", "ece", "balanced_accuracy", "f1_macro")
    direct = score_table(p, y, names)
    via_logs = score_table_from_log_probs(np.log(p), y, names)
    for name in names:
        assert via_logs[name] == pytest.approx(direct[name], rel=1e-9), name
