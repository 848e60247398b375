"""How alike are the members? Pairwise measures, the Kuncheva–Whitaker kappa, and a diverse subset.

An ensemble gains from members that are right on different samples. Every measure
here is computed for all pairs at once from aligned prediction files; one registry,
``PAIRWISE_MEASURES``, names them (the CLI's ``--measure`` choices come from it):

- ``prob_corr``: Pearson correlation of the predicted probabilities (every sample and
  class, flattened); 1 = the same predictions. The usual Kaggle "how correlated are
  these submissions".
- ``correct_corr``: Pearson correlation of the right/wrong indicators (the phi
  coefficient); 1 = right and wrong on the same samples.
- ``disagreement``: fraction of samples whose predicted classes differ (needs no labels).
- ``double_fault``: fraction of samples both get wrong (Giacinto & Roli 2001).
- ``yule_q``: Yule's Q of right/wrong, in [-1, 1]; 0 = independent errors (Kuncheva & Whitaker 2003).
- ``cohen_kappa``: Cohen's kappa between the predicted classes, chance-corrected agreement (needs no labels).

For the whole set, ``kuncheva_whitaker_kappa`` is the interrater agreement kappa of
Kuncheva & Whitaker (2003): 1 = every member right on the same samples, 0 = independent.
Right/wrong measures use the labelled rows only (labels -1 are unknown).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ensemble.calibration import TemperatureScaler, apply_temperature
from ensemble.members import member_names
from ensemble.metrics import EPS, accuracy, expected_calibration_error, log_loss
from zoo import atomic
from zoo.errors import UserInputError
from zoo.predictions import Predictions, align_predictions

_ROW_CHUNK = 4096


@dataclass
class DiversityInputs:
    """What the measures are computed from: aligned members, precomputed once."""

    probs: np.ndarray  # [M, N, C] float32
    predicted: np.ndarray  # [M, N] int
    labels: np.ndarray  # [N], -1 where unknown
    known: np.ndarray  # [N] bool

    @property
    def correct(self) -> np.ndarray:  # [M, N_known] bool
        return self.predicted[:, self.known] == self.labels[self.known]

    @classmethod
    def from_predictions(cls, preds: Sequence[Predictions]) -> "DiversityInputs":
        probs = np.stack([p.probabilities().astype(np.float32) for p in preds])
        labels = preds[0].labels
        return cls(probs, np.argmax(probs, axis=2), labels, labels >= 0)


def _pearson(vectors: Callable[[slice], np.ndarray], m: int, n: int) -> np.ndarray:
    """Correlation matrix of M long vectors given in row blocks ([M, block] each), without stacking them whole."""
    sums = np.zeros(m)
    gram = np.zeros((m, m))
    count = 0
    for start in range(0, n, _ROW_CHUNK):
        block = vectors(slice(start, start + _ROW_CHUNK)).astype(np.float64)
        sums += block.sum(axis=1)
        gram += block @ block.T
        count += block.shape[1]
    if count == 0:
        return np.full((m, m), np.nan)
    mean = sums / count
    cov = gram / count - np.outer(mean, mean)
    sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = cov / np.outer(sd, sd)
    corr[np.outer(sd, sd) <= 1e-12] = np.nan  # a constant member has no correlation
    return np.clip(corr, -1.0, 1.0)


def probability_correlation(x: DiversityInputs) -> np.ndarray:
    m, n, _ = x.probs.shape
    return _pearson(lambda rows: x.probs[:, rows].reshape(m, -1), m, n)


def _oracle_counts(x: DiversityInputs) -> tuple[np.ndarray, ...]:
    """N11 (both right), N10, N01, N00 (both wrong) for every pair, as fractions of the labelled rows."""
    right = x.correct.astype(np.float64)
    wrong = 1.0 - right
    n = max(right.shape[1], 1)
    return right @ right.T / n, right @ wrong.T / n, wrong @ right.T / n, wrong @ wrong.T / n


def correctness_correlation(x: DiversityInputs) -> np.ndarray:
    n11, n10, n01, n00 = _oracle_counts(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (n11 * n00 - n10 * n01) / np.sqrt((n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00))
    return _nan_if_unlabelled(x, out)


def disagreement(x: DiversityInputs) -> np.ndarray:
    m = len(x.predicted)
    out = np.zeros((m, m))
    for i in range(m):
        out[i] = np.mean(x.predicted != x.predicted[i], axis=1)
    return out


def double_fault(x: DiversityInputs) -> np.ndarray:
    return _nan_if_unlabelled(x, _oracle_counts(x)[3])


def yule_q(x: DiversityInputs) -> np.ndarray:
    n11, n10, n01, n00 = _oracle_counts(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (n11 * n00 - n01 * n10) / (n11 * n00 + n01 * n10)
    return _nan_if_unlabelled(x, out)


def cohen_kappa(x: DiversityInputs) -> np.ndarray:
    n = x.predicted.shape[1]
    c = x.probs.shape[2]
    share = np.stack([np.bincount(p, minlength=c) / n for p in x.predicted])  # [M, C] class shares
    chance = share @ share.T
    agree = 1.0 - disagreement(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (agree - chance) / (1.0 - chance)
    out[np.isclose(chance, 1.0)] = np.nan  # both always predict the same single class
    return out


def _nan_if_unlabelled(x: DiversityInputs, out: np.ndarray) -> np.ndarray:
    return np.full_like(out, np.nan) if not x.known.any() else out


def kuncheva_whitaker_kappa(correct: np.ndarray) -> float:
    """Interrater agreement kappa of Kuncheva & Whitaker (2003) from right/wrong [L members, N samples].

    kappa = 1 - (1/L) sum_i l_i (L - l_i) / (N (L - 1) p (1 - p)), with l_i the number of
    members right on sample i and p the mean accuracy. NaN with fewer than 2 members, no
    samples, or p in {0, 1}.
    """
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 2:
        raise ValueError(f"correct: expected a 2-D array [members, samples], got shape {correct.shape}")
    big_l, n = correct.shape
    if big_l < 2 or n == 0:
        return float("nan")
    l_i = correct.sum(axis=0).astype(np.float64)
    p = l_i.sum() / (n * big_l)
    if p <= 0.0 or p >= 1.0:
        return float("nan")
    return float(1.0 - (np.sum(l_i * (big_l - l_i)) / big_l) / (n * (big_l - 1) * p * (1.0 - p)))


@dataclass(frozen=True)
class PairMeasure:
    name: str
    fn: Callable[[DiversityInputs], np.ndarray]
    title: str
    alike_when: str  # "high" or "low": which end means the two members are alike
    needs_labels: bool
    description: str


PAIRWISE_MEASURES: dict[str, PairMeasure] = {
    m.name: m
    for m in (
        PairMeasure("prob_corr", probability_correlation, "probability correlation", "high", False,
                    "Pearson correlation of predicted probabilities"),
        PairMeasure("correct_corr", correctness_correlation, "correctness correlation", "high", True,
                    "Pearson correlation of right/wrong"),
        PairMeasure("disagreement", disagreement, "disagreement", "low", False,
                    "fraction of samples with different predicted classes"),
        PairMeasure("double_fault", double_fault, "double fault", "high", True, "fraction of samples both get wrong"),
        PairMeasure("yule_q", yule_q, "Yule's Q", "high", True, "Yule's Q of right/wrong (0 = independent)"),
        PairMeasure("cohen_kappa", cohen_kappa, "Cohen's kappa", "high", False,
                    "chance-corrected agreement of predicted classes"),
    )
}


def get_measure(name: str) -> PairMeasure:
    if name not in PAIRWISE_MEASURES:
        raise UserInputError(f"measure: expected one of {', '.join(PAIRWISE_MEASURES)}, got {name!r}")
    return PAIRWISE_MEASURES[name]


@dataclass
class SubsetStep:
    name: str
    subset_log_loss: float  # equal-weight average of the subset so far, members temperature-scaled
    max_corr: float  # the largest probability correlation with a member picked before (nan for the first)


@dataclass
class CorrelationReport:
    names: list[str]
    backbones: list[str]
    sources: list[str]
    models: list[dict[str, float]]  # accuracy, log_loss, ece of each member (labelled rows)
    matrices: dict[str, np.ndarray]
    kappa: float  # Kuncheva–Whitaker
    subset: list[SubsetStep]
    n_samples: int
    n_labelled: int
    notes: list[str] = field(default_factory=list)

    def pairs(self) -> list[dict]:
        """One row per pair, every measure."""
        out = []
        for i in range(len(self.names)):
            for j in range(i + 1, len(self.names)):
                row = {"a": self.names[i], "b": self.names[j]}
                row.update({name: float(mat[i, j]) for name, mat in self.matrices.items()})
                out.append(row)
        return out

    def to_json(self) -> dict:
        return {
            "samples": self.n_samples, "labelled": self.n_labelled,
            "members": [{"name": n, "backbone": b, "source": s, **m}
                        for n, b, s, m in zip(self.names, self.backbones, self.sources, self.models)],
            "kuncheva_whitaker_kappa": self.kappa,
            "matrices": {k: v.tolist() for k, v in self.matrices.items()},
            "measures": {k: {"title": m.title, "alike_when": m.alike_when, "description": m.description}
                         for k, m in PAIRWISE_MEASURES.items()},
            "pairs": self.pairs(),
            "suggested_subset": [vars(s) for s in self.subset],
            "notes": self.notes,
        }


def suggest_subset(probs: np.ndarray, labels: np.ndarray, k: int, corr: np.ndarray) -> list[tuple[int, float, float]]:
    """Greedy pick of ``k`` strong, complementary members: start from the best single member
    (log loss), then add the one that most lowers the log loss of the equal-weight average
    of the picked members. A member correlated with those picked adds little to the
    average, so this trades strength against correlation without a tuning knob.

    ``probs`` [M, N, C] of labelled rows. Returns (index, subset log loss, max correlation
    with earlier picks) per step.
    """
    m, n, _ = probs.shape
    true = probs[:, np.arange(n), labels].astype(np.float64).T  # [N, M]
    picked: list[int] = []
    total = np.zeros(n)
    out = []
    for step in range(min(k, m)):
        rest = [j for j in range(m) if j not in picked]
        losses = -np.mean(np.log(np.clip((total[:, None] + true[:, rest]) / (step + 1), EPS, 1.0)), axis=0)
        j = rest[int(np.argmin(losses))]
        max_corr = float(np.nanmax(corr[j, picked])) if picked and not np.all(np.isnan(corr[j, picked])) else float("nan")
        picked.append(j)
        total += true[:, j]
        out.append((j, float(losses.min()), max_corr))
    return out


def correlate(preds: Sequence[Predictions], k: int = 3, names: Sequence[str] | None = None) -> CorrelationReport:
    """Every pairwise measure, the set's kappa, each member's scores, and a suggested subset of ``k``."""
    if len(preds) < 2:
        raise UserInputError(f"need at least 2 prediction files or runs to compare, got {len(preds)}")
    if not (isinstance(k, int) and k >= 1):
        raise UserInputError(f"k: expected a subset size >= 1, got {k!r}")
    aligned = align_predictions(preds)
    names = list(names) if names is not None else member_names(aligned)
    x = DiversityInputs.from_predictions(aligned)
    notes = []
    n_labelled = int(x.known.sum())
    matrices = {}
    for name, measure in PAIRWISE_MEASURES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            matrices[name] = measure.fn(x)
    models = []
    subset: list[SubsetStep] = []
    if n_labelled == 0:
        notes.append("no labels in these files: right/wrong measures, scores and the subset suggestion need labelled (validation) predictions")
        models = [{"accuracy": float("nan"), "log_loss": float("nan"), "ece": float("nan")} for _ in aligned]
        kappa = float("nan")
    else:
        if n_labelled < len(x.labels):
            notes.append(f"{len(x.labels) - n_labelled} of {len(x.labels)} samples have no label; right/wrong measures use the other {n_labelled}")
        y = x.labels[x.known]
        probs = x.probs[:, x.known]
        for p in probs:
            models.append({"accuracy": accuracy(p, y), "log_loss": log_loss(p, y), "ece": expected_calibration_error(p, y)})
        kappa = kuncheva_whitaker_kappa(x.correct)
        # Judge strength after temperature scaling, as the ensemble will use the members.
        logits = [p.logits[x.known] for p in aligned]
        calibrated = np.stack([np.exp(apply_temperature(z, TemperatureScaler().fit(z, y).temperature_)) for z in logits])
        subset = [SubsetStep(names[j], loss, corr)
                  for j, loss, corr in suggest_subset(calibrated, y, min(k, len(aligned)), matrices["prob_corr"])]
    return CorrelationReport(
        names=names, backbones=[p.backbone for p in aligned], sources=[p.source for p in aligned], models=models,
        matrices=matrices, kappa=kappa, subset=subset, n_samples=len(x.labels), n_labelled=n_labelled, notes=notes,
    )


def _csv(rows: list[list]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _fmt(v) -> str:
    return "" if isinstance(v, float) and np.isnan(v) else (f"{v:.6g}" if isinstance(v, float) else str(v))


def write_correlation(report: CorrelationReport, out: str | os.PathLike) -> list[Path]:
    """``members.csv``, ``pairs.csv``, ``matrix_<measure>.csv`` for each measure,
    ``correlation.json`` and ``heatmap.png`` in folder ``out``."""
    out = Path(out)
    written = []
    written.append(atomic.write_text(out / "members.csv", _csv(
        [["name", "backbone", "accuracy", "log_loss", "ece", "source"]]
        + [[n, b, *(_fmt(m[k]) for k in ("accuracy", "log_loss", "ece")), s]
           for n, b, m, s in zip(report.names, report.backbones, report.models, report.sources)])))
    pairs = report.pairs()
    keys = ["a", "b", *PAIRWISE_MEASURES]
    written.append(atomic.write_text(out / "pairs.csv", _csv([keys] + [[_fmt(p[k]) for k in keys] for p in pairs])))
    for name, mat in report.matrices.items():
        written.append(atomic.write_text(out / f"matrix_{name}.csv", _csv(
            [["", *report.names]] + [[n, *(_fmt(float(v)) for v in row)] for n, row in zip(report.names, mat)])))
    written.append(atomic.write_text(out / "correlation.json", json.dumps(_json_safe(report.to_json()), indent=2) + "\n"))
    written.append(write_heatmap(report, out / "heatmap.png"))
    return written


def _json_safe(obj):
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def write_heatmap(report: CorrelationReport, path: str | os.PathLike, measures: Sequence[str] = ("prob_corr", "correct_corr")) -> Path:
    """A PNG with one annotated heatmap per measure."""
    # A Figure without pyplot draws with Agg on its own: no global backend is switched under the caller.
    from matplotlib.figure import Figure

    m = len(report.names)
    size = max(4.0, 0.55 * m + 2.0)
    fig = Figure(figsize=(size * len(measures), size))
    axes = fig.subplots(1, len(measures), squeeze=False)
    for ax, name in zip(axes[0], measures):
        mat = report.matrices[name]
        image = ax.imshow(np.ma.masked_invalid(mat), cmap="viridis", vmin=-1 if name != "disagreement" else 0, vmax=1)
        ax.set_title(PAIRWISE_MEASURES[name].title)
        ax.set_xticks(range(m), report.names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(m), report.names, fontsize=8)
        if m <= 20:
            for i in range(m):
                for j in range(m):
                    if np.isfinite(mat[i, j]):
                        ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="black" if mat[i, j] > 0.5 else "white")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return atomic.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
