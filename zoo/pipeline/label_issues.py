"""Suspected label errors among the pool images: confident learning on out-of-fold probabilities.

A cross-fitted zoo predicts every pool image with a model that never trained on it, which is
what confident learning (Northcutt et al., JAIR 2021) needs: ``cleanlab`` estimates how often
each given label is confused with each other class from those probabilities and flags the
images whose given label the probabilities contradict beyond that (``find_label_issues``,
pruned by noise rate). zoo supplies the probabilities, the ids and the classes; cleanlab does
the finding and the ranking (its label-quality score, the normalized margin: low = suspect).

Only out-of-fold rows are honest here: a single-split member trained on the images it would
judge, so it is refused. An ensemble's probabilities combine its members' out-of-fold rows with
its temperatures and weights; those few numbers were fitted on the same rows, which leaves the
probabilities very nearly out of sample.

``cleanlab`` is an optional extra (``pip install 'zoo-ensemble[clean]'``), imported only here.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ensemble.members import check_oof_members, member_names
from zoo import atomic
from zoo.errors import UserInputError
from zoo.predictions import Predictions, load_predictions, mean_probability, read_predictions
from zoo.rundir import RunDir

RANK_METHOD = "normalized_margin"  # cleanlab's label-quality score that ranks the suspects
CLEANLAB_MISSING = "finding label issues needs cleanlab: pip install 'zoo-ensemble[clean]' (or pip install cleanlab)"
# cleanlab's rules for which images to flag (``find_label_issues(filter_by=...)``); the first is its default.
FILTERS = {
    "prune_by_noise_rate": "per pair of classes, as many images as the confident joint says were given the wrong one of "
                           "the two, those with the largest margin for the other class (cleanlab's default)",
    "prune_by_class": "per given class, as many images as the confident joint says are mislabeled, least confident first",
    "both": "flagged by prune_by_noise_rate and by prune_by_class",
    "confident_learning": "off the diagonal of the confident joint: the probability of another class above that class's "
                          "threshold (its mean self-confidence)",
    "predicted_neq_given": "the most probable class is not the given one (the simplest rule, not confident learning)",
}
COLUMNS = ("rank", "id", "given_label", "suggested_label", "self_confidence", "label_quality")


def cleanlab_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("cleanlab") is not None


@dataclass
class LabelIssues:
    """Every pool image, most suspect first, and which of them cleanlab flags."""

    ids: list[str]
    given: np.ndarray  # int [N]: the dataset's label
    suggested: np.ndarray  # int [N]: the most probable class
    self_confidence: np.ndarray  # [N]: the probability of the given label
    quality: np.ndarray  # [N]: cleanlab's label-quality score (RANK_METHOD); ascending
    flagged: np.ndarray  # bool [N]: cleanlab's find_label_issues
    classes: list[str]
    source: str  # whose probabilities: an ensemble, an average of members, or one member
    filter_by: str = "prune_by_noise_rate"  # cleanlab's rule for flagging (FILTERS)

    @property
    def n_flagged(self) -> int:
        return int(self.flagged.sum())

    def csv_text(self) -> str:
        """The flagged images, most suspect first: ``rank,id,given_label,suggested_label,self_confidence,label_quality``
        (a file ``zoo finetune --exclude`` takes as it is)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        for rank, i in enumerate(np.flatnonzero(self.flagged), start=1):
            writer.writerow([rank, self.ids[i], self.classes[self.given[i]], self.classes[self.suggested[i]],
                             f"{self.self_confidence[i]:.6f}", f"{self.quality[i]:.6f}"])
        return buffer.getvalue()

    def summary(self) -> str:
        n = len(self.ids)
        return (f"{self.n_flagged} of {n} pool images ({self.n_flagged / max(n, 1):.1%}) flagged as label issues by "
                f"cleanlab (filter_by={self.filter_by}) on the out-of-fold probabilities of {self.source}")


