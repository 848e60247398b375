"""Plain-text tables for the terminal: what ``zoo correlate`` and ``zoo ensemble fit`` print."""

from __future__ import annotations

import math
from typing import Sequence

from ensemble.diversity import PAIRWISE_MEASURES, CorrelationReport
from ensemble.metrics import METRICS, reported_metrics
from ensemble.model import Ensemble

_TITLES = {"accuracy": "accuracy", "log_loss": "log loss", "ece": "ECE", "balanced_accuracy": "bal. acc.", "f1_macro": "F1 macro"}


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence], indent: int = 2) -> str:
    """Columns padded to their widest cell; text columns left-aligned, numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [i > 0 and all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)]
        lines.append(" " * indent + "  ".join(parts).rstrip())
        if k == 0:
            lines.append(" " * indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_fit_report(ens: Ensemble) -> str:
    """The members with their weights and temperatures, then the score table."""
    metrics = reported_metrics(ens.metric)
    titles = [_TITLES.get(m, m) for m in metrics]
    stacking = ens.method == "stacking"
    rows = [[m.name, m.backbone, m.weight, *(() if stacking else (m.temperature,)), *(m.scores.get(k) for k in metrics)]
            for m in sorted(ens.members, key=lambda m: -m.weight)]
    rows += [[m.name, m.backbone, 0.0, m.temperature, *(m.scores.get(k) for k in metrics)] for m in ens.dropped]
    if stacking:
        calib = "logistic regression on raw log-probabilities"
    else:
        calib = f"combine {ens.combine}, " + ("member temperatures, weights at T = 1, then a final temperature"
                                              if ens.calibrate else "no temperatures")
    out = [f"Ensemble: method {ens.method}, target {ens.metric}, {calib}; "
           f"{len(ens.members)} member(s) kept, {len(ens.dropped)} dropped (weight 0)",
           format_table(["member", "backbone", "importance" if stacking else "weight", *(() if stacking else ("T",)), *titles], rows)]
    if stacking:
        out.append(f"  importance: share of the regression's coefficient mass; L2 strength C = {ens.stacking.get('C', '-')}"
                   + ("; member scores after each member's own temperature" if ens.calibrate else ""))
    else:
        out.append(f"  final temperature {ens.final_temperature:.4f}" + (" (fitted after the weights, with them fixed)" if ens.calibrate else ""))
    scores = ens.scores
    cv = scores.get("cv")
    in_sample = scores["in_sample"]
    best_name = in_sample["best_member"].get("member", "")
    header = ["", *[f"{t} (fit)" for t in titles]]
    if cv:
        header += [f"{t} (cv)" for t in titles]
    score_rows = []
    for key, label in (("ensemble", "ensemble"), ("best_member", f"best member ({best_name})"), ("equal_weight", "equal weights")):
        row = [label, *(in_sample[key].get(m) for m in metrics)]
        if cv:
            row += [cv[key].get(m) for m in metrics]
        score_rows.append(row)
    samples = scores.get("samples")
    lead = [f"Scores on {samples} validation samples", "  (fit): in-sample, weights fitted and scored on the same rows"]
    if cv:
        lead.append(f"  (cv):  {cv['folds']}-fold cross-validation, each fold scored by a fit that never saw it")
    out += ["", *lead, format_table(header, score_rows)]
    if cv and cv.get("ensemble_by_fold"):
        folds = cv["ensemble_by_fold"]
        mean = sum(folds) / len(folds)
        sd = math.sqrt(sum((f - mean) ** 2 for f in folds) / max(len(folds) - 1, 1))
        out.append(f"  ensemble {_TITLES.get(ens.metric, ens.metric)} per fold: {', '.join(fmt(f) for f in folds)} "
                   f"(mean {fmt(mean)} ± {fmt(sd)})")
    better = "higher" if METRICS[ens.metric].greater_is_better else "lower"
    out.append(f"  target {ens.metric}: {better} is better")
    return "\n".join(out)


def format_correlation(report: CorrelationReport, measure: str = "prob_corr") -> str:
    """Members' scores, the chosen measure as a matrix, the set's kappa, the suggested subset."""
    m = PAIRWISE_MEASURES[measure]
    index = [f"[{i}]" for i in range(len(report.names))]
    out = [f"{len(report.names)} members, {report.n_samples} samples ({report.n_labelled} labelled)",
           format_table(["", "member", "backbone", "accuracy", "log loss", "ECE"],
                        [[ix, n, b, s["accuracy"], s["log_loss"], s["ece"]]
                         for ix, n, b, s in zip(index, report.names, report.backbones, report.models)]),
           "",
           f"{m.title} ({m.description}; alike when {m.alike_when}):",
           format_table(["", *index], [[f"{ix} {n}", *(float(v) for v in row)]
                                       for ix, n, row in zip(index, report.names, report.matrices[measure])])]
    pairs = report.pairs()
    if pairs:
        key = (lambda p: -p[measure] if not math.isnan(p[measure]) else math.inf) if m.alike_when == "high" else \
              (lambda p: p[measure] if not math.isnan(p[measure]) else math.inf)
        ranked = sorted(pairs, key=key)
        out += ["", f"most alike pair: {ranked[0]['a']} / {ranked[0]['b']} ({m.title} {fmt(ranked[0][measure])}); "
                    f"least alike: {ranked[-1]['a']} / {ranked[-1]['b']} ({fmt(ranked[-1][measure])})"]
    out.append(f"Kuncheva-Whitaker kappa of the set: {fmt(report.kappa)} (1 = right on the same samples, 0 = independent)")
    if report.subset:
        out += ["", f"suggested subset of {len(report.subset)} (greedy: strongest first, then the member that most lowers "
                    "the equal-weight log loss; a correlated member lowers it little):",
                format_table(["step", "member", "subset log loss", "max corr. with earlier"],
                             [[i + 1, s.name, s.subset_log_loss, s.max_corr] for i, s in enumerate(report.subset)])]
    return "\n".join(out)
