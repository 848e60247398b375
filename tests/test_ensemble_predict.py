import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ensemble.file import read_ensemble, write_ensemble
from ensemble.fit import fit_ensemble
from ensemble.predict import load_prediction_sources, match_prediction_files, predict_ensemble
from zoo.predictions import write_output
from ensemble.synthetic import synthetic_members, write_synthetic_runs
from zoo.errors import UserInputError
from zoo.predictions import read_predictions, write_predictions
from zoo.pipeline.member_inference import ensemble_predict
from zoo.rundir import RunDir

SIGNALS = [1.0, 2.0, 1.5, 0.0]


@pytest.fixture
def project(tmp_path):
    """Four runs with val and test predictions and an ensemble fitted on val (the last member is noise: weight 0)."""
    runs = write_synthetic_runs(tmp_path / "runs", synthetic_members(4, 300, 4, signal=SIGNALS, shared=0.3, seed=0))
    write_synthetic_runs(tmp_path / "runs", synthetic_members(4, 120, 4, signal=SIGNALS, shared=0.3, seed=1), split="test")
    ens = fit_ensemble(load_prediction_sources(runs, "val"), cv=0)
    assert "member_03" in {m.name for m in ens.dropped}
    path = write_ensemble(tmp_path / "ens.json", ens)
    return tmp_path, runs, path


def _expected(path, runs, split="test"):
    ens = read_ensemble(path)
    by_name = {r.name: read_predictions(RunDir(r).predictions(split)) for r in runs}
    return ens.predict_log_proba([by_name[m.name].logits for m in ens.members])


def test_prediction_files_are_matched_by_run_and_zero_weight_ones_skipped(project):
    root, runs, path = project
    notes = []
    files = [RunDir(r).predictions("test") for r in reversed(runs)]  # any order
    out = predict_ensemble(path, predictions=load_prediction_sources(files, "test"), log=notes.append)
    np.testing.assert_allclose(out.logits, _expected(path, runs), atol=1e-5)
    assert out.split == "test" and out.classes == read_ensemble(path).classes
    assert any("member_03" in n and "zero weight" in n for n in notes)


def test_run_directories_can_stand_for_their_prediction_files(project):
    root, runs, path = project
    out = predict_ensemble(path, predictions=load_prediction_sources(runs, "test"))
    np.testing.assert_allclose(out.logits, _expected(path, runs), atol=1e-5)


def test_files_without_run_metadata_are_matched_by_order(project, tmp_path):
    root, runs, path = project
    ens = read_ensemble(path)
    files = []
    for m in ens.members:
        p = replace(read_predictions(RunDir(m.run).predictions("test")), run="", backbone="")
        files.append(write_predictions(tmp_path / "loose" / f"{m.name}.safetensors", p))
    notes = []
    out = predict_ensemble(path, predictions=load_prediction_sources(files, "test"), log=notes.append)
    np.testing.assert_allclose(out.logits, _expected(path, runs), atol=1e-5)
    assert any("by the order given" in n for n in notes)
    with pytest.raises(UserInputError, match=r"no prediction file for member\(s\)"):
        predict_ensemble(path, predictions=load_prediction_sources(files[:-1], "test"))


def test_refuses_prediction_files_of_other_classes(project, tmp_path):
    root, runs, path = project
    other = synthetic_members(1, 50, 3, seed=3)[0]
    bad = write_predictions(tmp_path / "other.safetensors", other)
    with pytest.raises(UserInputError, match=r"other.safetensors: classes \[.*\] differ from .*ens.json's"):
        predict_ensemble(path, predictions=load_prediction_sources([bad], "test"))


def _fake_inference(monkeypatch, calls, classes_override=None):
    # The members' checkpoints are run by the pipeline (zoo.pipeline.member_inference), through finetune's predict_run.
    import finetune.inference

    def predict_run(run, data, split="test", tta=1, batch_size=64, device=None, log=None):
        calls.append((Path(run).name, split, tta, batch_size, device))
        p = read_predictions(RunDir(run).predictions("test"))
        return replace(p, classes=classes_override or p.classes, tta=tta, split=split)

    monkeypatch.setattr(finetune.inference, "predict_run", predict_run)