def find_label_issues(preds: Predictions, source: str = "", filter_by: str = "prune_by_noise_rate") -> LabelIssues:
    """Rank ``preds``' rows (out-of-fold, labelled) by cleanlab's label quality and flag its label issues
    (``filter_by``: one of ``FILTERS``)."""
    if filter_by not in FILTERS:
        raise UserInputError(f"--filter-by must be one of {list(FILTERS)}, got {filter_by!r}")
    try:
        from cleanlab.filter import find_label_issues as cleanlab_find
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise UserInputError(CLEANLAB_MISSING) from None
    labels = np.asarray(preds.labels, dtype=np.int64)
    where = preds.source or source or "the predictions"
    if (labels < 0).any():
        raise UserInputError(f"{where}: {int((labels < 0).sum())} rows have no label; label issues need the given labels")
    probs = preds.probabilities().astype(np.float64)
    probs /= probs.sum(axis=1, keepdims=True)
    quality = get_label_quality_scores(labels, probs, method=RANK_METHOD)
    flagged = cleanlab_find(labels, probs, filter_by=filter_by, n_jobs=1)
    order = np.lexsort((np.array(preds.ids), quality))  # most suspect first; ties by id, so the order is reproducible
    return LabelIssues(ids=[preds.ids[i] for i in order], given=labels[order], suggested=probs.argmax(axis=1)[order],
                       self_confidence=probs[order, labels[order]], quality=quality[order], flagged=flagged[order],
                       classes=list(preds.classes), source=source or preds.name, filter_by=filter_by)


def write_label_issues(path: str | os.PathLike, issues: LabelIssues) -> Path:
    return atomic.write_text(Path(path), issues.csv_text())


# ---------------------------------------------------------------------------------------
# Whose probabilities: runs, prediction files or an ensemble file.


def _out_of_fold(source: str | os.PathLike) -> Predictions:
    """A member's out-of-fold rows; a member without them (single-split) is refused."""
    source = Path(source)
    if source.is_dir() and RunDir(source).is_run() and not RunDir(source).predictions("oof").is_file():
        raise UserInputError(f"{source}: no out-of-fold predictions (a single-split run trained on the images it would judge, "
                             "so its probabilities of them are not honest); cross-fit it with `zoo finetune ... --folds 5`")
    preds = load_predictions(source, "oof") if source.is_dir() else read_predictions(source)
    if preds.split != "oof":
        raise UserInputError(f"{source}: holds {preds.split or 'unnamed'} predictions, not out-of-fold ones; pass a cross-fitted "
                             "run (`zoo finetune ... --folds 5`) or its predictions/oof.safetensors")
    return preds


def ensemble_out_of_fold(path: str | os.PathLike) -> tuple[Predictions, str]:
    """The ensemble's probabilities of the pool images: its members' out-of-fold rows, combined as it predicts."""
    from ensemble.file import read_ensemble
    from ensemble.predict import ensemble_predictions

    ens = read_ensemble(path).without_zero_weights()
    missing = [m.name for m in ens.members if not (m.run or m.predictions)]
    if missing:
        raise UserInputError(f"{path}: member(s) {', '.join(missing)} name no run directory or prediction file to read "
                             "out-of-fold rows from; pass the cross-fitted runs instead")
    member_preds = [_out_of_fold(m.run or m.predictions) for m in ens.members]
    check_oof_members(member_preds)  # the same folds, else a row is in one member's training
    source = f"the ensemble {path} (" + ", ".join(f"{m.name} {m.weight:.2f}" for m in ens.members) + ")"
    return ensemble_predictions(ens, member_preds, "oof", member_preds[0].tta, str(path)), source


def out_of_fold_probabilities(sources: Sequence[str | os.PathLike]) -> tuple[Predictions, str]:
    """``(predictions, what they are)``: an ensemble file's combined out-of-fold rows, one member's, or the
    equal-weight average of several members' (cross-fitted on the same folds)."""
    if not sources:
        raise UserInputError("pass an ensemble file (ens.json) or one or more cross-fitted runs")
    if len(sources) == 1 and str(sources[0]).endswith(".json"):
        return ensemble_out_of_fold(sources[0])
    if any(str(s).endswith(".json") for s in sources):
        raise UserInputError("pass one ensemble file (ens.json) alone, or runs and prediction files, not both")
    preds = [_out_of_fold(s) for s in sources]
    if len(preds) == 1:
        return preds[0], member_names(preds)[0]
    check_oof_members(preds)
    source = f"the equal-weight average of {', '.join(member_names(preds))}"
    return mean_probability(preds, backbone=source, split="oof"), source


def label_issues(sources: Sequence[str | os.PathLike], filter_by: str = "prune_by_noise_rate") -> LabelIssues:
    """``zoo label-issues``: the pool images whose given label the out-of-fold probabilities of ``sources`` contradict."""
    preds, source = out_of_fold_probabilities(sources)
    return find_label_issues(preds, source, filter_by)
