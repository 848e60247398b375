"""Fit an ensemble on validation predictions, and say honestly what it is worth.

``fit_ensemble`` fits member temperatures, the weight search and a final temperature on
all validation rows (the ensemble it returns), then repeats the whole fit K times on
K-1 folds and scores each held-out fold (the cross-validated scores). Weights fitted and
scored on the same rows flatter the ensemble; the held-out scores do not. The baselines,
the best single member and the equal-weight average, go through the same folds: the
best member is chosen on the training folds, never on the fold it is scored on.

Only numpy and scipy here (scikit-learn for stacking): no torch.
"""

from __future__ import annotations

import inspect
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ensemble.calibration import TemperatureScaler, apply_temperature, log_softmax
from ensemble.combine import combine, get_combine_rule
from ensemble.metrics import get_metric, reported_metrics, score_table_from_log_probs
from ensemble.members import member_names, member_run
from ensemble.model import Ensemble, Member
from ensemble.weights import ZERO_WEIGHT, ConvergenceWarning, blas_threads, get_weight_search, make_search
from zoo.errors import UserInputError
from zoo.predictions import Predictions, align_predictions
from zoo.rundir import RunDir

BASELINES = ("ensemble", "best_member", "equal_weight")


@dataclass(frozen=True)
class FitSpec:
    """Everything that defines one fit, so each CV fold repeats it exactly."""

    method: str = "slsqp"
    metric: str = "log_loss"
    combine: str = "arithmetic"
    calibrate: bool = True
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # weight-search constructor arguments

    def search(self):
        options = dict(self.options)
        if "temperature" in inspect.signature(get_weight_search(self.method)).parameters:
            # slsqp picks its weights knowing the final temperature that follows them.
            options.setdefault("temperature", self.calibrate)
        return make_search(self.method, self.metric, self.combine, self.seed, **options)


# ---------------------------------------------------------------------------------------
# Members.


def stack_log_probs(preds: Sequence[Predictions]) -> np.ndarray:
    """Stacked member log-probabilities [M, N, C], float32 (rows already aligned)."""
    out = np.empty((len(preds), *preds[0].logits.shape), dtype=np.float32)
    for j, p in enumerate(preds):
        out[j] = log_softmax(p.logits)  # float32 in, float32 out
    return out


def prepare_members(members: Sequence[Predictions]) -> tuple[list[Predictions], np.ndarray, np.ndarray]:
    """Align ``members`` by id; refuse unknown labels; return (aligned, log_probs [M,N,C], labels)."""
    if len(members) == 0:
        raise UserInputError("no members given; pass run directories or validation prediction files")
    preds = align_predictions(members)
    labels = preds[0].labels
    if (labels < 0).any():
        row = int(np.argmax(labels < 0))
        where = preds[0].source or preds[0].name
        raise UserInputError(
            f"{where}: {int((labels < 0).sum())} of {len(labels)} samples have no label (-1; first id {preds[0].ids[row]!r}); "
            "fitting needs labelled validation predictions, not test ones"
        )
    return preds, stack_log_probs(preds), labels


# ---------------------------------------------------------------------------------------
# One fit (all rows, or one CV fold's training rows) and its predictions.


