"""Ensembling: diversity measures, weight search, calibration, combining predictions, the ensemble file.

Layer: beside ``finetune``, above the ``zoo`` core, below ``zoo.pipeline`` and the CLI; it
imports neither ``finetune`` nor torch. It works on prediction files (``zoo.predictions``)
with numpy and scipy (scikit-learn for stacking); running members' checkpoints on images
is the pipeline's job (``zoo.pipeline.member_inference``).

    from zoo.predictions import load_predictions
    from ensemble import fit_ensemble, write_ensemble, predict_ensemble, correlate

    members = [load_predictions(run) for run in ["runs/convnext", "runs/effb2", "runs/vits"]]
    print(format_correlation(correlate(members)))
    ens = fit_ensemble(members, method="slsqp", cv=5)
    write_ensemble("ens.json", ens)
    test = [load_predictions(run, split="test") for run in ["runs/convnext", "runs/effb2", "runs/vits"]]
    preds = predict_ensemble("ens.json", test)
"""

from ensemble.calibration import TemperatureScaler, apply_temperature
from ensemble.combine import COMBINE_RULES, combine
from ensemble.diversity import PAIRWISE_MEASURES, CorrelationReport, correlate, kuncheva_whitaker_kappa, write_correlation
from ensemble.file import read_ensemble, write_ensemble
from ensemble.fit import cv_folds, fit_ensemble, read_members
from ensemble.metrics import METRICS, SEARCHABLE_METRICS, expected_calibration_error
from ensemble.model import Ensemble, Member
from ensemble.predict import predict_ensemble
from zoo.predictions import write_output
from ensemble.report import format_correlation, format_fit_report
from ensemble.score import ScoreTable, score_ensemble
from ensemble.weights import (WEIGHT_SEARCHES, GreedyWeights, RandomWeights, SlsqpWeights, StackingCombiner,
                              make_search, search_kwargs)

__all__ = [
    "COMBINE_RULES", "METRICS", "PAIRWISE_MEASURES", "SEARCHABLE_METRICS", "WEIGHT_SEARCHES",
    "CorrelationReport", "Ensemble", "GreedyWeights", "Member", "RandomWeights", "SlsqpWeights", "StackingCombiner",
    "TemperatureScaler", "apply_temperature", "combine", "correlate", "cv_folds",
    "expected_calibration_error", "fit_ensemble", "format_correlation", "format_fit_report", "kuncheva_whitaker_kappa",
    "make_search", "predict_ensemble", "read_ensemble", "read_members", "ScoreTable", "score_ensemble", "search_kwargs", "write_correlation", "write_ensemble",
    "write_output",
]
