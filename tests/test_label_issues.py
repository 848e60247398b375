"""Suspected label errors (``zoo label-issues``, ``zoo run``'s label_issues.csv) and ``--exclude``."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_image_folder, tiny_config
from finetune.probe_run import linear_probe
from zoo.cli import main
from zoo.data import read_listing
from zoo.errors import UserInputError
from zoo.folds import fold_dataset
from zoo.pipeline import label_issues as label_issues_module
from zoo.pipeline.label_issues import label_issues
from zoo.pipeline.run import run_zoo
from zoo.pipeline.zoo_file import MemberSpec, read_zoo_file
from zoo.rundir import RunDir

CLASSES = ("ant", "bee", "cat")
PER_CLASS = 30  # train images per class: 90, of which 9 (10%) get a wrong label
FOLDS = 5


def _true_class(sample_id: str) -> str:
    return Path(sample_id).name.split("_")[0]  # make_image_folder names each image after the class it was drawn as


def _flipped(ids) -> set[str]:
    return {i for i in ids if _true_class(i) != Path(i).parent.name}


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    """An image folder (classes differ by colour) with 10% of train/ moved, at random, into another class's folder."""
    root = make_image_folder(tmp_path_factory.mktemp("noisy") / "data", classes=CLASSES, per_class=(PER_CLASS, 4, 0))
    rng = np.random.default_rng(0)
    train = sorted((root / "train").glob("*/*.png"))
    for path in rng.choice(train, size=len(train) // 10, replace=False):
        wrong = rng.choice([c for c in CLASSES if c != path.parent.name])
        shutil.move(path, root / "train" / wrong / path.name)
    return root


@pytest.fixture(scope="module")
def cross_fit(noisy, tmp_path_factory) -> Path:
    """A cross-fitted tiny member: a linear probe on a random-weight test_resnet, 5 folds (seconds)."""
    out = tmp_path_factory.mktemp("lp") / "lp"
    linear_probe(tiny_config(noisy, out, linear_probe=True, folds=FOLDS))
    return out


def test_flipped_labels_rank_far_above_the_rest(noisy, cross_fit):
    issues = label_issues([cross_fit])
    flipped = _flipped(issues.ids)
    assert len(issues.ids) == 3 * PER_CLASS and len(flipped) == 9
    top = issues.ids[:len(issues.ids) // 10]
    assert len(flipped & set(top)) >= 7, top  # most of the top 10% are the flipped images (chance: 0.9 of 9)
    ranks = [issues.ids.index(i) for i in flipped]
    assert np.median(ranks) < 10  # and the flipped ones sit at the very top of 90
    flagged = {i for i, f in zip(issues.ids, issues.flagged) if f}
    assert len(flagged & flipped) >= 7 and len(flagged - flipped) <= 3, (sorted(flagged), sorted(flipped))
    first = issues.ids.index(top[0])
    assert issues.classes[issues.suggested[first]] == _true_class(top[0])  # the suggestion is the class it was drawn as
    assert issues.self_confidence[first] < 0.5


def test_cli_writes_the_flagged_rows_most_suspect_first(cross_fit, tmp_path):
    out = tmp_path / "issues.csv"
    result = CliRunner().invoke(main, ["label-issues", str(cross_fit), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "flagged as label issues" in result.output
    rows = list(csv.DictReader(out.open()))
    assert rows and list(rows[0]) == ["rank", "id", "given_label", "suggested_label", "self_confidence", "label_quality"]
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    quality = [float(r["label_quality"]) for r in rows]
    assert quality == sorted(quality)
    assert all(r["given_label"] == Path(r["id"]).parent.name for r in rows)
    everything = CliRunner().invoke(main, ["label-issues", str(cross_fit), "--filter-by", "predicted_neq_given"])
    assert everything.exit_code == 0 and everything.output.startswith("rank,id,")  # no --out: the CSV on stdout


def test_single_split_member_and_other_predictions_are_refused(noisy, cross_fit, tmp_path):
    single = tmp_path / "single"
    linear_probe(tiny_config(noisy, single, linear_probe=True))
    result = CliRunner().invoke(main, ["label-issues", str(single)])
    assert result.exit_code == 1
    message = result.output.strip()
    assert "\n" not in message and "no out-of-fold predictions" in message and "--folds" in message
    with pytest.raises(UserInputError, match="not out-of-fold"):
        label_issues([RunDir(single).predictions("val")])
    with pytest.raises(UserInputError, match="no out-of-fold predictions"):
        label_issues([cross_fit, single])


def test_exclude_removes_exactly_the_listed_ids_from_every_fold(noisy, cross_fit, tmp_path):
    issues = tmp_path / "issues.csv"
    assert CliRunner().invoke(main, ["label-issues", str(cross_fit), "--out", str(issues)]).exit_code == 0
    excluded = {r["id"] for r in csv.DictReader(issues.open())}
    assert excluded
    # The probe cross-fit (zoo finetune --linear-probe --folds) and the fine-tune cross-fit's fold datasets.
    out = tmp_path / "clean"
    linear_probe(tiny_config(noisy, out, linear_probe=True, folds=FOLDS, exclude=str(issues)))
    listing = read_listing(noisy)
    for fold in range(1, FOLDS + 1):
        before = json.loads(RunDir(cross_fit).fold_run(fold).splits.read_text())
        after = json.loads(RunDir(out).fold_run(fold).splits.read_text())
        for split in ("train", "val"):
            assert set(after[split]) == set(before[split]) - excluded, (fold, split)
        finetune_fold = fold_dataset(listing, FOLDS, 0, fold, exclude=issues)
        for split in ("train", "val"):
            assert {s.id for s in finetune_fold.split(split)} == set(before[split]) - excluded
        assert {s.id for s in finetune_fold.split("holdout")} == {s.id for s in listing.split("val")}  # untouched
    assert set(json.loads(RunDir(out).config.read_text())["excluded_ids"]) == excluded
    assert set(RunDir(out).fold_run(1).read_config()["dataset"]["excluded_ids"]) == excluded
    oof = label_issues_module.out_of_fold_probabilities([out])[0]
    assert set(oof.ids) == {s.id for s in listing.split("train")} - excluded


def test_exclude_refuses_ids_outside_the_training_pool(noisy, tmp_path):
    listing = read_listing(noisy)
    typo = tmp_path / "typo.txt"
    typo.write_text("train/ant/ant_0.png\ntrain/ant/no_such.png\n")
    with pytest.raises(UserInputError, match=r"^--exclude .*typo.txt: 1 of its 2 ids are not images of"):
        fold_dataset(listing, FOLDS, 0, 1, exclude=typo)
    held = tmp_path / "held.txt"
    held.write_text("val/ant/ant_0.png\n")
    with pytest.raises(UserInputError, match=r"held.txt: 1 id\(s\) are val/ images"):
        fold_dataset(listing, FOLDS, 0, 1, exclude=held)
    result = CliRunner().invoke(main, ["finetune", "test_resnet", "--data", str(noisy), "--out", str(tmp_path / "r"),
                                       "--no-pretrained", "--linear-probe", "--exclude", str(typo)])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "typo.txt: 1 of its 2 ids" in errors[0]
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_zoo_file_exclude_is_for_every_member(tmp_path):
    (tmp_path / "keep.csv").write_text("id\ntrain/ant/ant_0.png\n")
    good = tmp_path / "zoo.toml"
    good.write_text('[defaults]\nexclude = "keep.csv"\n[[member]]\nbackbone = "test_resnet"\n')
    _, defaults = read_zoo_file(good)
    assert defaults["exclude"] == str(tmp_path / "keep.csv")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[member]]\nbackbone = "test_resnet"\nexclude = "keep.csv"\n')
    with pytest.raises(UserInputError, match=r"member 1: exclude is for every member alike.*\[defaults\]"):
        read_zoo_file(bad)


def test_zoo_run_writes_label_issues_and_the_report_shows_them(noisy, tmp_path, monkeypatch):
    out = tmp_path / "zoo"
    members = [MemberSpec("resnet", "test_resnet"), MemberSpec("effnet", "test_efficientnet")]
    given = dict(pretrained=False, input_size=32, workers=0, threads=1)
    result = run_zoo(noisy, out, members, shared={"linear_probe": True}, given=given, folds=FOLDS, cv=2, latency_repeats=1,
                     log=lambda m: None)
    assert result.status == "finished"
    rows = list(csv.DictReader((out / "label_issues.csv").open()))
    assert rows and len({r["id"] for r in rows} & _flipped(r["id"] for r in rows)) >= len(rows) // 2
    report = (out / "report.html").read_text()
    assert "Suspected label errors among the 90 training images" in report and "hardest holdout images" in report
    # Without cleanlab: one line says so, and the rest of the run goes on.
    (out / "label_issues.csv").unlink()
    monkeypatch.setattr(label_issues_module, "cleanlab_installed", lambda: False)
    lines = []
    assert run_zoo(noisy, out, members, shared={"linear_probe": True}, given=given, folds=FOLDS, cv=2, latency_repeats=1,
                   log=lines.append).status == "finished"
    assert [line for line in lines if "cleanlab" in line] == [
        "  no label_issues.csv: finding label issues needs cleanlab: pip install 'zoo-ensemble[clean]' (or pip install cleanlab)"]
    assert not (out / "label_issues.csv").exists() and "Suspected label errors" not in (out / "report.html").read_text()