def fit_temperatures(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One temperature per member, fitted on log loss; in threads (numpy releases the GIL)."""
    def fit(j: int) -> float:
        return TemperatureScaler().fit(log_probs[j], labels).temperature_

    workers = min(len(log_probs), os.cpu_count() or 1)
    if workers <= 1:
        return np.array([fit(j) for j in range(len(log_probs))])
    with ThreadPoolExecutor(workers) as pool:
        return np.array(list(pool.map(fit, range(len(log_probs)))))


def calibrated(log_probs: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """Member log-probabilities [M, N, C] at their temperatures: ``log_softmax(log_probs / T)``."""
    out = np.empty(log_probs.shape, dtype=log_probs.dtype)
    for j in range(len(log_probs)):
        out[j] = log_probs[j] if temperatures[j] == 1.0 else apply_temperature(log_probs[j], temperatures[j])
    return out


@dataclass
class FittedFold:
    """The ensemble and both baselines, fitted on one set of rows."""

    spec: FitSpec
    temperatures: np.ndarray  # per member (ones without calibration)
    search: Any  # the fitted weight search
    final_temperature: float
    best_member: int  # chosen on these rows, on the target metric
    equal_final_temperature: float
    member_losses: np.ndarray  # target-metric loss of each calibrated member on these rows

    def predict(self, log_probs: np.ndarray, cal: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Log-probabilities [N, C] of the ensemble and the baselines on other (or the same)
        rows; ``cal``: ``log_probs`` already at the fitted temperatures, if at hand."""
        m = len(log_probs)
        if cal is None:
            cal = calibrated(log_probs, self.temperatures) if self.spec.calibrate else log_probs
        if self.search.weighted:
            ens = apply_temperature(self.search.predict_log_proba(cal), self.final_temperature)
        else:  # stacking: fitted on raw log-probabilities
            ens = self.search.predict_log_proba(log_probs)
        equal = apply_temperature(combine(cal, np.full(m, 1.0 / m), self.spec.combine), self.equal_final_temperature)
        return {"ensemble": ens, "best_member": cal[self.best_member].astype(np.float64), "equal_weight": equal}


def _final_temperature(log_probs: np.ndarray, labels: np.ndarray, calibrate: bool) -> float:
    return TemperatureScaler().fit(log_probs, labels).temperature_ if calibrate else 1.0


def fit_fold(log_probs: np.ndarray, labels: np.ndarray, spec: FitSpec) -> FittedFold:
    """Fit temperatures, the weight search, the final temperature and the baselines on these rows only."""
    m = len(log_probs)
    temperatures = fit_temperatures(log_probs, labels) if spec.calibrate else np.ones(m)
    cal = calibrated(log_probs, temperatures) if spec.calibrate else log_probs
    search = spec.search()
    if search.weighted:
        search.fit(cal, labels)
        # One member alone is already at its own temperature: a second one would only
        # sharpen it further where validation is separable.
        alone = np.count_nonzero(search.weights_) == 1
        if spec.calibrate and not alone and getattr(search, "temperature", False):
            final = search.temperature_  # slsqp fitted it together with the weights
        else:
            final = _final_temperature(search.predict_log_proba(cal), labels, spec.calibrate and not alone)
    else:
        search.fit(log_probs, labels)
        final = 1.0
    metric = get_metric(spec.metric)
    member_losses = np.array([metric.loss(score_table_from_log_probs(cal[j], labels, [spec.metric])[spec.metric]) for j in range(m)])
    equal_final = _final_temperature(combine(cal, np.full(m, 1.0 / m), spec.combine), labels, spec.calibrate)
    return FittedFold(spec, temperatures, search, final, int(np.argmin(member_losses)), equal_final, member_losses)


# ---------------------------------------------------------------------------------------
# Cross-validation.


def cv_folds(labels: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """K disjoint test folds covering every row once, stratified by label, sizes within 1.

    Each class's rows are shuffled and dealt round-robin across folds, continuing from
    where the previous class stopped, so every class is spread as evenly as it can be.
    """
    labels = np.asarray(labels)
    if not (isinstance(k, (int, np.integer)) and k >= 2):
        raise UserInputError(f"cv: expected 0 (no cross-validation) or a number of folds >= 2, got {k!r}")
    if len(labels) < k:
        raise UserInputError(f"cv: {k} folds need at least {k} validation samples, got {len(labels)}; lower --cv")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    fold_of = np.empty(len(labels), dtype=np.int64)
    fold_of[order] = np.arange(len(labels)) % k
    return [np.flatnonzero(fold_of == f) for f in range(k)]


def _scores(log_probs: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    return score_table_from_log_probs(log_probs, labels, names)


def cross_validate(log_probs: np.ndarray, labels: np.ndarray, spec: FitSpec, k: int, seed: int = 0) -> dict[str, Any]:
    """Scores of the ensemble and the baselines on held-out folds: each fold is predicted
    by a fit that never saw it (temperatures included). Scores are computed on the pooled
    out-of-fold predictions; ``ensemble_by_fold`` holds the target metric of each fold."""
    n = len(labels)
    folds = cv_folds(labels, k, seed)
    out_of_fold = {name: np.empty(log_probs.shape[1:], dtype=np.float64) for name in BASELINES}
    def one_fold(test: np.ndarray):
        train = np.setdiff1d(np.arange(n), test, assume_unique=True)
        # np.take keeps each member's rows contiguous (log_probs[:, rows] would not).
        fitted = fit_fold(np.take(log_probs, train, axis=1), labels[train], spec)
        return test, fitted.predict(np.take(log_probs, test, axis=1)), fitted.best_member

    # Folds are independent: two at a time on two cores (numpy releases the GIL in its loops).
    workers = min(len(folds), os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one_fold, folds))
    else:
        results = [one_fold(test) for test in folds]
    by_fold, picks = [], []
    for test, predicted, best in results:
        for name in BASELINES:
            out_of_fold[name][test] = predicted[name]
        by_fold.append(score_table_from_log_probs(predicted["ensemble"], labels[test], [spec.metric])[spec.metric])
        picks.append(best)
    names = reported_metrics(spec.metric)
    result: dict[str, Any] = {"folds": k, "seed": seed}
    for name in BASELINES:
        result[name] = _scores(out_of_fold[name], labels, names)
    result["ensemble_by_fold"] = by_fold
    result["best_member_picks"] = picks
    return result


# ---------------------------------------------------------------------------------------
# The whole fit.


def fit_ensemble(members: Sequence[Predictions], method: str = "slsqp", metric: str = "log_loss",
                 combine: str = "arithmetic", calibrate: bool = True, cv: int = 5, seed: int = 0,
                 options: dict[str, Any] | None = None, log: Callable[[str], None] | None = None) -> Ensemble:
    """Fit an ensemble of ``members`` (validation predictions) and score it.

    method: a name from ``WEIGHT_SEARCHES``; metric: the target (``SEARCHABLE_METRICS``,
    what the method supports); combine: ``arithmetic`` or ``geometric``; calibrate: fit a
    temperature per member and one after combining; cv: folds for the held-out scores (0:
    none); options: weight-search constructor arguments (see ``weights.search_kwargs``);
    log: called with progress lines. Returns the ``Ensemble``, zero-weight members moved
    to ``dropped``, with ``scores['in_sample']``, ``scores['cv']`` and ``warnings`` (the
    optimisers' convergence warnings included).
    """
    # One BLAS thread for the whole fit, set once here: the folds run in threads, and
    # limits entered and left by concurrent threads would not restore cleanly.
    with warnings.catch_warnings(record=True) as caught, blas_threads():
        warnings.simplefilter("always", ConvergenceWarning)
        ens = _fit_ensemble(members, method, metric, combine, calibrate, cv, seed, options, log or (lambda _: None))
    for w in caught:
        if issubclass(w.category, ConvergenceWarning) and str(w.message) not in ens.warnings:
            ens.warnings.append(str(w.message))
        elif not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ens


def _fit_ensemble(members, method, metric, combine, calibrate, cv, seed, options, log) -> Ensemble:
    spec = FitSpec(method, metric, combine, bool(calibrate), int(seed), dict(options or {}))
    spec.search()  # refuse bad options before any work
    get_combine_rule(combine)
    if cv != 0 and not (isinstance(cv, (int, np.integer)) and cv >= 2):
        raise UserInputError(f"cv: expected 0 (no cross-validation) or a number of folds >= 2, got {cv!r}")
    preds, log_probs, labels = prepare_members(members)
    if cv:
        cv_folds(labels, cv, seed)  # too few samples: say so before the in-sample fit
    names = member_names(preds)
    m, n, c = log_probs.shape
    log(f"fitting {method} ({metric}, {combine}{', calibrated' if calibrate else ''}) on {m} members x {n} samples x {c} classes")
    fitted = fit_fold(log_probs, labels, spec)
    cal = calibrated(log_probs, fitted.temperatures) if calibrate else log_probs
    in_sample_lp = fitted.predict(log_probs, cal)
    score_names = reported_metrics(metric)
    in_sample = {name: _scores(in_sample_lp[name], labels, score_names) for name in BASELINES}
    in_sample["best_member"]["member"] = names[fitted.best_member]

    # Member rows: scores at each member's own temperature, and raw.
    all_members = []
    for j, (p, name) in enumerate(zip(preds, names)):
        run = member_run(p)
        scores = _scores(cal[j], labels, score_names)
        raw = _scores(log_probs[j], labels, ("log_loss", "ece"))
        scores.update({"log_loss_raw": raw["log_loss"], "ece_raw": raw["ece"]})
        all_members.append(Member(
            name=name, backbone=p.backbone or _config_backbone(run), weight=float(fitted.search.weights_[j]),
            temperature=float(fitted.temperatures[j]) if fitted.search.weighted else 1.0,
            run=str(run) if run is not None else None,
            predictions=str(Path(p.source).resolve()) if p.source else None, scores=scores,
        ))
    if fitted.search.weighted:
        kept = [m for m in all_members if m.weight > ZERO_WEIGHT]
        dropped = [m for m in all_members if m.weight <= ZERO_WEIGHT]
        total = sum(m.weight for m in kept)
        for m in kept:
            m.weight /= total
    else:
        kept, dropped = all_members, []

    ens = Ensemble(
        classes=list(preds[0].classes), members=kept, method=method, metric=metric, combine=combine,
        calibrate=bool(calibrate), final_temperature=float(fitted.final_temperature), options=dict(spec.options),
        dropped=dropped,
    )
    if not fitted.search.weighted:
        ens.stacking = {"coef": fitted.search.coef_.tolist(), "intercept": fitted.search.intercept_.tolist(),
                        "clip": float(fitted.search.clip), "C": float(fitted.search.C_)}
    if cv:
        log(f"cross-validating: the same fit on {cv} x {cv - 1}/{cv} of the samples, each scored on the rest")
    cv_scores = cross_validate(log_probs, labels, spec, cv, seed) if cv else None
    if cv_scores is not None:
        cv_scores["best_member_picks"] = [names[i] for i in cv_scores["best_member_picks"]]
    ens.scores = {"target": metric, "samples": int(len(labels)), "in_sample": in_sample, "cv": cv_scores}
    ens.warnings = _warnings(ens)
    return ens


def _config_backbone(run: Path | None) -> str:
    if run is None:
        return ""
    return str(RunDir(run).read_config().get("backbone", ""))


def _warnings(ens: Ensemble) -> list[str]:
    metric = get_metric(ens.metric)
    out = []
    cv = ens.scores["cv"]
    target = ens.metric
    if cv is None:
        out.append("no cross-validation (cv=0): the in-sample scores were fitted and measured on the same rows and flatter the ensemble")
        return out
    ens_loss = metric.loss(cv["ensemble"][target])
    best_loss = metric.loss(cv["best_member"][target])
    equal_loss = metric.loss(cv["equal_weight"][target])
    if len(ens.members) == 1:
        out.append(f"the fit kept a single member ({ens.members[0].name}): no blend of these members beat it on validation")
    elif ens_loss >= best_loss:
        out.append(
            f"out of sample the ensemble does not beat the best single member ({target} {cv['ensemble'][target]:.4f} vs "
            f"{cv['best_member'][target]:.4f}, {cv['folds']}-fold CV); use that member alone, or add more diverse members "
            "or more validation data")
    if ens_loss > equal_loss and len(ens.members) + len(ens.dropped) > 1:
        in_sample = ens.scores["in_sample"]
        if metric.loss(in_sample["ensemble"][target]) > metric.loss(in_sample["equal_weight"][target]):
            if ens.calibrate and ens.method in ("greedy", "random") and target == "log_loss":
                why = (f"it is worse in-sample too: {ens.method} scores blends before the final temperature, which then "
                       "favours other weights; --method slsqp chooses weights and temperature together")
            else:
                why = f"it is worse in-sample too: {ens.method} found no better blend than equal weights here"
        else:
            fixes = {"greedy": "try --bags 20 or fewer --iterations",
                     "slsqp": "with this few validation rows, equal weights (or --method greedy --bags 20) may serve better"}
            why = "the weights over-fit the validation set; " + fixes.get(ens.method, "try --method greedy --bags 20, or slsqp")
        out.append(f"out of sample the fitted {ens.method} blend is worse than equal weights ({target} "
                   f"{cv['ensemble'][target]:.4f} vs {cv['equal_weight'][target]:.4f}): {why}")
    return out
