"""Scores of probability predictions: one registry, ``METRICS``, with each metric's direction.

Every metric takes ``probs`` (float [N, C], rows summing to 1) and ``labels`` (int [N],
all known). The label metrics (accuracy, balanced accuracy, macro F1) depend on the
arg-max alone, so they also have a ``from_predicted`` form that the weight searches use
to score many candidate blends without rebuilding probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from zoo.errors import UserInputError

# The clip sklearn's log_loss used for years: a confident mistake costs at most ~34.5 nats.
EPS = 1e-15
ECE_BINS = 15


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.ndim != 2:
        raise ValueError(f"probs: expected a 2-D array [N, C], got shape {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels: expected shape ({probs.shape[0]},) to match probs {probs.shape}, got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels: expected class indices in 0..{probs.shape[1] - 1}, got values {labels.min()}..{labels.max()}")
    return probs, labels


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class, probabilities clipped at 1e-15."""
    probs, labels = _check(probs, labels)
    p = probs[np.arange(len(labels)), labels].astype(np.float64)
    return float(-np.mean(np.log(np.clip(p, EPS, 1.0))))


def log_loss_from_log_probs(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """``log_loss`` computed from log-probabilities (no exp of the whole array)."""
    log_probs, labels = _check(log_probs, labels)
    lp = log_probs[np.arange(len(labels)), labels].astype(np.float64)
    return float(-np.mean(np.clip(lp, np.log(EPS), 0.0)))


def accuracy_from_predicted(predicted: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    return float(np.mean(predicted == labels))


def balanced_accuracy_from_predicted(predicted: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    # Mean recall over the classes present in ``labels`` (sklearn's balanced_accuracy_score).
    true_count = np.bincount(labels, minlength=n_classes)
    hit = np.bincount(labels[predicted == labels], minlength=n_classes)
    present = true_count > 0
    return float(np.mean(hit[present] / true_count[present]))


def f1_macro_from_predicted(predicted: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    # Mean F1 over classes that are true or predicted at least once; 0 where undefined
    # (sklearn's f1_score(average="macro", zero_division=0)).
    true_count = np.bincount(labels, minlength=n_classes)
    pred_count = np.bincount(predicted, minlength=n_classes)
    hit = np.bincount(labels[predicted == labels], minlength=n_classes)
    used = (true_count + pred_count) > 0
    f1 = 2.0 * hit[used] / (true_count[used] + pred_count[used])
    return float(np.mean(f1))


def _from_probs(fn):
    def metric(probs: np.ndarray, labels: np.ndarray) -> float:
        probs, labels = _check(probs, labels)
        return fn(np.argmax(probs, axis=1), labels, probs.shape[1])

    metric.__name__ = fn.__name__.replace("_from_predicted", "")
    metric.__doc__ = f"{metric.__name__.replace('_', ' ').capitalize()} of the arg-max class."
    return metric


accuracy = _from_probs(accuracy_from_predicted)
balanced_accuracy = _from_probs(balanced_accuracy_from_predicted)
f1_macro = _from_probs(f1_macro_from_predicted)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE (Guo et al. 2017): |accuracy - confidence| over equal-width bins, weighted by bin size."""
    probs, labels = _check(probs, labels)
    return _ece(probs.max(axis=1).astype(np.float64), np.argmax(probs, axis=1), labels, n_bins)


def _ece(confidence: np.ndarray, predicted: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    if n_bins < 1:
        raise ValueError(f"n_bins: expected a positive number of bins, got {n_bins}")
    if len(labels) == 0:
        return float("nan")
    correct = (predicted == labels).astype(np.float64)
    # Bin b holds confidences in (b/n, (b+1)/n]; confidence 0 cannot occur for C >= 1.
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, correct, n_bins) - np.bincount(bins, confidence, n_bins))
    return float(gap.sum() / count.sum())


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]
    greater_is_better: bool
    # Set for metrics of the arg-max alone: (predicted, labels, n_classes) -> score.
    from_predicted: Callable[[np.ndarray, np.ndarray, int], float] | None
    # Whether a weight search may target it (ECE is reported, never optimised: a
    # constant prediction at the base rate has ECE 0).
    searchable: bool
    description: str

    def loss(self, score: float) -> float:
        """The score turned into something to minimise."""
        return -score if self.greater_is_better else score


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("log_loss", log_loss, False, None, True, "mean negative log-probability of the true class"),
        Metric("accuracy", accuracy, True, accuracy_from_predicted, True, "fraction of arg-max predictions that are right"),
        Metric("balanced_accuracy", balanced_accuracy, True, balanced_accuracy_from_predicted, True,
               "mean recall over classes"),
        Metric("f1_macro", f1_macro, True, f1_macro_from_predicted, True, "mean F1 over classes"),
        Metric("ece", expected_calibration_error, False, None, False,
               f"expected calibration error, top label, {ECE_BINS} equal-width bins"),
    )
}

SEARCHABLE_METRICS = tuple(name for name, m in METRICS.items() if m.searchable)
# What every table reports, whatever the target metric.
REPORTED_METRICS = ("accuracy", "log_loss", "ece")


def get_metric(name: str, searchable: bool = False) -> Metric:
    valid = SEARCHABLE_METRICS if searchable else tuple(METRICS)
    if name not in valid:
        raise UserInputError(f"metric: expected one of {', '.join(valid)}, got {name!r}")
    return METRICS[name]


def score_table(probs: np.ndarray, labels: np.ndarray, metrics=REPORTED_METRICS) -> dict[str, float]:
    """``{metric name: score}`` for ``metrics`` (names from ``METRICS``)."""
    return {name: get_metric(name).fn(probs, labels) for name in metrics}


@dataclass
class RowStats:
    """What the reported metrics need of a prediction, row by row: the arg-max class, the
    log-probability of the true class (log loss) and of the arg-max (ECE). Three numbers
    a row instead of C: folds' held-out rows are pooled in these."""

    predicted: np.ndarray  # int64 [N]
    true_log_prob: np.ndarray  # float64 [N]
    top_log_prob: np.ndarray  # float64 [N]

    @classmethod
    def empty(cls, n: int) -> "RowStats":
        return cls(np.zeros(n, dtype=np.int64), np.zeros(n), np.zeros(n))

    def put(self, rows: np.ndarray, other: "RowStats") -> None:
        self.predicted[rows], self.true_log_prob[rows], self.top_log_prob[rows] = other.predicted, other.true_log_prob, other.top_log_prob

    def scores(self, labels: np.ndarray, n_classes: int, metrics=REPORTED_METRICS) -> dict[str, float]:
        """``{metric name: score}`` of these rows against ``labels`` (the same rows, same order)."""
        out = {}
        for name in metrics:
            metric = get_metric(name)
            if metric.from_predicted is not None:
                out[name] = metric.from_predicted(self.predicted, labels, n_classes)
            elif name == "log_loss":
                out[name] = float(-np.mean(np.clip(self.true_log_prob, np.log(EPS), 0.0)))
            elif name == "ece":
                out[name] = _ece(np.exp(self.top_log_prob), self.predicted, labels, ECE_BINS)
            else:
                raise ValueError(f"metrics: {name!r} needs the whole probability table, not row statistics")
        return out


def row_stats(z: np.ndarray, labels: np.ndarray, temperature: float | None = None,
              rows: np.ndarray | None = None) -> RowStats:
    """``RowStats`` of ``log_softmax(z[rows] / temperature)``; ``temperature=None``: ``z`` are
    log-probabilities already, used as they are. Block by block, no copy of ``z``."""
    from ensemble.calibration import row_blocks

    n = len(labels) if rows is None else len(rows)
    out = RowStats.empty(n)
    for start, stop in row_blocks(n, z.shape[1]):
        block = z[start:stop] if rows is None else z[rows[start:stop]]
        y = labels[start:stop] if rows is None else labels[rows[start:stop]]
        index = np.arange(stop - start)
        predicted = np.argmax(block, axis=1)
        top = block[index, predicted].astype(np.float64)
        true = block[index, y].astype(np.float64)
        if temperature is not None:
            x = np.multiply(block, np.float32(1.0 / temperature), dtype=np.float32)
            top_x = x[index, predicted]
            x -= top_x[:, None]
            np.exp(x, out=x)
            lse = np.log(x.sum(axis=1, dtype=np.float64)) + top_x
            top = top_x - lse
            true = true / temperature - lse
        out.predicted[start:stop], out.true_log_prob[start:stop], out.top_log_prob[start:stop] = predicted, true, top
    return out


def score_table_from_log_probs(log_probs: np.ndarray, labels: np.ndarray, metrics=REPORTED_METRICS) -> dict[str, float]:
    """``score_table`` from log-probabilities, without exponentiating the whole array
    (the label metrics need the arg-max, log loss the true class, ECE the top probability)."""
    log_probs, labels = _check(log_probs, labels)
    if any(get_metric(name).from_predicted is None and name not in ("log_loss", "ece") for name in metrics):
        return {name: get_metric(name).fn(np.exp(log_probs), labels) for name in metrics}
    return row_stats(log_probs, labels).scores(labels, log_probs.shape[1], metrics)


def reported_metrics(target: str) -> tuple[str, ...]:
    """Accuracy, log loss and ECE, plus the target metric when it is another one."""
    return REPORTED_METRICS + (() if target in REPORTED_METRICS else (target,))
