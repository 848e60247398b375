import json
import shutil

import numpy as np
import pytest

from ensemble.file import read_ensemble, write_ensemble
from ensemble.fit import fit_ensemble
from ensemble.predict import load_prediction_sources
from ensemble.synthetic import synthetic_members, write_synthetic_runs
from zoo.errors import UserInputError


@pytest.fixture
def project(tmp_path):
    members = synthetic_members(3, 200, 4, signal=[1.0, 2.0, 1.5], shared=0.3, seed=0)
    runs = write_synthetic_runs(tmp_path / "runs", members)
    return tmp_path, runs


def test_round_trip_keeps_what_predict_needs(project):
    root, runs = project
    ens = fit_ensemble(load_prediction_sources(runs, "val"), cv=2)
    path = write_ensemble(root / "ens.json", ens)
    data = json.loads(path.read_text())
    assert data["format"] == 1 and data["kind"] == "zoo-ensemble"
    assert data["members"][0]["run"].startswith("runs/")  # relative to the file's folder
    assert data["members"][0]["run_abs"].startswith(str(root))
    for key in ("method", "metric", "combine", "final_temperature", "classes", "scores", "dropped"):
        assert key in data
    assert set(data["scores"]) >= {"in_sample", "cv", "target"}
    back = read_ensemble(path)
    assert [m.name for m in back.members] == [m.name for m in ens.members]
    np.testing.assert_allclose(back.weights, ens.weights)
    np.testing.assert_allclose(back.temperatures, ens.temperatures)
    assert back.final_temperature == ens.final_temperature and back.classes == ens.classes
    assert back.members[0].run == str(runs[[r.name for r in runs].index(back.members[0].name)].resolve())


def test_paths_follow_a_moved_project_and_fall_back_to_absolute(project, tmp_path_factory):
    root, runs = project
    write_ensemble(root / "ens.json", fit_ensemble(load_prediction_sources(runs, "val"), cv=0))
    # The whole project moves: relative paths still resolve.
    moved = tmp_path_factory.mktemp("moved") / "project"
    shutil.copytree(root, moved)
    ens = read_ensemble(moved / "ens.json")
    assert all(m.run.startswith(str(moved)) for m in ens.members)
    # Only the file moves: the absolute paths are the fallback.
    alone = tmp_path_factory.mktemp("elsewhere") / "ens.json"
    shutil.copy(root / "ens.json", alone)
    ens = read_ensemble(alone)
    assert all(m.run.startswith(str(root)) for m in ens.members)


def test_stacking_round_trip(project):
    root, runs = project
    ens = fit_ensemble(load_prediction_sources(runs, "val"), method="stacking", cv=0)
    back = read_ensemble(write_ensemble(root / "s.json", ens))
    logits = [p.logits for p in load_prediction_sources(runs, "val")]
    np.testing.assert_allclose(back.predict_log_proba(logits), ens.predict_log_proba(logits), atol=1e-6)


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(kind="other"), r"not a zoo ensemble file"),
    (lambda d: d.update(format=99), r"ensemble file format 99 is not one this zoo reads \(1..1\); upgrade zoo"),
    (lambda d: d.pop("classes"), r"key 'classes' missing; the file is damaged"),
    (lambda d: d.update(members=[]), r"\"members\" must be a non-empty list"),
    (lambda d: d.update(method="magic"), r"method 'magic' is not one of slsqp, greedy, random, stacking"),
    (lambda d: d.update(combine="median"), r"combine rule 'median' is not one of arithmetic, geometric"),
    (lambda d: d["members"][0].update(weight=-1), r"has weight -1.0; weights must be finite and >= 0"),
    (lambda d: d["members"][0].update(temperature=0), r"has temperature 0.0; temperatures must be > 0"),
    (lambda d: d["members"][0].update(weight="heavy"), r"member 0 .* has a bad value"),
    (lambda d: d["members"][0].pop("name"), r"member 0 has no 'name'"),
    (lambda d: d["members"].append(dict(d["members"][0])), r"member names must differ"),
    (lambda d: d.update(final_temperature=-2), r"final_temperature -2.0 must be > 0"),
    (lambda d: d["members"][0].update(weight=d["members"][0]["weight"] + 0.5), r"member weights sum to 1.5\d+, expected 1"),
])
def test_damaged_files_are_refused_with_the_reason(project, change, match):
    root, runs = project
    path = write_ensemble(root / "ens.json", fit_ensemble(load_prediction_sources(runs, "val"), cv=0))
    _edit(path, change)
    with pytest.raises(UserInputError, match=match):
        read_ensemble(path)


def test_not_json_and_missing(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(UserInputError, match=r"bad.json: not valid JSON"):
        read_ensemble(bad)
    with pytest.raises(UserInputError, match=r"no such ensemble file"):
        read_ensemble(tmp_path / "missing.json")
