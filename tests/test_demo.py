"""`zoo demo` runs the whole pipeline through the real library functions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from zoo.cli import main
from zoo.pipeline.demo import build_digits_dataset
from zoo.predictions import read_predictions


def test_digits_dataset_is_a_stratified_image_folder(tmp_path):
    counts = build_digits_dataset(tmp_path)
    assert counts == {"train": 1010, "val": 337, "test": 450}
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [str(d) for d in range(10)]
    from sklearn.datasets import load_digits

    totals = np.bincount(load_digits().target)
    for d in range(10):  # stratified: each class keeps its share of the test split
        assert abs(len(list((tmp_path / "test" / str(d)).iterdir())) - 0.25 * totals[d]) <= 1


@pytest.mark.slow
def test_demo_writes_runs_ensemble_report_and_summary(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--epochs", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    for line in ("resnet", "efficientnet", "vit", "equal-weight average", "fitted ensemble", "probability correlation",
                 "Pareto front", "test/ (also untouched)"):
        assert line in result.output
    ensemble = json.loads((out / "ensemble.json").read_text())
    assert ensemble["members"] and ensemble["scores"]["cv"]
    for name in ("resnet", "efficientnet", "vit"):
        assert (out / "members" / name / "metrics.png").is_file()
        assert len(read_predictions(out / "members" / name / "predictions" / "test.safetensors").ids) == 450
        assert len(read_predictions(out / "members" / name / "predictions" / "holdout.safetensors").ids) == 337
    assert (out / "correlation" / "heatmap.png").is_file()
    assert (out / "test_predictions.csv").read_text().startswith("id,prediction,0,1,")
    leaderboard = (out / "leaderboard.csv").read_text()
    assert leaderboard.startswith("name,kind,backbone,params,") and "fitted ensemble" in leaderboard
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 8 and "vit" in report
    # zoo demo is zoo run: running it again continues the same folder, and everything finished is skipped.
    again = CliRunner().invoke(main, ["demo", "--out", str(out), "--epochs", "1", "--threads", "1"])
    assert again.exit_code == 0, again.output
    assert again.output.count("finished earlier; skipped") == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    refused = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "other")])
    assert refused.exit_code == 1 and "already exists and is not empty" in refused.output
