"""An ensemble's members run on images: ``zoo ensemble predict`` and ``zoo ensemble score`` with ``--data``.

``ensemble`` works on prediction files alone; here each member's run directory (a cross-fit:
the mean of its fold models) predicts the images with its own data config and TTA views
through ``finetune.inference.predict_run``, and the predictions go to ``ensemble``'s
``ensemble_predictions`` / ``score_member_predictions``. torch is imported only when images
are predicted, so the prediction-file path of both commands starts without it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from ensemble.file import open_ensemble
from ensemble.model import Ensemble, Member
from ensemble.predict import ensemble_predictions, predict_ensemble
from ensemble.score import ScoreTable, score_ensemble, score_member_predictions
from zoo.errors import UserInputError
from zoo.predictions import Predictions
from zoo.rundir import RunDir


# The other way out when a member's run directory is not there: score and predict can take prediction files;
# export and distill need the models themselves (they pass their own reason).
USE_PREDICTION_FILES = "pass prediction files instead of --data"


def member_run_dir(member: Member, where: str, instead: str = USE_PREDICTION_FILES) -> Path:
    """The member's run directory, refusing a missing one or one without a model."""
    scores = instead == USE_PREDICTION_FILES  # a command that can work from prediction files says so
    if member.run is None:
        fix = "pass its prediction files instead of --data" if scores else f"fit the ensemble on run directories: {instead}"
        raise UserInputError(f"{where}: member {member.name!r} was fitted from a prediction file with no run directory; {fix}")
    run = RunDir(member.run)
    if not run.is_run():
        raise UserInputError(f"{where}: member {member.name!r}: run directory {member.run} is missing (or has no config.json); "
                             + (f"restore it, or {instead}" if scores else f"restore it: {instead}"))
    return run.root


def check_member_runs(members: Sequence[Member], classes: list[str], where: str,
                      instead: str = USE_PREDICTION_FILES) -> list[Path]:
    """Every member's run directory, and refuse runs trained on other classes, before any inference."""
    runs = []
    for m in members:
        run = member_run_dir(m, where, instead)
        run_classes = RunDir(run).read_config().get("classes")
        if run_classes != classes:
            raise UserInputError(f"{RunDir(run).config}: classes {run_classes} differ from {where}'s {classes}; "
                                 f"member {m.name!r} was trained on other classes than the ensemble")
        runs.append(run)
    return runs


def predict_member_runs(members: Sequence[Member], classes: list[str], data, split: str, tta: int, batch_size: int,
                        device: str | None, where: str, log: Callable[[str], None] | None) -> list[Predictions]:
    """Each member's run (a cross-fit: its fold models' mean) on ``split`` of the images in ``data``."""
    runs = check_member_runs(members, classes, where)
    from finetune.inference import predict_run  # torch is imported here, and only here

    out = []
    for j, (m, run) in enumerate(zip(members, runs)):
        if log is not None:
            log(f"predicting {split} of {data} with {m.name} ({m.backbone}, tta={tta})")
        # Every member reads the same images: the first one says which it had to skip.
        p = predict_run(run, data, split=split, tta=tta, batch_size=batch_size, device=device, log=log if j == 0 else None)
        if p.classes != classes:
            raise UserInputError(f"{run}: predicted classes {p.classes} differ from {where}'s {classes}")
        out.append(p)
    return out


def _one_source(data, predictions) -> None:
    if (data is None) == (predictions is None or len(predictions) == 0):
        raise UserInputError("pass either --data DIR (images) or prediction files of the members, not both or neither")


def ensemble_predict(ensemble: Ensemble | str | os.PathLike, predictions: Sequence[Predictions] | None = None,
                     data: str | os.PathLike | None = None, split: str = "test", tta: int = 1, batch_size: int = 64,
                     device: str | None = None, log: Callable[[str], None] | None = None) -> Predictions:
    """``zoo ensemble predict``: the ensemble's predictions, from members' ``predictions`` or by running
    each member with a nonzero weight on ``split`` of the images in ``data`` (``tta`` views). Exactly one
    of the two."""
    _one_source(data, predictions)
    if data is None:
        return predict_ensemble(ensemble, predictions, split=split, log=log)
    ens, where = open_ensemble(ensemble)
    ens = ens.without_zero_weights()
    member_preds = predict_member_runs(ens.members, ens.classes, data, split, tta, batch_size, device, where, log)
    return ensemble_predictions(ens, member_preds, split, tta, where, log)


def ensemble_score(ensemble: Ensemble | str | os.PathLike, predictions: Sequence[Predictions] | None = None,
                   data: str | os.PathLike | None = None, split: str = "test", tta: int = 1, batch_size: int = 64,
                   device: str | None = None, log: Callable[[str], None] | None = None) -> ScoreTable:
    """``zoo ensemble score``: every member (dropped ones too), equal weights and the ensemble on labelled
    rows, from members' ``predictions`` or by running every member on ``split`` of ``data``."""
    _one_source(data, predictions)
    if data is None:
        return score_ensemble(ensemble, predictions, split=split)
    ens, where = open_ensemble(ensemble)
    everyone = list(ens.members) + list(ens.dropped)
    preds = predict_member_runs(everyone, ens.classes, data, split, tta, batch_size, device, where, log)
    return score_member_predictions(ens, preds, split, where)
