"""``train_member``: one function picks a member's kind from its config, as ``zoo finetune`` does."""

from __future__ import annotations

import pytest

from finetune.kfold import CrossFitResult
from finetune.member import train_member
from finetune.probe_run import ProbeResult
from finetune.train import FinetuneResult
from tests.conftest import make_image_folder, tiny_config


def _quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("member") / "data", per_class=(4, 2, 0), size=(24, 24))


def test_a_probe_config_gives_a_probe_run(data, tmp_path):
    member = train_member(tiny_config(data, tmp_path / "probe", linear_probe=True), log=_quiet)
    assert (member.kind, member.finished, member.stopped, member.rank) == ("probe", True, "finished", 0)
    assert isinstance(member.detail, ProbeResult)
    assert member.run.read_config()["linear_probe"]["C"] > 0  # a fitted probe, not a fine-tune
    assert member.summary == member.detail.summary


def test_folds_give_a_cross_fit_and_resume_finds_it(data, tmp_path):
    member = train_member(tiny_config(data, tmp_path / "cf", folds=2, epochs=1), log=_quiet, progress=False)
    assert (member.kind, member.finished, member.stopped) == ("cross-fit", True, "finished")
    assert isinstance(member.detail, CrossFitResult) and member.run.predictions("oof").is_file()
    assert "linear_probe" not in member.run.fold_run(1).read_config()
    result = member.detail
    # The line `zoo finetune --folds` printed before train_member existed.
    scores = "".join(f"\t{split}_log_loss={s['log_loss']:.4f}\t{split}_accuracy={s['accuracy']:.4f}"
                     for split, s in result.scores.items())
    assert member.summary == (f"{result.run.root}\tfolds={result.folds}\ttrained={sorted(result.trained)}\t"
                              f"skipped={result.skipped}{scores}\t{result.stopped}")
    assert "\toof_log_loss=" in member.summary and "\tholdout_log_loss=" in member.summary
    # --resume without --folds: the run on disk says it is a cross-fit; every fold is finished, so none is trained.
    again = train_member(tiny_config(data, tmp_path / "cf", resume=True, epochs=1), log=_quiet, progress=False)
    assert (again.kind, again.finished, again.detail.skipped, again.detail.trained) == ("cross-fit", True, [1, 2], {})


def test_a_plain_config_gives_a_single_run_unfinished_when_stopped(data, tmp_path):
    member = train_member(tiny_config(data, tmp_path / "one", epochs=2), log=_quiet, progress=False, stop_after_epoch=1)
    assert (member.kind, member.finished, member.stopped) == ("single", False, "interrupted")
    assert isinstance(member.detail, FinetuneResult) and member.run.resume_state.is_file()
    result = member.detail
    # The line `zoo finetune` printed before train_member existed.
    assert member.summary == (f"{result.run.root}\tbest_epoch={result.best_epoch}\tval_loss={result.best_val_loss:.4f}\t"
                              f"val_accuracy={result.best_val_accuracy:.4f}\t{result.stopped}")
    assert "\tbest_epoch=1\t" in member.summary and member.summary.endswith("\tinterrupted")
    done = train_member(tiny_config(data, tmp_path / "one", resume=True), log=_quiet, progress=False)
    assert (done.kind, done.finished, done.stopped, done.detail.epochs_run) == ("single", True, "finished", 2)