def test_data_runs_each_nonzero_member_with_its_own_run(project, monkeypatch):
    root, runs, path = project
    calls = []
    _fake_inference(monkeypatch, calls)
    out = ensemble_predict(path, data=root / "images", split="test", tta=3, batch_size=8, device="cpu")
    kept = [m.name for m in read_ensemble(path).members]
    assert [c[0] for c in calls] == kept  # member_03 (weight 0) never runs
    assert all(c[1:] == ("test", 3, 8, "cpu") for c in calls)
    np.testing.assert_allclose(out.logits, _expected(path, runs), atol=1e-5)
    assert out.tta == 3


def test_refuses_a_missing_member_run(project, monkeypatch):
    root, runs, path = project
    _fake_inference(monkeypatch, [])
    victim = read_ensemble(path).members[0]
    (Path(victim.run) / "config.json").unlink()
    with pytest.raises(UserInputError, match=rf"member '{victim.name}': run directory .*{victim.name} is missing .*; restore it, or pass prediction files"):
        ensemble_predict(path, data=root / "images")


def test_refuses_members_trained_on_other_classes(project, monkeypatch):
    root, runs, path = project
    calls = []
    _fake_inference(monkeypatch, calls)
    victim = read_ensemble(path).members[-1]
    config = RunDir(victim.run).config
    data = json.loads(config.read_text())
    data["classes"] = ["a", "b", "c", "d"]
    config.write_text(json.dumps(data))
    with pytest.raises(UserInputError, match=r"config.json: classes \['a', 'b', 'c', 'd'\] differ from .*ens.json's"):
        ensemble_predict(path, data=root / "images")
    assert calls == []  # refused before running any member


def test_refuses_a_member_fitted_without_a_run(tmp_path, monkeypatch):
    members = synthetic_members(2, 100, 3, signal=[1.0, 1.2], seed=2)
    files = [write_predictions(tmp_path / f"m{j}.safetensors", replace(p, run="")) for j, p in enumerate(members)]
    path = write_ensemble(tmp_path / "ens.json", fit_ensemble(load_prediction_sources(files, "val"), cv=0))
    _fake_inference(monkeypatch, [])
    with pytest.raises(UserInputError, match=r"was fitted from a prediction file with no run directory; pass its prediction files instead of --data"):
        ensemble_predict(path, data=tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    ({}, r"pass either --data DIR \(images\) or prediction files of the members, not both or neither"),
    ({"data": "x", "predictions": ["p"]}, r"not both or neither"),
])
def test_data_or_files(project, kwargs, match):
    root, runs, path = project
    with pytest.raises(UserInputError, match=match):
        ensemble_predict(path, **kwargs)


def test_csv_and_safetensors_outputs(project, tmp_path):
    root, runs, path = project
    out = predict_ensemble(path, predictions=load_prediction_sources(runs, "test"))
    csv_path = write_output(tmp_path / "preds.csv", out)
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == ["id", "prediction", *out.classes]
    assert len(rows) == 1 + len(out.ids)
    first = rows[1]
    probs = np.array(first[2:], dtype=float)
    assert first[0] == out.ids[0] and first[1] == out.classes[int(probs.argmax())]
    assert probs.sum() == pytest.approx(1.0, abs=1e-4)
    back = read_predictions(write_output(tmp_path / "preds.safetensors", out))
    np.testing.assert_allclose(back.probabilities(), out.probabilities(), atol=1e-6)
    with pytest.raises(UserInputError, match=r"preds.txt: output must end in .safetensors or .csv .*, got '.txt'"):
        write_output(tmp_path / "preds.txt", out)


def test_match_refuses_too_few_files_naming_the_missing_members(project):
    root, runs, path = project
    ens = read_ensemble(path)
    preds = load_prediction_sources(runs[:1], "test")
    with pytest.raises(UserInputError, match=r"no prediction file for member\(s\) "):
        match_prediction_files(ens, preds, "ens.json")
