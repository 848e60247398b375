"""Snapshot members (``--restarts R --snapshots``): the model at the end of each cosine cycle, each an
ordinary run directory; with ``--folds``, each snapshot is a cross-fit with its own out-of-fold rows."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from finetune.kfold import finetune_folds
from finetune.train import finetune
from tests.conftest import make_image_folder, tiny_config
from zoo.cli import main
from zoo.predictions import read_predictions
from zoo.rundir import RunDir


def _quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("snap") / "data", per_class=(6, 3, 0))


def test_one_snapshot_per_cycle_each_a_run_of_its_own(data, tmp_path):
    # 1 warmup epoch, then 3 cycles of 2 epochs: snapshots after epochs 3, 5 and 7. patience=1 would
    # stop the run early; with snapshots every cycle runs to its end.
    cfg = tiny_config(data, tmp_path / "run", epochs=7, warmup_epochs=1, restarts=2, snapshots=True, patience=1, lr=0.05)
    result = finetune(cfg, log=_quiet)
    assert result.epochs_run == 7 and result.stopped == "finished"
    run = RunDir(tmp_path / "run")
    weights = []
    for index, epoch in zip((1, 2, 3), (3, 5, 7)):
        snapshot = run.snapshot(index)
        config = json.loads(snapshot.config.read_text())
        assert config["snapshot"]["epoch"] == epoch and config["backbone"] == "test_resnet"
        preds = read_predictions(snapshot.predictions("val"))
        rows = list(csv.DictReader(open(run.metrics_csv)))
        assert preds.run == str(snapshot.root.resolve())
        assert json.loads(snapshot.result.read_text())["val_loss"] == pytest.approx(float(rows[epoch - 1]["val_loss"]))
        weights.append(load_file(str(snapshot.model)))
    for a, b in ((0, 1), (1, 2)):
        assert any(not np.array_equal(weights[a][k].numpy(), weights[b][k].numpy()) for k in weights[a])
    assert not run.snapshot(4).root.exists()
    # Each snapshot ends its cycle: the rate logged after its epoch (the one the next update will use) is the
    # next cycle's peak again, and it falls within the cycle.
    head = [float(r["lr/fc"]) for r in rows]
    assert head[2] == pytest.approx(0.05) and head[4] == pytest.approx(0.05) and head[3] < 0.05 and head[5] < 0.05


def test_snapshots_of_a_cross_fit_have_their_own_out_of_fold_predictions(data, tmp_path):
    cfg = tiny_config(data, tmp_path / "cv", folds=2, epochs=3, warmup_epochs=1, restarts=1, snapshots=True)
    finetune_folds(cfg, log=_quiet)
    run = RunDir(tmp_path / "cv")
    for index in (1, 2):
        snapshot = run.snapshot(index)
        assert snapshot.is_cross_fit()
        assert [r.root for r in snapshot.fold_runs()] == [run.root / f"snapshot-{index}/../fold-{i}/snapshot-{index}" for i in (1, 2)]
        oof = read_predictions(snapshot.predictions("oof"))
        assert oof.split == "oof" and len(oof.ids) == 18
        for fold in (1, 2):
            own = read_predictions(run.fold_run(fold).snapshot(index).predictions("val"))
            assert np.array_equal(oof.logits[[oof.ids.index(i) for i in own.ids]], own.logits)
        assert read_predictions(snapshot.predictions("val")).ids == read_predictions(run.predictions("val")).ids
    # The two snapshots are members of one ensemble, fitted on their out-of-fold rows.
    result = CliRunner().invoke(main, ["correlate", str(run.snapshot(1).root), str(run.snapshot(2).root)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args, message", [
    (["--snapshots"], "--snapshots needs --restarts R >= 1"),
    (["--snapshots", "--restarts", "1", "--epochs", "4", "--warmup-epochs", "1"],
     "--epochs minus --warmup-epochs must be a whole multiple of --restarts + 1 (2), got 4 - 1; e.g. --epochs 5"),
])
def test_snapshot_cycles_must_end_at_epoch_ends(data, tmp_path, args, message):
    result = CliRunner().invoke(main, ["finetune", "test_resnet", "--data", str(data), "--out", str(tmp_path / "r"),
                                       "--no-pretrained", *args])
    assert result.exit_code == 1 and message in result.output, result.output
