"""Fit an ensemble on validation predictions, and say honestly what it is worth.

``fit_ensemble`` fits, in stages, member temperatures, the weight search and a final
temperature on all validation rows (the ensemble it returns), then repeats the whole fit
K times on K-1 folds and scores each held-out fold (the cross-validated scores). Weights
fitted and scored on the same rows flatter the ensemble; the held-out scores do not. The
baselines, the best single member and the equal-weight average, go through the same
folds: the best member is chosen on the training folds, never on the fold it is scored on.

Staged calibration (pool, then calibrate; Rahaman & Thiery, NeurIPS 2021): each member's
temperature first, then the weights on the calibrated probabilities at T = 1, then the
final temperature alone with the weights fixed. Nothing picks weights and a temperature
together: a member with no information, softened to near uniform, would then serve as a
probability floor that a sharp final temperature turns into a calibration map.

Cost. The members are one float32 stack [M, N, C] of log-probabilities, read file by
file (``read_members``); nothing else as large is made. Temperatures are applied on the
fly; a fold is an index array of rows, never a copy of the stack; for the default
(arithmetic rule, log loss) the weight search sees only each member's probability of the
true class, [N, M]; scalar temperatures are fitted by Newton's method on a seeded sample
of at most ``TEMPERATURE_ROWS`` of the fitting rows; the in-sample fit and the folds run
two at a time in threads (numpy releases the GIL).

Only numpy and scipy here (scikit-learn for stacking): no torch. (Over 400 lines: the
reading, the fold fit, cross-validation and the report's scores share the stack and the
row-index conventions; splitting them would scatter one pipeline.)
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ensemble.calibration import at_bound, fit_temperature, log_softmax_into, subsample_rows, TEMPERATURE_BOUNDS
from ensemble.combine import combine, get_combine_rule
from ensemble.metrics import RowStats, get_metric, reported_metrics, row_stats
from ensemble.members import check_oof_members, check_same_kind_of_rows, member_names, member_run
from ensemble.model import Ensemble, Member
from ensemble.weights import ZERO_WEIGHT, ConvergenceWarning, blas_threads, get_weight_search, make_search
from zoo.errors import UserInputError
from zoo.rundir import RunDir
from zoo.predictions import Predictions, align_predictions, load_predictions
from zoo.progress import progress as progress_bar

BASELINES = ("ensemble", "best_member", "equal_weight")
# Rows a scalar temperature is fitted on, at most (a seeded sample of the fitting rows).
# One scalar needs few: on 50,000 x 100 synthetic members, T fitted on 10,000 sampled
# rows was within 1 % of T on all rows and the log loss on all rows within 4e-5 nats of
# its minimum, at 5x less time per fit; member, final and equal-weight temperatures use it.
TEMPERATURE_ROWS = 10_000


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
        return make_search(self.method, self.metric, self.combine, self.seed, **self.options)

    @property
    def true_class_only(self) -> bool:
        """Whether the weight search needs only each member's true-class probability."""
        return self.combine == "arithmetic" and self.metric == "log_loss" and get_weight_search(self.method).weighted


# ---------------------------------------------------------------------------------------
# Members.


@dataclass
class MemberStack:
    """Aligned members: ``preds`` (their metadata; each one's ``logits`` is a view of its
    row of ``log_probs``), ``log_probs`` float32 [M, N, C] and ``labels`` [N]."""

    preds: list[Predictions]
    log_probs: np.ndarray
    labels: np.ndarray


def stack_log_probs(preds: Sequence[Predictions]) -> np.ndarray:
    """Stacked member log-probabilities [M, N, C], float32 (rows already aligned)."""
    out = np.empty((len(preds), *preds[0].logits.shape), dtype=np.float32)
    for j, p in enumerate(preds):
        log_softmax_into(p.logits, out[j])
    return out


