"""Cross-fitting (``zoo finetune --folds K``): out-of-fold predictions without leaks, folds that
every backbone shares, folds run apart or resumed ending where one unbroken run ends, and
consumers that take out-of-fold rows and refuse members cross-fitted on other folds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ensemble.synthetic import synthetic_members, write_synthetic_runs
from finetune.kfold import finetune_folds
from tests.conftest import make_image_folder, tiny_config
from zoo.cli import main
from zoo.folds import assign_folds, folds_record, write_folds
from zoo.predictions import read_predictions, write_predictions
from zoo.rundir import RunDir

K = 3


def _quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # 7 train images per class (21 in the pool), 3 val per class (the holdout).
    return make_image_folder(tmp_path_factory.mktemp("kfold") / "data", per_class=(7, 3, 0))


def _cross_fit(data, out, stop_after_epoch=None, **overrides):
    options = dict(folds=K, epochs=2)
    options.update(overrides)
    return finetune_folds(tiny_config(data, out, **options), log=_quiet, stop_after_epoch=stop_after_epoch)


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory) -> RunDir:
    out = tmp_path_factory.mktemp("full") / "run"
    result = _cross_fit(data, out)
    assert result.assembled and sorted(result.trained) == [1, 2, 3]
    return RunDir(out)


def _pool_ids(data: Path) -> list[str]:
    return sorted(p.relative_to(data).as_posix() for p in (data / "train").rglob("*.png"))


def test_every_pool_image_once_from_a_model_that_never_saw_it(full_run, data):
    oof = read_predictions(full_run.predictions("oof"))
    assert oof.split == "oof"
    assert oof.ids == _pool_ids(data)  # each pool image exactly once; no holdout image
    folds = json.loads(full_run.folds.read_text())["folds"]
    classes = oof.classes
    for row, sample_id in enumerate(oof.ids):
        assert oof.labels[row] == classes.index(sample_id.split("/")[1])  # its true label
        fold_run = full_run.fold_run(folds[sample_id])
        trained_on = json.loads(fold_run.splits.read_text())["train"]
        assert sample_id not in trained_on  # the model that predicted it never trained on it
        own = read_predictions(fold_run.predictions("val"))
        assert np.array_equal(oof.logits[row], own.logits[own.ids.index(sample_id)])
    for i in range(1, K + 1):  # every fold model trained on exactly the other folds
        splits = json.loads(full_run.fold_run(i).splits.read_text())
        assert sorted(splits["train"]) == sorted(s for s, f in folds.items() if f != i)
        assert sorted(splits["val"]) == sorted(s for s, f in folds.items() if f == i)


def test_holdout_is_the_mean_probability_of_the_fold_models(full_run, data):
    mean = read_predictions(full_run.predictions("val"))
    assert mean.ids == sorted(p.relative_to(data).as_posix() for p in (data / "val").rglob("*.png"))
    per_fold = [read_predictions(full_run.fold_run(i).predictions("holdout")) for i in range(1, K + 1)]
    expected = np.mean([p.probabilities() for p in per_fold], axis=0)
    assert np.allclose(mean.probabilities(), expected, atol=1e-6)
    assert not np.allclose(per_fold[0].probabilities(), per_fold[1].probabilities(), atol=1e-4)  # the folds differ


def test_zoo_predict_averages_the_fold_models(full_run, data, tmp_path):
    out = tmp_path / "val.safetensors"
    result = CliRunner().invoke(main, ["predict", str(full_run.root), "--data", str(data), "--split", "val",
                                       "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert np.allclose(read_predictions(out).probabilities(), read_predictions(full_run.predictions("val")).probabilities(),
                       atol=1e-6)


def test_folds_are_a_function_of_ids_labels_and_seed_only(data, full_run, tmp_path):
    ids = _pool_ids(data)
    labels = [i.split("/")[1] for i in ids]
    folds = assign_folds(ids, labels, K, seed=0)
    shuffled = list(zip(ids, labels))
    random.Random(1).shuffle(shuffled)
    assert assign_folds([i for i, _ in shuffled], [lab for _, lab in shuffled], K, seed=0) == folds  # listing order
    assert assign_folds(ids, labels, K, seed=1) != folds  # the seed matters
    sizes = [list(folds.values()).count(f) for f in range(1, K + 1)]
    assert max(sizes) - min(sizes) <= 1
    for label in set(labels):  # stratified: each class spread over every fold
        per_fold = [sum(1 for i, lab in zip(ids, labels) if lab == label and folds[i] == f) for f in range(1, K + 1)]
        assert max(per_fold) - min(per_fold) <= 1
    # Another backbone, started later with other training options, gets the same folds.
    other = tmp_path / "other"
    _cross_fit(data, other, backbone="test_efficientnet", epochs=1, seed=5, fold=2)
    assert json.loads((other / "folds.json").read_text())["folds"] == json.loads(full_run.folds.read_text())["folds"] == folds


def test_folds_run_apart_then_assembled_equal_one_full_run(data, full_run, tmp_path):
    out = tmp_path / "apart"
    for fold in (3, 1):
        result = _cross_fit(data, out, fold=fold)
        assert result.stopped == "waiting" and not RunDir(out).predictions("oof").exists()
    result = _cross_fit(data, out, fold=2)  # the last fold to finish assembles
    assert result.assembled
    for split in ("oof", "val"):
        a, b = read_predictions(RunDir(out).predictions(split)), read_predictions(full_run.predictions(split))
        assert a.ids == b.ids and np.array_equal(a.logits, b.logits), split
    again = _cross_fit(data, out)  # the full command again: nothing left to train
    assert again.trained == {} and again.skipped == [1, 2, 3] and again.assembled


def test_resume_continues_at_the_unfinished_fold(data, full_run, tmp_path):
    out = tmp_path / "killed"
    first = _cross_fit(data, out, stop_after_epoch=1)  # fold 1 stops after epoch 1 of 2, as a kill would
    assert first.stopped == "interrupted" and list(first.trained) == [1]
    assert not RunDir(out).fold_run(1).result.exists() and not RunDir(out).fold_run(2).root.exists()
    result = CliRunner().invoke(main, ["finetune", "--resume", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "fold 1/3: continuing from its resume state" in result.output or "trained=[1, 2, 3]" in result.output
    a, b = read_predictions(RunDir(out).predictions("oof")), read_predictions(full_run.predictions("oof"))
    assert np.array_equal(a.logits, b.logits)


def test_changed_options_on_a_rerun_are_refused(data, full_run):
    result = CliRunner().invoke(main, ["finetune", "test_resnet", "--data", str(data), "--out", str(full_run.root),
                                       "--folds", str(K), "--epochs", "3", "--no-pretrained"])
    assert result.exit_code == 1
    assert "--epochs 2" in result.output and "this command asks for 3" in result.output


@pytest.mark.parametrize("args, message", [
    (["--fold", "2"], "--fold 2 needs --folds K"),
    (["--folds", "3", "--fold", "4"], "--fold must be between 1 and --folds (3), got 4"),
    (["--folds", "1"], "--folds must be 2 or more, got 1"),
    (["--pool", "train+val"], "--pool train+val needs --folds K"),
    (["--folds", "3", "--val-from-train"], "--val-from-train has no effect with --folds"),
])
def test_bad_fold_options(data, tmp_path, args, message):
    result = CliRunner().invoke(main, ["finetune", "test_resnet", "--data", str(data), "--out", str(tmp_path / "r"),
                                       "--no-pretrained", *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- consumers


def _oof_runs(root: Path, fold_seeds: list[int], n: int = 120) -> list[str]:
    """Synthetic cross-fitted members: oof predictions and a folds.json per run."""
    members = synthetic_members(len(fold_seeds), n, 3, signal=[2.0, 1.5, 1.0][:len(fold_seeds)], seed=0, split="oof")
    runs = write_synthetic_runs(root, members, split="oof")
    for run, seed, member in zip(runs, fold_seeds, members):
        folds = assign_folds(member.ids, member.labels.tolist(), 5, seed)
        write_folds(run, folds_record(folds, 5, seed, "train", None))
    return [str(r) for r in runs]


def test_ensemble_fit_takes_out_of_fold_rows(tmp_path):
    runs = _oof_runs(tmp_path / "runs", [0, 0, 0])
    result = CliRunner().invoke(main, ["ensemble", "fit", *runs, "--out", str(tmp_path / "e.json"), "--cv", "2"])
    assert result.exit_code == 0, result.output
    members = json.loads((tmp_path / "e.json").read_text())["members"]
    assert all(m["predictions"].endswith("oof.safetensors") for m in members)


def test_members_cross_fitted_on_other_folds_are_refused(tmp_path):
    runs = _oof_runs(tmp_path / "runs", [0, 0, 7])
    result = CliRunner().invoke(main, ["ensemble", "fit", *runs, "--out", str(tmp_path / "e.json")])
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert "cross-fitted on different folds" in line and runs[2] in line and runs[0] in line
    assert not (tmp_path / "e.json").exists()


def test_mixing_cross_fitted_and_single_split_members_is_refused(tmp_path):
    oof_runs = _oof_runs(tmp_path / "runs", [0])
    # The same run also has val predictions; a plain run has only val ones.
    single = write_synthetic_runs(tmp_path / "single", synthetic_members(1, 120, 3, seed=3))
    for command in (["ensemble", "fit", *oof_runs, str(single[0]), "--out", str(tmp_path / "e.json")],
                    ["correlate", *oof_runs, str(single[0])]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1, result.output
        assert "has out-of-fold predictions" in result.output and str(single[0]) in result.output
        assert "--split oof or --split val" in result.output
    # Said explicitly, it is the user's choice: both runs' val predictions.
    write_predictions(RunDir(oof_runs[0]).predictions("val"), synthetic_members(1, 120, 3, seed=3, split="val")[0])
    result = CliRunner().invoke(main, ["correlate", *oof_runs, str(single[0]), "--split", "val"])
    assert result.exit_code == 0, result.output


def test_folds_in_turn_under_torchrun(data, tmp_path):
    import subprocess

    from tests.test_distributed import torchrun
    from tests.test_interrupt import subprocess_env

    out = tmp_path / "ddp"
    proc = subprocess.run(torchrun("-m", "zoo", "finetune", "test_resnet", "--data", str(data), "--out", str(out),
                                   "--no-pretrained", "--folds", "2", "--epochs", "1", "--batch-size", "4", "--input-size", "32",
                                   "--workers", "0", "--auto-augment", "none", "--device", "cpu"),
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("fold 2/2: training") == 1 and proc.stderr.count("out-of-fold: 21 pool images") == 1  # rank 0 alone
    for fold in (1, 2):
        assert json.loads((out / f"fold-{fold}" / "config.json").read_text())["world_size"] == 2
    assert read_predictions(RunDir(out).predictions("oof")).ids == _pool_ids(data)


def test_ensemble_predict_and_score_on_images_list_unreadable_ones(full_run, data, tmp_path):
    # A cross-fitted member on images: its fold models' mean, with an unreadable file listed, not silently dropped.
    import shutil

    images = tmp_path / "images"
    shutil.copytree(data / "val", images / "val")
    (images / "val" / "ant" / "broken.png").write_bytes(b"not a png")
    ens = tmp_path / "ens.json"
    result = CliRunner().invoke(main, ["ensemble", "fit", str(full_run.root), "--out", str(ens), "--cv", "0", "--no-calibrate"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "preds.safetensors"
    result = CliRunner().invoke(main, ["ensemble", "predict", str(ens), "--data", str(images), "--split", "val",
                                       "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable image(s) of 10; 9 predicted" in result.output and "val/ant/broken.png" in result.output
    assert "wrote 9 predictions" in result.output
    expected = read_predictions(full_run.predictions("val"))
    assert np.allclose(read_predictions(out).probabilities(), expected.probabilities(), atol=1e-5)  # one member at T = 1
    result = CliRunner().invoke(main, ["ensemble", "score", str(ens), "--data", str(images), "--split", "val", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable image(s)" in result.output and "9 labelled rows" in result.output


def test_missing_out_of_fold_predictions_say_how_to_make_them(tmp_path):
    single = write_synthetic_runs(tmp_path / "single", synthetic_members(2, 60, 3, seed=3))
    result = CliRunner().invoke(main, ["correlate", *map(str, single), "--split", "oof"])
    assert result.exit_code == 1 and "--folds 5" in result.output, result.output
    result = CliRunner().invoke(main, ["correlate", *map(str, single), "--split", "test"])
    assert result.exit_code == 1 and f"zoo predict {single[0]} --data DATA --split test --out " in result.output, result.output
