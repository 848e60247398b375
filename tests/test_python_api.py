"""The Python API (``zoo.run``, ``zoo.finetune``, ``zoo.predict``): docs/python.md's session runs as written,
``import zoo`` stays torch-free, and ``zoo predict`` takes single images, globs and ``--top-k``."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from zoo.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "python.md"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """docs/python.md's code blocks run in order in one namespace, in a fresh folder, as a notebook would."""
    import os

    folder = tmp_path_factory.mktemp("python_md")
    namespace: dict = {}
    before = os.getcwd()
    os.chdir(folder)
    try:
        for i, block in enumerate(python_blocks(PAGE), start=1):
            exec(compile(block, f"{PAGE.name} block {i}", "exec"), namespace)
    finally:
        os.chdir(before)
    return folder, namespace


def test_import_zoo_and_its_api_names_do_not_import_torch():
    code = ("import sys, zoo; zoo.run, zoo.finetune, zoo.predict, zoo.Predictions, zoo.Leaderboard; "
            "print(sorted(m for m in ('torch', 'timm', 'tensorboard', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_python_page_runs_and_its_results_are_the_run_files(session):
    folder, ns = session
    assert len(python_blocks(PAGE)) >= 5
    result = ns["result"]
    assert result.status == "finished" and result.trained == ["test_resnet", "test_efficientnet"] and result.timed_out == {}
    # The leaderboard rows are leaderboard.csv's, as numbers.
    with (folder / "runs/digits/leaderboard.csv").open() as f:
        written = list(csv.DictReader(f))
    assert [list(r) for r in result.leaderboard] == [list(r) for r in written]
    for row, text in zip(result.leaderboard, written):
        assert row["name"] == text["name"]
        assert row["holdout_log_loss"] == pytest.approx(float(text["holdout_log_loss"]), abs=1e-6)
    board = ns["board"]
    assert list(board["name"]) == [r["name"] for r in written] and board["val_log_loss"].dtype == float
    assert (folder / result.report).is_file() and {m.name for m in result.ensemble.members} <= {"test_resnet", "test_efficientnet"}
    # zoo.predict: ids, classes and probabilities; top-k columns consistent with the probabilities.
    preds = ns["preds"]
    assert len(preds.ids) == len(list((folder / "digits/test/3").glob("*.png"))) and preds.classes == [str(d) for d in range(10)]
    probs = preds.probabilities()
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    table = preds.to_pandas(top_k=3)
    np.testing.assert_allclose(table["top1_prob"], probs.max(axis=1), rtol=1e-6)
    assert (table["top1_class"] == table["prediction"]).all()
    assert (table["top1_prob"] >= table["top2_prob"]).all() and (table["top2_prob"] >= table["top3_prob"]).all()
    # zoo.finetune made a probe run that zoo.predict reads; it learned something (chance is 0.1).
    assert ns["probe"].kind == "probe" and ns["seven"].probabilities().shape[1] == 10
    # TensorBoard: both members and the run's own ensemble scores.
    assert sorted(str(p.parent.relative_to(folder / "runs/digits"))
                  for p in (folder / "runs/digits").rglob("events.out.tfevents.*")) == ["members/test_efficientnet/tb",
                                                                                       "members/test_resnet/tb", "tb"]


def test_leaderboard_without_pandas_is_plain_dicts_and_to_pandas_names_the_package(session, monkeypatch):
    result = session[1]["result"]
    monkeypatch.setitem(sys.modules, "pandas", None)
    assert all(isinstance(r, dict) for r in result.leaderboard)
    with pytest.raises(ImportError, match="pip install pandas"):
        result.leaderboard.to_pandas()


def _csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_zoo_predict_takes_single_images_globs_and_top_k(session):
    folder, ns = session
    run, ens = folder / "runs/digits/members/test_resnet", folder / "runs/digits/ensemble.json"
    one, pattern = sorted((folder / "digits/test/3").glob("*.png"))[0], str(folder / "digits/test/3/*.png")
    runner = CliRunner()
    got = runner.invoke(main, ["predict", str(run), str(one), pattern, "--top-k", "2", "--threads", "1"])
    assert got.exit_code == 0, got.output
    rows = _csv(got.stdout)
    assert len(rows) == len(ns["preds"].ids)  # the file named twice (alone and by the glob) is predicted once
    assert list(rows[0])[-4:] == ["top1_class", "top1_prob", "top2_class", "top2_prob"]
    assert all(r["top1_class"] == r["prediction"] and float(r["top1_prob"]) == max(float(r[c]) for c in "0123456789")
               for r in rows)
    # The same images through --data give the same probabilities: one inference path.
    out = folder / "test.csv"
    via_data = runner.invoke(main, ["predict", str(run), "--data", str(folder / "digits"), "--out", str(out), "--threads", "1"])
    assert via_data.exit_code == 0, via_data.output
    by_id = {Path(r["id"]).name: r for r in _csv(out.read_text()) if r["id"].startswith("test/3/")}
    for r in rows:
        assert float(r["3"]) == pytest.approx(float(by_id[Path(r["id"]).name]["3"]), abs=2e-6)
    # An ensemble file and a zoo run folder predict with the ensemble: equal to zoo.predict(result, ...).
    for source in (ens, folder / "runs/digits"):
        got = runner.invoke(main, ["predict", str(source), pattern, "--out", str(folder / "ens.csv")])
        assert got.exit_code == 0, got.output
        np.testing.assert_allclose([[float(r[c]) for c in ns["preds"].classes] for r in _csv((folder / "ens.csv").read_text())],
                                   ns["preds"].probabilities(), atol=2e-6)


@pytest.mark.parametrize("args, message", [
    (["{run}", "{folder}/nothing/*.png"], "no image file matches this pattern"),
    (["{run}", "{folder}/missing.jpg"], "no such image file or folder"),
    (["{run}", "{folder}/runs/digits/leaderboard.csv"], "not an image file"),
    (["{run}", "{one}", "--top-k", "11"], "--top-k must be between 1 and the number of classes (10)"),
    (["{run}", "{one}", "--top-k", "2", "--out", "{folder}/p.safetensors"], "adds columns to a CSV"),
    (["{run}", "{one}", "--data", "{folder}/digits"], "not both"),
    (["{run}"], "pass image files, globs or folders"),
])
def test_zoo_predict_bad_input_is_one_line(session, args, message):
    folder = session[0]
    one = sorted((folder / "digits/test/3").glob("*.png"))[0]
    args = [a.format(run=folder / "runs/digits/members/test_resnet", folder=folder, one=one) for a in args]
    got = CliRunner().invoke(main, ["predict", *args])
    assert got.exit_code != 0 and message in got.output and "Traceback" not in got.output, got.output


def test_the_api_shows_tqdm_auto_bars_even_off_a_terminal_and_none_with_progress_false(monkeypatch):
    monkeypatch.delenv("ZOO_PROGRESS", raising=False)
    from tqdm.auto import tqdm as auto_tqdm

    from zoo.progress import bars, progress

    with progress(10, "plain", delay=0) as plain:
        assert plain._bar is None  # pytest's stderr is no terminal: lines, not a bar
    with bars(), progress(10, "notebook", delay=0) as bar:
        assert isinstance(bar._bar, auto_tqdm)
    with bars(False), progress(10, "quiet", delay=0) as quiet:
        assert not quiet.enabled