def read_members(sources: Sequence[str | os.PathLike], split: str = "auto") -> MemberStack:
    """Read run directories or prediction files one at a time into one stack.

    What ``load_prediction_sources`` then ``align_predictions`` do, without holding every
    file's logits and the stack at once: each file's rows are aligned to the first file's
    ids and written, as log-probabilities, into its row of the stack; its own logits are
    then dropped (its ``Predictions`` keeps a view of the stack). Labels and the folds of
    out-of-fold members are checked once, by ``fit_ensemble`` (``prepare_members``).
    """
    from ensemble.predict import resolve_split

    if len(sources) == 0:
        raise UserInputError("no members given; pass run directories or validation prediction files")
    split = resolve_split(sources, split)
    preds: list[Predictions] = []
    stack = None
    for j, source in enumerate(sources):
        p = load_predictions(source, split=split)
        if stack is None:
            stack = np.empty((len(sources), *p.logits.shape), dtype=np.float32)
        else:
            p = align_predictions([preds[0], p])[1]
        log_softmax_into(p.logits, stack[j])
        p.logits = stack[j]
        preds.append(p)
    check_same_kind_of_rows(preds)  # as load_prediction_sources does
    return MemberStack(preds, stack, preds[0].labels)  # checked once, by prepare_members


def prepare_members(members: Sequence[Predictions] | MemberStack) -> MemberStack:
    """Align ``members`` by id (unless already a ``MemberStack``); refuse unknown labels and
    out-of-fold members cross-fitted on different folds."""
    if isinstance(members, MemberStack):
        return _checked(members)
    if len(members) == 0:
        raise UserInputError("no members given; pass run directories or validation prediction files")
    preds = align_predictions(members)
    return _checked(MemberStack(list(preds), stack_log_probs(preds), preds[0].labels))


def _checked(members: MemberStack) -> MemberStack:
    check_oof_members(members.preds)
    # Any member's file: which one is first on the command line must not decide whether the fit runs.
    unlabelled = next((p for p in members.preds if (p.labels < 0).any()), None)
    if unlabelled is not None:
        labels = unlabelled.labels
        row = int(np.argmax(labels < 0))
        raise UserInputError(
            f"{unlabelled.source or unlabelled.name}: {int((labels < 0).sum())} of {len(labels)} samples have no label "
            f"(-1; first id {unlabelled.ids[row]!r}); fitting needs labelled validation predictions, not test ones"
        )
    return members


# ---------------------------------------------------------------------------------------
# One fit (all rows, or one CV fold's training rows) and its predictions.


