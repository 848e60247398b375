"""``zoo ensemble score``: members (kept and dropped), equal weights and the ensemble on a holdout."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from ensemble.metrics import log_loss
from ensemble.synthetic import synthetic_members, write_synthetic_runs
from zoo.cli import main
from zoo.rundir import RunDir


@pytest.fixture
def fitted(tmp_path):
    signal = [2.0, 1.5, 0.0]
    runs = write_synthetic_runs(tmp_path / "runs", synthetic_members(3, 600, 5, signal=signal, seed=0))
    test = synthetic_members(3, 400, 5, signal=signal, seed=1)
    write_synthetic_runs(tmp_path / "runs", test, split="test")
    ens = tmp_path / "ens.json"
    result = CliRunner().invoke(main, ["ensemble", "fit", *map(str, runs), "--out", str(ens), "--cv", "0"])
    assert result.exit_code == 0, result.output
    return ens, [str(r) for r in runs], test


def test_score_on_prediction_files_lists_every_member_equal_weights_and_the_ensemble(fitted, tmp_path):
    ens, runs, test = fitted
    data = json.loads(ens.read_text())
    assert [m["name"] for m in data["dropped"]] == ["member_02"]  # the noise member has weight 0
    files = [str(RunDir(r).predictions("test")) for r in runs]
    out = tmp_path / "holdout.csv"
    result = CliRunner().invoke(main, ["ensemble", "score", str(ens), *files, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "scored on 400 labelled rows of split 'test'" in result.output and "only you can guarantee" in result.output
    table = {r["name"]: r for r in csv.DictReader(out.open())}
    assert set(table) == {"member_00", "member_01", "member_02", "equal weights", "ensemble"}
    assert table["member_02"]["kind"] == "dropped member" and table["member_02"]["weight"] == "0"
    assert "best single member" in table["member_00"]["note"]  # the strongest signal
    y = test[0].labels
    # members at their raw probabilities; equal weights = plain mean of all raw probabilities
    assert float(table["member_01"]["log_loss"]) == pytest.approx(log_loss(test[1].probabilities(), y), rel=1e-5)
    mean = np.mean([p.probabilities() for p in test], axis=0)
    assert float(table["equal weights"]["log_loss"]) == pytest.approx(log_loss(mean, y), rel=1e-5)
    assert float(table["ensemble"]["log_loss"]) < float(table["equal weights"]["log_loss"])


def test_score_reads_run_directories_and_writes_json(fitted, tmp_path):
    ens, runs, _ = fitted
    out = tmp_path / "holdout.json"
    result = CliRunner().invoke(main, ["ensemble", "score", str(ens), *runs, "--split", "test", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["split"] == "test" and data["samples"] == 400 and data["best_member"] == "member_00"
    assert [r["kind"] for r in data["rows"]][-2:] == ["equal weights", "ensemble"]


def test_score_refuses_unlabelled_rows_and_missing_members(fitted, tmp_path):
    ens, runs, _ = fitted
    unlabelled = synthetic_members(3, 50, 5, seed=3, labels=np.full(50, -1))
    write_synthetic_runs(tmp_path / "runs", unlabelled, split="unlabelled")
    result = CliRunner().invoke(main, ["ensemble", "score", str(ens), *runs, "--split", "unlabelled"])
    assert result.exit_code == 1
    assert "50 of 50 rows have no label (-1); scoring needs labelled predictions of a holdout" in result.output
    result = CliRunner().invoke(main, ["ensemble", "score", str(ens), *runs[:2], "--split", "test"])
    assert result.exit_code == 1
    assert "no prediction file for member(s) member_02 among the 2 given" in result.output
