"""Apply a fitted ensemble to its members' prediction files.

``predict_ensemble`` returns a ``Predictions`` whose logits are the ensemble's
log-probabilities; ``zoo.predictions.write_output`` writes it as a prediction file
(``.safetensors``) or as a CSV of ``id,prediction,<one probability column per class>``.
Running the members' checkpoints on images is the pipeline's job
(``zoo.pipeline.member_inference``), which hands the predictions to ``ensemble_predictions``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ensemble.file import open_ensemble
from ensemble.members import check_same_kind_of_rows, member_run
from ensemble.model import Ensemble, Member
from zoo.errors import UserInputError
from zoo.predictions import Predictions, align_predictions, load_predictions
from zoo.rundir import RunDir

SPLIT_AUTO = "auto"  # oof when every run is cross-fitted, else val


def same_path(a: str | os.PathLike | None, b: str | None) -> bool:
    """Whether two paths name the same file (False when either is missing)."""
    if not a or not b:
        return False
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _file_run(pred: Predictions) -> str | None:
    run = member_run(pred)
    return str(run) if run is not None else (pred.run or None)


def match_by_run_or_backbone(members: Sequence[Member], preds: Sequence[Predictions], classes: list[str],
                             where: str) -> tuple[dict[int, Predictions], list[Predictions]]:
    """``(matched, unmatched)``: each file matched to a member by its run directory, else by
    a backbone only one member has; a file matching nothing, or a member already matched,
    is unmatched. Files of other classes are refused."""
    for p in preds:
        if p.classes != classes:
            raise UserInputError(f"{p.source or p.name}: classes {p.classes} differ from {where}'s {classes}; "
                                 "pass predictions of the members this ensemble was fitted on")
    matched: dict[int, Predictions] = {}
    unmatched = []
    backbones = [m.backbone for m in members]
    for p in preds:
        run = _file_run(p)
        index = next((i for i, m in enumerate(members) if same_path(run, m.run)), None)
        if index is None and p.backbone and backbones.count(p.backbone) == 1:
            index = backbones.index(p.backbone)
        if index is None or index in matched:
            unmatched.append(p)
        else:
            matched[index] = p
    return matched, unmatched


def match_prediction_files(ens: Ensemble, preds: Sequence[Predictions], where: str = "ensemble",
                           log: Callable[[str], None] | None = None) -> list[Predictions]:
    """One prediction set per member, in member order.

    Files are matched to members by their run directory, else by a backbone that only one
    member has, else by the order given (same count only). Files that match a member that
    was dropped (zero weight), or nothing while every member was matched, are skipped.
    Files of other classes are refused.
    """
    matched, unmatched = match_by_run_or_backbone(ens.members, preds, ens.classes, where)
    if len(matched) == len(ens.members):
        for p in unmatched:
            dropped = any(same_path(_file_run(p), m.run) for m in ens.dropped)
            if log is not None:
                log(f"note: {p.source or p.name} skipped ({'zero weight in the ensemble' if dropped else 'not a member of the ensemble'})")
        return [matched[i] for i in range(len(ens.members))]
    if len(preds) == len(ens.members) and not matched:
        if log is not None:
            log("note: prediction files matched to members by the order given: "
                + ", ".join(f"{m.name} <- {p.source or p.name}" for m, p in zip(ens.members, preds)))
        return list(preds)
    missing = [m.name for i, m in enumerate(ens.members) if i not in matched]
    raise UserInputError(
        f"{where}: no prediction file for member(s) {', '.join(missing)} among the {len(preds)} given "
        f"(the ensemble has {len(ens.members)} members with nonzero weight: {', '.join(m.name for m in ens.members)}); "
        "pass one file per member, in member order or from their run directories"
    )


def predict_ensemble(ensemble: Ensemble | str | os.PathLike, predictions: Sequence[Predictions], split: str = "test",
                     log: Callable[[str], None] | None = None) -> Predictions:
    """The ensemble's predictions from its members' prediction files, matched to members by
    ``match_prediction_files`` (run directory, backbone, or the order given)."""
    ens, where = open_ensemble(ensemble)
    ens = ens.without_zero_weights()
    if not predictions:
        raise UserInputError(f"{where}: no prediction files given; pass one per member with a nonzero weight "
                             f"({', '.join(m.name for m in ens.members)})")
    member_preds = match_prediction_files(ens, predictions, where, log)
    return ensemble_predictions(ens, member_preds, member_preds[0].split or split, member_preds[0].tta, where, log)


def ensemble_predictions(ens: Ensemble, member_preds: Sequence[Predictions], split: str, tta: int, where: str,
                         log: Callable[[str], None] | None = None) -> Predictions:
    """Combine one prediction set per kept member (in member order) with the ensemble's temperatures and weights."""
    if log is not None:
        for warning in ens.tta_mismatches([p.tta for p in member_preds]):
            log(f"warning: {warning}")
    aligned = align_predictions(member_preds)
    log_probs = ens.predict_log_proba([p.logits for p in aligned])
    first = aligned[0]
    return Predictions(logits=log_probs.astype(np.float32), labels=first.labels, ids=first.ids, classes=ens.classes,
                       backbone="ensemble:" + "+".join(m.name for m in ens.members), run=str(where), split=split, tta=tta)


def resolve_split(sources: Sequence[str | os.PathLike], split: str) -> str:
    """The predictions to read from run directories: ``split``, or for ``auto`` the
    out-of-fold ones (``oof``) when every run has them, else ``val``.

    Mixing cross-fitted and single-split runs under ``auto`` is refused: their rows are
    different images (the whole pool against a validation split), and choosing for the
    user would silently drop one kind.
    """
    if split != SPLIT_AUTO:
        return split
    runs = [Path(s) for s in sources if Path(s).is_dir() and RunDir(s).is_run()]
    with_oof = [r for r in runs if RunDir(r).predictions("oof").is_file()]
    if with_oof and len(with_oof) < len(runs):
        without = next(r for r in runs if r not in with_oof)
        raise UserInputError(f"{with_oof[0]} has out-of-fold predictions (zoo finetune --folds) but {without} does not; "
                             "fit cross-fitted and single-split members apart, or say which predictions to read with "
                             "--split oof or --split val")
    return "oof" if with_oof else "val"


def load_prediction_sources(sources: Sequence[str | os.PathLike], split: str) -> list[Predictions]:
    """Prediction files, or run directories (their ``split`` predictions; ``auto``: see ``resolve_split``)."""
    split = resolve_split(sources, split)
    preds = [load_predictions(s, split=split) for s in sources]
    check_same_kind_of_rows(preds)
    return preds