def _sub(labels: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    return labels if rows is None else labels[rows]


def fit_temperatures(log_probs: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """One temperature per member, fitted on the log loss of ``rows`` (all when None)."""
    return np.array([fit_temperature(log_probs[j], labels, rows).temperature for j in range(len(log_probs))])


def calibrated(log_probs: np.ndarray, temperatures: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """A tempered copy [M, n, C] of ``rows``: for the searches that need every class
    (greedy or random on a label metric, the geometric rule)."""
    n = log_probs.shape[1] if rows is None else len(rows)
    out = np.empty((len(log_probs), n, log_probs.shape[2]), dtype=log_probs.dtype)
    for j in range(len(log_probs)):
        out[j] = combine(log_probs[j:j + 1], np.ones(1), "geometric", temperatures[j:j + 1], rows)
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
    member_stats: list[RowStats] | None = None  # each calibrated member on these rows, when computed

    @property
    def _temps(self) -> np.ndarray | None:
        return self.temperatures if self.spec.calibrate else None  # None: log-probabilities as they are

    def predict(self, log_probs: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None) -> dict[str, RowStats]:
        """``RowStats`` of the ensemble and the baselines on ``rows`` (all when None)."""
        m = len(log_probs)
        y = _sub(labels, rows)
        if self.search.weighted:
            blend = combine(log_probs, self.search.weights_, self.spec.combine, self._temps, rows)
            ens = row_stats(blend, y, _or_none(self.final_temperature))
        else:  # stacking: fitted on raw log-probabilities
            ens = row_stats(self.search.predict_log_proba(_take(log_probs, rows)), y)
        if self.member_stats is not None and rows is None:
            best = self.member_stats[self.best_member]
        else:
            best = row_stats(log_probs[self.best_member], labels, _member_t(self._temps, self.best_member), rows)
        equal = combine(log_probs, np.full(m, 1.0 / m), self.spec.combine, self._temps, rows)
        return {"ensemble": ens, "best_member": best, "equal_weight": row_stats(equal, y, _or_none(self.equal_final_temperature))}


def _or_none(temperature: float) -> float | None:
    return None if temperature == 1.0 else temperature


def _member_t(temps: np.ndarray | None, j: int) -> float | None:
    return None if temps is None else float(temps[j])


def _take(log_probs: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    return log_probs if rows is None else np.take(log_probs, rows, axis=1)


def _final_temperature(log_probs, labels, weights, spec: FitSpec, temps, rows) -> float:
    """The temperature of the blend with these weights, fitted alone after them."""
    if not spec.calibrate:
        return 1.0
    blend = combine(log_probs, weights, spec.combine, temps, rows)
    return fit_temperature(blend, _sub(labels, rows)).temperature


def fit_fold(log_probs: np.ndarray, labels: np.ndarray, spec: FitSpec, rows: np.ndarray | None = None) -> FittedFold:
    """Fit temperatures, the weight search, the final temperature and the baselines on
    ``rows`` of the stack only (all when None), in that order."""
    m, n_all, c = log_probs.shape
    y = _sub(labels, rows)
    sample = subsample_rows(n_all, TEMPERATURE_ROWS, spec.seed, rows)  # the rows scalar temperatures are fitted on
    temperatures = fit_temperatures(log_probs, labels, sample) if spec.calibrate else np.ones(m)
    temps = temperatures if spec.calibrate else None
    search = spec.search()
    metric = get_metric(spec.metric)
    stats = None
    if spec.true_class_only:
        stats = [row_stats(log_probs[j], labels, _member_t(temps, j), rows) for j in range(m)]
        search.fit_true_probs(np.exp(np.stack([s.true_log_prob for s in stats], axis=1)))
        member_losses = np.array([metric.loss(s.scores(y, c, [spec.metric])[spec.metric]) for s in stats])
    else:
        cal = calibrated(log_probs, temperatures, rows) if spec.calibrate else _take(log_probs, rows)
        search.fit(cal if search.weighted else _take(log_probs, rows), y)
        member_losses = np.array([metric.loss(row_stats(cal[j], y).scores(y, c, [spec.metric])[spec.metric]) for j in range(m)])
        del cal
    if search.weighted:
        # One member alone is already at its own temperature: a second one would only
        # sharpen it further where validation is separable.
        alone = np.count_nonzero(search.weights_) == 1
        final = 1.0 if alone else _final_temperature(log_probs, labels, search.weights_, spec, temps, sample)
    else:
        final = 1.0
    equal_final = _final_temperature(log_probs, labels, np.full(m, 1.0 / m), spec, temps, sample)
    return FittedFold(spec, temperatures, search, final, int(np.argmin(member_losses)), equal_final, member_losses, stats)


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


def _fits(log_probs: np.ndarray, labels: np.ndarray, spec: FitSpec, in_sample: bool, folds: Sequence[np.ndarray],
          progress: bool | None = None):
    """The in-sample fit (when asked) and one fit per fold, each on its training rows and
    predicting its held-out rows: ``(fitted, predicted)`` in that order. Two at a time in
    threads (numpy releases the GIL in its loops), the largest first. ``progress``: see ``zoo.progress``."""
    n = len(labels)

    def one(test: np.ndarray | None):
        if test is None:
            fitted = fit_fold(log_probs, labels, spec)
            return fitted, fitted.predict(log_probs, labels)
        train = np.setdiff1d(np.arange(n), test, assume_unique=True)
        fitted = fit_fold(log_probs, labels, spec, train)
        return fitted, fitted.predict(log_probs, labels, test)

    tasks = ([None] if in_sample else []) + list(folds)
    workers = min(len(tasks), os.cpu_count() or 1, 2)
    desc = "fitting the ensemble" + (f" (in-sample and {len(folds)} CV folds)" if in_sample and folds else
                                     f" ({len(folds)} CV folds)" if folds else "")
    results = []
    with progress_bar(len(tasks), desc, unit="fits", enabled=progress) as bar, ThreadPoolExecutor(workers) as pool:
        for result in pool.map(one, tasks):  # collected on this thread, where the bar moves
            results.append(result)
            bar.update(1)
    return results


def _cv_scores(labels: np.ndarray, n_classes: int, spec: FitSpec, folds, results) -> dict[str, Any]:
    """Scores of the pooled out-of-fold predictions; ``ensemble_by_fold``: the target metric of each fold."""
    pooled = {name: RowStats.empty(len(labels)) for name in BASELINES}
    by_fold, picks = [], []
    for test, (fitted, predicted) in zip(folds, results):
        for name in BASELINES:
            pooled[name].put(test, predicted[name])
        by_fold.append(predicted["ensemble"].scores(labels[test], n_classes, [spec.metric])[spec.metric])
        picks.append(fitted.best_member)
    names = reported_metrics(spec.metric)
    result: dict[str, Any] = {"folds": len(folds), "seed": spec.seed}
    for name in BASELINES:
        result[name] = pooled[name].scores(labels, n_classes, names)
    result["ensemble_by_fold"] = by_fold
    result["best_member_picks"] = picks
    return result


# ---------------------------------------------------------------------------------------
# The whole fit.


def fit_ensemble(members: Sequence[Predictions] | MemberStack, method: str = "slsqp", metric: str = "log_loss",
                 combine: str = "arithmetic", calibrate: bool = True, cv: int = 5, seed: int = 0,
                 options: dict[str, Any] | None = None, log: Callable[[str], None] | None = None,
                 progress: bool | None = None) -> Ensemble:
    """Fit an ensemble of ``members`` (validation predictions, or a ``MemberStack`` from
    ``read_members``) and score it.

    method: a name from ``WEIGHT_SEARCHES``; metric: the target (``SEARCHABLE_METRICS``,
    what the method supports); combine: ``arithmetic`` or ``geometric``; calibrate: fit a
    temperature per member, then the weights, then one temperature after combining; cv:
    folds for the held-out scores (0: none); options: weight-search constructor arguments
    (see ``weights.search_kwargs``); log: called with progress lines; progress: False hides
    the progress of the fits (``zoo.progress``: a bar on a terminal, a line per tenth elsewhere). Returns the
    ``Ensemble``, zero-weight members moved to ``dropped``, with ``scores['in_sample']``,
    ``scores['cv']`` and ``warnings`` (the optimisers' convergence warnings and members
    whose temperature sits at a bound included).
    """
    # One BLAS thread for the whole fit, set once here: the folds run in threads, and
    # limits entered and left by concurrent threads would not restore cleanly.
    with warnings.catch_warnings(record=True) as caught, blas_threads():
        warnings.simplefilter("always", ConvergenceWarning)
        ens = _fit_ensemble(members, method, metric, combine, calibrate, cv, seed, options, log or (lambda _: None), progress)
    for w in caught:
        if issubclass(w.category, ConvergenceWarning) and str(w.message) not in ens.warnings:
            ens.warnings.append(str(w.message))
        elif not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ens


def _fit_ensemble(members, method, metric, combine, calibrate, cv, seed, options, log, progress=None) -> Ensemble:
    spec = FitSpec(method, metric, combine, bool(calibrate), int(seed), dict(options or {}))
    spec.search()  # refuse bad options before any work
    get_combine_rule(combine)
    if cv != 0 and not (isinstance(cv, (int, np.integer)) and cv >= 2):
        raise UserInputError(f"cv: expected 0 (no cross-validation) or a number of folds >= 2, got {cv!r}")
    stack = prepare_members(members)
    preds, log_probs, labels = stack.preds, stack.log_probs, stack.labels
    folds = cv_folds(labels, cv, seed) if cv else []  # too few samples: say so before any fit
    names = member_names(preds)
    m, n, c = log_probs.shape
    log(f"fitting {method} ({metric}, {combine}{', calibrated' if calibrate else ''}) on {m} members x {n} samples x {c} classes"
        + (f", then the same fit on {cv} x {cv - 1}/{cv} of the samples, each scored on the rest" if cv else ""))
    results = _fits(log_probs, labels, spec, True, folds, progress)
    fitted, in_sample_stats = results[0]
    score_names = reported_metrics(metric)
    in_sample = {name: in_sample_stats[name].scores(labels, c, score_names) for name in BASELINES}
    in_sample["best_member"]["member"] = names[fitted.best_member]

    # Member rows: scores at each member's own temperature, and raw.
    all_members = []
    for j, (p, name) in enumerate(zip(preds, names)):
        run = member_run(p)
        cal = fitted.member_stats[j] if fitted.member_stats is not None else \
            row_stats(log_probs[j], labels, _member_t(fitted._temps, j))
        scores = cal.scores(labels, c, score_names)
        raw = row_stats(log_probs[j], labels).scores(labels, c, ("log_loss", "ece"))
        scores.update({"log_loss_raw": raw["log_loss"], "ece_raw": raw["ece"]})
        all_members.append(Member(
            name=name, backbone=p.backbone or _config_backbone(run), weight=float(fitted.search.weights_[j]),
            temperature=float(fitted.temperatures[j]) if fitted.search.weighted else 1.0,
            run=str(run) if run is not None else None,
            predictions=str(Path(p.source).resolve()) if p.source else None, scores=scores, tta=int(p.tta),
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
    cv_scores = _cv_scores(labels, c, spec, folds, results[1:]) if cv else None
    if cv_scores is not None:
        cv_scores["best_member_picks"] = [names[i] for i in cv_scores["best_member_picks"]]
    ens.scores = {"target": metric, "samples": int(len(labels)), "in_sample": in_sample, "cv": cv_scores}
    ens.warnings = _temperature_warnings(all_members) if calibrate and fitted.search.weighted else []
    ens.warnings += _warnings(ens)
    return ens


def _temperature_warnings(members: Sequence[Member]) -> list[str]:
    """A member whose temperature sits at a bound: name it, and say what that means."""
    out = []
    for m in members:
        side = at_bound(m.temperature)
        if side == "upper":
            out.append(f"member {m.name}: temperature {m.temperature:.2f} is at its upper bound "
                       f"({TEMPERATURE_BOUNDS[1]:g}): its predictions carry almost no information about the labels")
        elif side == "lower":
            out.append(f"member {m.name}: temperature {m.temperature:.2f} is at its lower bound "
                       f"({TEMPERATURE_BOUNDS[0]:g}): validation asks for sharper predictions than the bound allows (a "
                       "member right on nearly every row, or one whose logits are nearly flat); its calibration says "
                       "little about new data")
    return out


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
            if ens.calibrate and ens.method != "stacking" and target == "log_loss":
                why = (f"it is worse in-sample too: {ens.method} chooses weights at T = 1, before the final temperature, "
                       "and equal weights gain more from theirs; prefer equal weights here")
            else:
                why = f"it is worse in-sample too: {ens.method} found no better blend than equal weights here"
        else:
            fixes = {"greedy": "try --bags 20 or fewer --iterations",
                     "slsqp": "with this few validation rows, equal weights (or --method greedy --bags 20) may serve better"}
            why = "the weights over-fit the validation set; " + fixes.get(ens.method, "try --method greedy --bags 20, or slsqp")
        out.append(f"out of sample the fitted {ens.method} blend is worse than equal weights ({target} "
                   f"{cv['ensemble'][target]:.4f} vs {cv['equal_weight'][target]:.4f}): {why}")
    return out
