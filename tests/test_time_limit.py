"""``zoo run --time-limit`` and a member's ``time_limit``: epochs, folds and members that would not end in the budget
are not started (estimated from the first epoch), with an injected clock that each training epoch moves 10 s."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from finetune.engine import Trainer
from tests.conftest import make_image_folder, tiny_config
from zoo.errors import UserInputError
from zoo.pipeline.run import run_zoo
from zoo.pipeline.zoo_file import MemberSpec, read_zoo_file
from zoo.rundir import RunDir
from zoo.timelimit import TimeBudget, member_budget, parse_duration

EPOCH_SECONDS = 10.0
TINY = dict(pretrained=False, batch_size=8, input_size=32, workers=0, threads=1, warmup_epochs=0.5, auto_augment="none",
            patience=0)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """A clock that only training moves: each epoch of training takes EPOCH_SECONDS on it."""
    clock = Clock()
    train_epoch = Trainer.train_epoch

    def timed(self, *args, **kwargs):
        clock.now += EPOCH_SECONDS
        return train_epoch(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_epoch", timed)
    return clock


@pytest.mark.parametrize("text, seconds", [("2h", 7200), ("90m", 5400), ("1h30m", 5400), ("45s", 45), ("3600", 3600),
                                           (" 1.5h ", 5400), (120, 120)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["banana", "2 hours", "-5", "0", "h", ""])
def test_bad_durations_are_refused_in_one_line(text):
    with pytest.raises(UserInputError, match="--time-limit: expected a"):
        parse_duration(text)


def test_a_budget_reserves_one_epoch_for_each_later_fold():
    clock = Clock()
    budget = TimeBudget(35, clock)
    assert budget.fits_epoch()  # nothing measured yet: any time left is enough to start
    budget.measured(10)
    budget.measured(99)  # only the first epoch estimates the others
    budget.later_epochs = 2
    assert budget.fits_epoch()  # 35 s for 3 epochs of 10
    clock.now += 6
    assert not budget.fits_epoch()  # 29 s: the last fold could not have its epoch
    budget.later_epochs = 0
    assert budget.fits_epoch()
    # A member's own limit cuts the run's budget, never extends it; each member measures its own epochs.
    assert member_budget(budget, 5).remaining() == 5 and member_budget(budget, 500).remaining() == budget.remaining()
    assert member_budget(budget, None).epoch_seconds is None and member_budget(None, None) is None


def test_zoo_run_keeps_what_finished_in_time_and_the_report_names_what_did_not(tmp_path, clock):
    data = make_image_folder(tmp_path / "data", per_class=(8, 3, 0))
    members = [MemberSpec("a", "test_resnet"), MemberSpec("b", "test_efficientnet"), MemberSpec("c", "test_resnet")]
    # 35 s: a trains its 3 epochs (30 s); b starts with 5 s left and stops after its first epoch; c never starts.
    result = run_zoo(data, tmp_path / "zoo", members, given={**TINY, "epochs": 3}, cv=2, latency_repeats=1,
                     log=lambda m: None, time_limit=35, clock=clock)
    assert result.status == "finished" and result.trained == ["a", "b"]
    epochs = {m: len(list(csv.DictReader((tmp_path / "zoo/members" / m / "metrics.csv").open()))) for m in ("a", "b")}
    assert epochs == {"a": 3, "b": 1}
    assert not (tmp_path / "zoo/members/c").exists()
    assert json.loads((tmp_path / "zoo/members/b/result.json").read_text())["status"] == "time-limit"
    assert set(result.timed_out) == {"b", "c"} and "not started" in result.timed_out["c"]
    assert [r["name"] for r in result.leaderboard if r["kind"].endswith("member")] == ["a", "b"]
    assert {m.name for m in result.ensemble.members} | {m.name for m in result.ensemble.dropped} == {"a", "b"}
    report = (tmp_path / "zoo/report.html").read_text()
    assert "Time limit" in report and "c: not started" in report
    assert "time limit: c: not started" in result.summary


def test_a_cross_fit_counts_only_when_every_fold_finishes(tmp_path, clock):
    from finetune.member import train_member

    data = make_image_folder(tmp_path / "data", per_class=(6, 2, 0))
    cfg = tiny_config(data, tmp_path / "cv", folds=3, epochs=2)
    # 25 s: fold 1 runs one epoch (a second would leave no epoch for folds 2 and 3), then fold 2's epoch and fold 3's
    # would need 20 s of the 15 left: neither starts, and the cross-fit is left unfinished.
    done = train_member(cfg, log=lambda m: None, time_budget=TimeBudget(25, clock))
    run = RunDir(cfg.out)
    assert done.stopped == "time-limit" and not done.finished
    assert run.fold_run(1).result.is_file() and not run.fold_run(2).root.exists() and not run.fold_run(3).root.exists()
    assert not run.predictions("oof").is_file()
    # Fold 1 of a 2-fold budget cut short: the reserved epoch of fold 2 stops fold 1 after its first epoch.
    cfg2 = tiny_config(data, tmp_path / "cv2", folds=2, epochs=3)
    done = train_member(cfg2, log=lambda m: None, time_budget=TimeBudget(35, clock))
    # fold 1: epoch 1 (10 s), epoch 2 needs 10 + 10 reserved of 25 left: runs; epoch 3 needs 20 of 15: not started;
    # fold 2: 15 s left: epoch 1, then 5 s: stops. Both folds end, so the cross-fit counts.
    assert done.finished and RunDir(cfg2.out).predictions("oof").is_file()
    assert [len(list(csv.DictReader(RunDir(cfg2.out).fold_run(i).metrics_csv.open()))) for i in (1, 2)] == [2, 1]


def test_time_limit_in_a_zoo_file_and_on_the_command_line(tmp_path):
    zoo = tmp_path / "zoo.toml"
    zoo.write_text('[defaults]\ntime_limit = "1h"\n[[member]]\nbackbone = "test_resnet"\ntime_limit = "20m"\n'
                   '[[member]]\nbackbone = "test_efficientnet"\n')
    members, shared = read_zoo_file(zoo)
    assert [m.time_limit for m in members] == [1200, 3600] and "time_limit" not in shared
    zoo.write_text('[[member]]\nbackbone = "test_resnet"\ntime_limit = "soon"\n')
    with pytest.raises(UserInputError, match="member 1: time_limit: expected a duration"):
        read_zoo_file(zoo)
    data = make_image_folder(tmp_path / "data", per_class=(4, 2, 0))
    from zoo.cli import main

    got = CliRunner().invoke(main, ["run", str(data), "--out", str(tmp_path / "out"), "--backbones", "test_resnet,test_vit",
                                    "--time-limit", "tomorrow"])
    assert got.exit_code == 1 and "--time-limit: expected a duration such as 2h" in got.output
    assert not (tmp_path / "out").exists()  # refused before anything was written
