import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from ensemble.synthetic import synthetic_members, write_synthetic_runs
from zoo.cli import main
from zoo.rundir import RunDir

SIGNALS = [1.0, 2.0, 1.5, 0.0]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def runs(tmp_path):
    runs = write_synthetic_runs(tmp_path / "runs", synthetic_members(4, 300, 4, signal=SIGNALS, shared=0.3, seed=0))
    write_synthetic_runs(tmp_path / "runs", synthetic_members(4, 100, 4, signal=SIGNALS, shared=0.3, seed=1), split="test")
    return [str(r) for r in runs]


def test_fit_then_predict(runs, tmp_path):
    ens_path = tmp_path / "ens.json"
    result = CliRunner().invoke(main, ["ensemble", "fit", *runs, "--out", str(ens_path), "--cv", "3"])
    assert result.exit_code == 0, result.output
    for text in ("weight", "final temperature", "best member (member_01)", "equal weights", "3-fold cross-validation",
                 "(cv)", "member_03"):
        assert text in result.output, text
    data = json.loads(ens_path.read_text())
    assert "member_03" not in [m["name"] for m in data["members"]]  # weight 0: dropped
    assert data["scores"]["cv"]["folds"] == 3

    out = tmp_path / "preds.csv"
    files = [str(RunDir(r).predictions("test")) for r in runs]
    result = CliRunner().invoke(main, ["ensemble", "predict", str(ens_path), *files, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 100 predictions" in result.output and "labelled samples: accuracy" in result.output
    rows = list(csv.reader(out.open()))
    assert rows[0][:2] == ["id", "prediction"] and len(rows) == 101


@pytest.mark.parametrize("args", [
    ["--method", "greedy", "--bags", "3", "--bag-fraction", "0.5", "--iterations", "20", "--init", "2", "--keep-last"],
    ["--method", "greedy", "--metric", "accuracy"],
    ["--method", "random", "--iterations", "50", "--combine", "geometric", "--no-calibrate"],
    ["--method", "stacking", "--stacking-c", "0.5"],
])
def test_fit_options(runs, tmp_path, args):
    result = CliRunner().invoke(main, ["ensemble", "fit", *runs, "--out", str(tmp_path / "e.json"), "--cv", "2", *args])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["method"] == args[1]


@pytest.mark.parametrize("args, message", [
    (["--method", "slsqp", "--bags", "3"], "Error: bags: applies to method greedy, not 'slsqp'"),
    (["--method", "slsqp", "--metric", "accuracy"], "Error: metric: expected one of log_loss for method 'slsqp', got 'accuracy'"),
    (["--cv", "1"], "Error: cv: expected 0 (no cross-validation) or a number of folds >= 2, got 1"),
    (["--method", "nope"], "Invalid value for '--method'"),
])
def test_fit_errors_are_one_line(runs, tmp_path, args, message):
    result = CliRunner().invoke(main, ["ensemble", "fit", *runs, "--out", str(tmp_path / "e.json"), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "e.json").exists()


def test_fit_refuses_test_predictions_without_labels(runs, tmp_path):
    import numpy as np
    from dataclasses import replace

    from zoo.predictions import read_predictions, write_predictions

    path = RunDir(runs[0]).predictions("val")
    p = read_predictions(path)
    write_predictions(path, replace(p, labels=np.full(len(p.labels), -1), source=""))
    result = CliRunner().invoke(main, ["ensemble", "fit", *runs, "--out", str(tmp_path / "e.json")])
    assert result.exit_code == 1
    assert "have no label" in result.output and "fitting needs labelled validation predictions" in result.output


def test_predict_errors(runs, tmp_path):
    ens_path = tmp_path / "ens.json"
    assert CliRunner().invoke(main, ["ensemble", "fit", *runs, "--out", str(ens_path), "--cv", "0"]).exit_code == 0
    result = CliRunner().invoke(main, ["ensemble", "predict", str(ens_path), "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 2 and "pass --data DIR" in result.output
    result = CliRunner().invoke(main, ["ensemble", "predict", str(ens_path), runs[0], "--data", "x", "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 2 and "not both" in result.output
    result = CliRunner().invoke(main, ["ensemble", "predict", str(tmp_path / "none.json"), runs[0], "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 1 and "none.json: no such ensemble file" in result.output


def test_help_lists_commands_and_choices():
    result = CliRunner().invoke(main, ["ensemble", "fit", "--help"])
    assert result.exit_code == 0
    assert "[slsqp|greedy|random|stacking]" in result.output and "[arithmetic|geometric]" in result.output
    result = CliRunner().invoke(main, ["--help"])
    assert "correlate" in result.output and "ensemble" in result.output


def test_fitting_and_correlating_never_import_torch_or_matplotlib(runs, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from zoo.cli import main
        from ensemble.fit import fit_ensemble
        from ensemble.predict import load_prediction_sources
        runs = {runs!r}
        fit_ensemble(load_prediction_sources(runs, "val"), method="stacking", cv=2)
        for args in (["correlate", *runs],
                     ["ensemble", "fit", *runs, "--out", {str(tmp_path / "e.json")!r}, "--cv", "2"],
                     ["ensemble", "fit", *runs, "--method", "greedy", "--out", {str(tmp_path / "g.json")!r}, "--cv", "2"],
                     ["ensemble", "predict", {str(tmp_path / "e.json")!r}, *runs, "--split", "test",
                      "--out", {str(tmp_path / "p.safetensors")!r}]):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
        assert "torch" not in sys.modules, "torch was imported"
        assert "matplotlib" not in sys.modules, "matplotlib was imported without a PNG to write"
        print("clean")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "clean" in done.stdout


def test_predict_with_data_runs_the_members_through_finetune_inference(runs, tmp_path, monkeypatch):
    from dataclasses import replace

    import finetune.inference
    from zoo.predictions import read_predictions

    calls = []

    def predict_run(run, data, split="test", tta=1, batch_size=64, device=None, log=None):
        calls.append((Path(run).name, str(data), split, tta, batch_size, device))
        return replace(read_predictions(RunDir(run).predictions("test")), tta=tta, split=split)

    monkeypatch.setattr(finetune.inference, "predict_run", predict_run)
    ens_path = tmp_path / "ens.json"
    assert CliRunner().invoke(main, ["ensemble", "fit", *runs, "--out", str(ens_path), "--cv", "0"]).exit_code == 0
    out = tmp_path / "preds.safetensors"
    result = CliRunner().invoke(main, ["ensemble", "predict", str(ens_path), "--data", str(tmp_path / "images"),
                                       "--split", "all", "--tta", "2", "--batch-size", "16", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    kept = [m["name"] for m in json.loads(ens_path.read_text())["members"]]
    assert [c[0] for c in calls] == kept and "member_03" not in kept
    assert all(c[1:] == (str(tmp_path / "images"), "all", 2, 16, "cpu") for c in calls)
    assert read_predictions(out).tta == 2
