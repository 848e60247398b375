import numpy as np
import pytest

from ensemble.calibration import TemperatureScaler, apply_temperature, log_softmax
from ensemble.metrics import expected_calibration_error, log_loss
from ensemble.synthetic import sample_labels


def _calibrated(n=4000, c=5, seed=0):
    logits = np.random.default_rng(seed).normal(0, 2.0, (n, c)).astype(np.float32)
    return logits, sample_labels(logits, seed=seed + 1)


@pytest.mark.parametrize("scale", [4.0, 0.3])
def test_temperature_recovers_the_scale_and_lowers_ece(scale):
    logits, y = _calibrated()
    miscalibrated = logits * scale  # scale 4: over-confident; 0.3: timid
    before = np.exp(log_softmax(miscalibrated))
    ts = TemperatureScaler().fit(miscalibrated, y)
    after = ts.predict_proba(miscalibrated)
    assert ts.temperature_ == pytest.approx(scale, rel=0.1)
    assert expected_calibration_error(after, y) < 0.5 * expected_calibration_error(before, y)
    assert log_loss(after, y) < log_loss(before, y)
    assert ts.log_loss_after_ < ts.log_loss_before_
    np.testing.assert_array_equal(after.argmax(1), before.argmax(1))  # accuracy never changes


def test_temperature_is_a_minimum_of_the_validation_log_loss():
    logits, y = _calibrated(seed=3)
    logits = logits * 2.5
    t = TemperatureScaler().fit(logits, y).temperature_
    at = log_loss(np.exp(apply_temperature(logits, t)), y)
    for other in (t * 0.97, t * 1.03):
        assert at <= log_loss(np.exp(apply_temperature(logits, other)), y)


def test_log_probabilities_and_logits_give_the_same_temperature():
    logits, y = _calibrated(seed=5)
    logits = logits * 3
    a = TemperatureScaler().fit(logits, y).temperature_
    b = TemperatureScaler().fit(log_softmax(logits), y).temperature_
    assert a == pytest.approx(b, rel=1e-3)


def test_a_perfect_member_gets_a_sharp_temperature_not_an_error():
    # Every sample right: the loss keeps falling as T -> 0 until it is 0 in floating point.
    y = np.arange(50) % 3
    logits = np.eye(3)[y] * 5.0
    ts = TemperatureScaler(bounds=(0.05, 20)).fit(logits, y)
    assert 0.05 <= ts.temperature_ < 0.5
    assert ts.log_loss_after_ < 1e-6


def test_transform_before_fit_raises():
    with pytest.raises(RuntimeError, match="not fitted"):
        TemperatureScaler().transform(np.zeros((2, 2)))


@pytest.mark.parametrize("kwargs, logits, labels, match", [
    ({"bounds": (1.5, 10)}, np.zeros((2, 2)), np.zeros(2, int), r"bounds: expected 0 < low < 1 < high \(finite\), got \(1.5, 10\)"),
    ({"bounds": (0.1, np.inf)}, np.zeros((2, 2)), np.zeros(2, int), r"bounds: expected 0 < low < 1 < high"),
    ({"xatol": 0}, np.zeros((2, 2)), np.zeros(2, int), r"xatol: expected a positive tolerance, got 0"),
    ({}, np.zeros(2), np.zeros(2, int), r"logits: expected a 2-D array \[N, C\], got shape \(2,\)"),
    ({}, np.zeros((2, 2)), np.zeros(3, int), r"labels: expected shape \(2,\) with N > 0 to match logits \(2, 2\), got \(3,\)"),
])
def test_bad_arguments(kwargs, logits, labels, match):
    with pytest.raises(ValueError, match=match):
        TemperatureScaler(**kwargs).fit(logits, labels)


def test_apply_temperature_refuses_nonpositive():
    with pytest.raises(ValueError, match=r"temperature: expected a positive number, got 0"):
        apply_temperature(np.zeros((2, 2)), 0)
