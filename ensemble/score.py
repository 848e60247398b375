"""Score a fitted ensemble on a holdout: ``zoo ensemble score``.

Every member (kept and dropped, each at its raw probabilities), the equal-weight average
(plain mean of all members' raw probabilities) and the fitted ensemble, on labelled
predictions that the weights never saw. Returns a ``ScoreTable``; the command prints it.
Scoring members run on images is the pipeline's (``zoo.pipeline.member_inference``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ensemble.combine import combine
from ensemble.file import open_ensemble
from ensemble.fit import stack_log_probs
from ensemble.metrics import REPORTED_METRICS, score_table_from_log_probs
from ensemble.model import Ensemble, Member
from ensemble.predict import match_by_run_or_backbone
from zoo import atomic
from zoo.errors import UserInputError
from zoo.predictions import Predictions, align_predictions

SCORE_SUFFIXES = (".csv", ".json")


@dataclass
class ScoreRow:
    name: str
    kind: str  # "member", "dropped member", "equal weights", "ensemble"
    weight: float | None
    accuracy: float
    log_loss: float
    ece: float
    note: str = ""


@dataclass
class ScoreTable:
    rows: list[ScoreRow]
    split: str
    samples: int
    best_member: str
    notes: list[str] = field(default_factory=list)
    fitted_rows: bool = False  # scored on the rows the ensemble was fitted on: not a holdout


def _fitted_on(ens: Ensemble, preds: Sequence[Predictions]) -> bool:
    """Whether these are the prediction files the ensemble's weights and temperatures were fitted on."""
    def same_file(a: str | None, b: str | None) -> bool:
        return bool(a and b) and Path(a).resolve() == Path(b).resolve()

    return any(same_file(p.source, m.predictions) for m, p in zip(ens.members, preds))


def match_members(everyone: Sequence[Member], preds: Sequence[Predictions], classes: list[str], where: str) -> list[Predictions]:
    """One prediction set per member, kept and dropped alike, in ``everyone``'s order: by run
    directory, else by a backbone only one member has. Files of other classes are refused."""
    matched, _ = match_by_run_or_backbone(everyone, preds, classes, where)
    missing = [m.name for i, m in enumerate(everyone) if i not in matched]
    if missing:
        raise UserInputError(f"{where}: no prediction file for member(s) {', '.join(missing)} among the {len(preds)} given; "
                             "scoring needs every member's predictions, dropped ones included (pass their run directories)")
    return [matched[i] for i in range(len(everyone))]


def score_ensemble(ensemble: Ensemble | str | os.PathLike, predictions: Sequence[Predictions], split: str = "test"
                   ) -> ScoreTable:
    """Scores of every member, the equal-weight average and the ensemble on labelled rows of the members'
    prediction files (kept and dropped members alike), matched to members by run directory or backbone."""
    ens, where = open_ensemble(ensemble)
    everyone = list(ens.members) + list(ens.dropped)
    if not predictions:
        raise UserInputError(f"{where}: no prediction files given; scoring needs every member's predictions, dropped ones "
                             f"included ({', '.join(m.name for m in everyone)})")
    preds = match_members(everyone, predictions, ens.classes, where)
    return score_member_predictions(ens, preds, preds[0].split or split, where)


def score_member_predictions(ens: Ensemble, preds: Sequence[Predictions], split: str, where: str) -> ScoreTable:
    """``score_ensemble`` on one prediction set per member, kept members first, then the dropped ones."""
    everyone = list(ens.members) + list(ens.dropped)
    mismatches = ens.tta_mismatches([p.tta for p in preds[:len(ens.members)]])
    preds = align_predictions(preds)
    labels = preds[0].labels
    unlabelled = next((p for p in preds if len(p.labels) == 0 or (p.labels < 0).any()), None)
    if unlabelled is not None:
        unknown = int((unlabelled.labels < 0).sum())
        raise UserInputError(f"{unlabelled.source or where}: {unknown} of {len(labels)} rows have no label (-1); "
                             "scoring needs labelled predictions of a holdout (e.g. --split test of a labelled test/ folder)")
    log_probs = stack_log_probs(preds)  # [M, N, C] float32
    kept = len(ens.members)
    rows = []
    for i, (m, lp) in enumerate(zip(everyone, log_probs)):
        s = score_table_from_log_probs(lp, labels, REPORTED_METRICS)
        rows.append(ScoreRow(m.name, "member" if i < kept else "dropped member", m.weight if i < kept else 0.0,
                             s["accuracy"], s["log_loss"], s["ece"], "raw probabilities (T = 1)"))
    best = min(rows, key=lambda r: (r.log_loss, -r.accuracy))
    best.note += "; best single member (log loss)"
    equal = combine(log_probs, np.full(len(log_probs), 1.0 / len(log_probs)), "arithmetic")
    s = score_table_from_log_probs(equal, labels, REPORTED_METRICS)
    rows.append(ScoreRow("equal weights", "equal weights", None, s["accuracy"], s["log_loss"], s["ece"],
                         f"plain mean of all {len(log_probs)} members' raw probabilities"))
    s = score_table_from_log_probs(ens.predict_log_proba(log_probs[:kept]), labels, REPORTED_METRICS)
    rows.append(ScoreRow("ensemble", "ensemble", None, s["accuracy"], s["log_loss"], s["ece"],
                         f"{ens.method}, {kept} members, as fitted"))
    fitted_rows = _fitted_on(ens, preds)
    notes = ([f"these {len(labels)} rows are the ones the ensemble was fitted on (its weights and temperatures were chosen "
              "on them): the scores flatter it; score a holdout (e.g. --split test) to know how it does on new images"]
             if fitted_rows else
             [f"scored on {len(labels)} labelled rows of split {split!r}; these scores are honest only if no weight, "
              "temperature, epoch or setting was chosen on these rows, which only you can guarantee"])
    return ScoreTable(rows, split, len(labels), best.name, notes + mismatches, fitted_rows)


def format_score_table(table: ScoreTable) -> str:
    from ensemble.report import format_table

    body = [[r.name, r.kind, r.weight, r.accuracy, r.log_loss, r.ece, r.note] for r in table.rows]
    title = ("Scores on the rows the ensemble was fitted on, NOT a holdout" if table.fitted_rows else "Holdout scores")
    return "\n".join([f"{title} ({table.samples} rows, split {table.split}); best single member: {table.best_member}",
                      format_table(["", "kind", "weight", "accuracy", "log loss", "ECE", "note"], body)])


def write_score_table(path: str | os.PathLike, table: ScoreTable) -> Path:
    """``.csv``: one row per line of the table; ``.json``: the table with its notes."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return atomic.write_text(path, json.dumps(asdict(table), indent=2) + "\n")
    if suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["name", "kind", "weight", "accuracy", "log_loss", "ece", "note"])
        for r in table.rows:
            writer.writerow([r.name, r.kind, "" if r.weight is None else f"{r.weight:.6g}",
                             f"{r.accuracy:.6g}", f"{r.log_loss:.6g}", f"{r.ece:.6g}", r.note])
        return atomic.write_text(path, buffer.getvalue())
    raise UserInputError(f"{path}: --out must end in {' or '.join(SCORE_SUFFIXES)}, got {suffix or 'no suffix'!r}")
