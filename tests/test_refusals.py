"""What a new user's bad inputs broke, one test per defect: files a user has are never overwritten,
a second writer is refused, outputs keep the user's modes, wrong answers are refused instead of
printed, and each traceback became one line.

A refusal asserts the exit status, one ``Error:`` line naming the input, no traceback, and that
nothing outside ``--out`` changed (``snapshot``). The cases that need a trained run share one
tiny run and one cross-fitted probe zoo (module fixtures), so the file stays fast.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import make_image_folder
from zoo.cli import main
from zoo.errors import UserInputError
from zoo.rundir import LOCK_NAME, hold_folder

TINY = ["--no-pretrained", "--epochs", "1", "--batch-size", "8", "--input-size", "32", "--workers", "0", "--threads", "1",
        "--auto-augment", "none", "--warmup-epochs", "0"]
PROBE_ZOO = """
[defaults]
linear_probe = true
pretrained = false
input_size = 32
workers = 0
threads = 1
[[member]]
backbone = "test_resnet"
name = "resnet"
[[member]]
backbone = "test_efficientnet"
name = "effnet"
"""


def snapshot(root: Path, inside: Path | None = None) -> dict[str, tuple]:
    """Every file under ``root`` (but ``inside``, the command's own --out) with its bytes and mode."""
    files = {}
    for path in sorted(root.rglob("*")):
        if inside is not None and (path == inside or inside in path.parents):
            continue
        if path.is_file():
            files[str(path)] = (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
    return files


def refused(result, *names: str) -> str:
    """Exit status 1 (2: click's own usage error), one Error: line naming every one of ``names``, no traceback."""
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), (result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for name in names:
        assert str(name) in errors[0], errors[0]
    return errors[0]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("refusals") / "data", per_class=(10, 4, 3))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """One finished single-split fine-tune (1 epoch of test_resnet at 32 px)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    result = invoke("finetune", "test_resnet", "--data", data, "--out", run, *TINY)
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def probe_zoo(data, tmp_path_factory) -> tuple[Path, Path]:
    """A zoo run of two linear probes cross-fitted with 2 folds, and its zoo file."""
    root = tmp_path_factory.mktemp("probe_zoo")
    zoo_file = root / "zoo.toml"
    zoo_file.write_text(PROBE_ZOO)
    result = invoke("run", data, "--out", root / "zoo", "--zoo", zoo_file, "--folds", "2", "--cv", "2",
                    "--latency-repeats", "1")
    assert result.exit_code == 0, result.output
    return root / "zoo", zoo_file


# ----------------------------------------------------------------------------- 1-4: files a user has

def test_1_out_holding_a_users_files_is_refused_before_any_work(data, tmp_path):
    out = tmp_path / "u"
    out.mkdir()
    (out / "config.json").write_text("mine\n")
    (out / "metrics.csv").write_text("my numbers\n")
    before = snapshot(tmp_path)
    refused(invoke("finetune", "test_resnet", "--data", data, "--out", out, *TINY), out, "not a zoo finetune run")
    assert snapshot(tmp_path) == before
    zoo_out = tmp_path / "z"
    zoo_out.mkdir()
    (zoo_out / "notes.txt").write_text("mine\n")
    refused(invoke("run", data, "--out", zoo_out, "--backbones", "test_resnet,test_efficientnet", *TINY), zoo_out, "not a zoo run")
    assert snapshot(tmp_path) == {**before, str(zoo_out / "notes.txt"): (b"mine\n", 0o644)}


def test_1_a_finetune_run_is_not_a_zoo_run_folder_and_the_other_way_round(trained, probe_zoo, data):
    zoo_out, _ = probe_zoo
    refused(invoke("run", data, "--out", trained, "--backbones", "test_resnet,test_efficientnet", *TINY), trained, "not a zoo run")
    refused(invoke("finetune", "test_resnet", "--data", data, "--out", zoo_out, *TINY), zoo_out, "not a zoo finetune run")


def test_2_a_second_writer_of_one_folder_is_refused_while_the_lock_is_held(data, tmp_path):
    out = tmp_path / "run"
    with hold_folder(out):  # another zoo process, as far as the command can tell: flock is per open file
        before = snapshot(tmp_path)
        refused(invoke("finetune", "test_resnet", "--data", data, "--out", out, *TINY), out, "another zoo process")
        refused(invoke("finetune", "test_resnet", "--data", data, "--out", out, "--folds", "2", *TINY), out, "another zoo process")
        assert snapshot(tmp_path) == before


def test_2_fold_processes_hold_their_own_fold_folder_not_the_whole_cross_fit(data, tmp_path):
    out = tmp_path / "cf"
    with hold_folder(out / "fold-1"):  # fold 1's process is running
        refused(invoke("finetune", "test_resnet", "--data", data, "--out", out, "--folds", "2", "--fold", "1", *TINY),
                out / "fold-1", "another zoo process")
        with hold_folder(out):  # a process of all folds holds the root: fold 2's own process still runs
            result = invoke("finetune", "test_resnet", "--data", data, "--out", out, "--folds", "2", "--fold", "2", *TINY)
    assert result.exit_code == 0, result.output
    assert (out / "fold-2" / "result.json").is_file() and not (out / "fold-1" / "config.json").exists()


def test_2_the_lock_dies_with_its_holder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(folder / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserInputError, match="another zoo process"):
            with hold_folder(folder):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
    with hold_folder(folder):  # the lock file is still there, but nobody holds it: the killed run's folder is free
        assert (folder / LOCK_NAME).exists()


def test_3_outputs_get_the_umask_and_an_overwritten_file_keeps_its_mode(trained, data, tmp_path):
    kept = tmp_path / "kept.csv"
    kept.write_text("old\n")
    kept.chmod(0o644)
    old_umask = os.umask(0o027)
    try:
        assert invoke("predict", trained, "--data", data, "--split", "val", "--out", kept).exit_code == 0
        assert invoke("predict", trained, "--data", data, "--split", "val", "--out", tmp_path / "new.csv").exit_code == 0
    finally:
        os.umask(old_umask)
    assert kept.read_text().startswith("id,prediction")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o644  # mkstemp alone would have made it 0600
    assert stat.S_IMODE((tmp_path / "new.csv").stat().st_mode) == 0o640  # 0666 less the umask 027


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot write: chmod for a user, a read-only bind mount for root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
        return
    source = tmp_path / "ro_source"
    source.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(source), str(folder)], capture_output=True).returncode == 0 and \
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode == 0
    if not mounted:
        subprocess.run(["umount", str(folder)], capture_output=True)
        pytest.skip("running as root without mount rights: no way to make a folder read-only for this test")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_4_a_read_only_out_and_an_out_that_is_a_file_are_one_line_before_training(data, tmp_path, read_only_folder):
    before = snapshot(tmp_path)
    for args in (["finetune", "test_resnet", "--data", data, *TINY],
                 ["run", data, "--backbones", "test_resnet,test_efficientnet", *TINY]):
        refused(invoke(*args, "--out", read_only_folder / "run"), read_only_folder, "not writable")
    refused(invoke("lr-find", "test_resnet", "--data", data, "--no-pretrained", "--out", read_only_folder / "lr.png"),
            read_only_folder, "not writable")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine\n")
    before[str(a_file)] = (b"mine\n", stat.S_IMODE(a_file.stat().st_mode))
    for args in (["finetune", "test_resnet", "--data", data, *TINY],
                 ["run", data, "--backbones", "test_resnet,test_efficientnet", *TINY]):
        refused(invoke(*args, "--out", a_file), a_file, "is a file")
    refused(invoke("lr-find", "test_resnet", "--data", data, "--no-pretrained", "--out", a_file / "lr.png"), a_file)
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- 5-11: silent wrong answers

def _predictions(path: Path, labels, ids=("a", "b", "c")) -> Path:
    from zoo.predictions import Predictions, write_predictions

    logits = np.random.default_rng(len(str(path))).normal(size=(len(ids), 2)).astype(np.float32)
    write_predictions(path, Predictions(logits, np.array(labels, np.int64), list(ids), ["x", "y"]))
    return path


def test_5_same_ids_with_other_labels_are_refused_naming_the_id_and_both_files(tmp_path):
    first = _predictions(tmp_path / "first.safetensors", (0, 1, 0))
    second = _predictions(tmp_path / "second.safetensors", (0, 0, 0))  # same ids, same order, id 'b' relabelled
    for args in (["correlate", first, second], ["correlate", second, first],
                 ["ensemble", "fit", first, second, "--out", tmp_path / "ens.json"]):
        line = refused(invoke(*args), "'b'", first, second)
        assert "labelled" in line
    assert not (tmp_path / "ens.json").exists()


def test_6_resume_refuses_options_it_cannot_honour_naming_what_the_run_started_with(trained, tmp_path):
    before = snapshot(trained.parent)
    line = refused(invoke("finetune", "--resume", "--out", trained, "--epochs", "5", "--lr", "0.01"), trained)
    assert "--epochs 5 (started with 1)" in line and "--lr 0.01 (started with 0.001)" in line
    assert snapshot(trained.parent) == before


def test_7_one_class_is_refused_by_finetune_and_lr_find(tmp_path):
    data = make_image_folder(tmp_path / "one", classes=("ant",), per_class=(6, 2, 0))
    refused(invoke("finetune", "test_resnet", "--data", data, "--out", tmp_path / "run", *TINY), data, "at least 2")
    refused(invoke("lr-find", "test_resnet", "--data", data, "--no-pretrained", "--out", tmp_path / "lr.png"), data, "at least 2")
    assert not (tmp_path / "run").exists() and not (tmp_path / "lr.png").exists()


def test_8_scores_on_the_rows_the_ensemble_was_fitted_on_say_so_in_the_title(probe_zoo):
    zoo_out, _ = probe_zoo
    oof = [zoo_out / "members" / name / "predictions" / "oof.safetensors" for name in ("resnet", "effnet")]
    result = invoke("ensemble", "score", zoo_out / "ensemble.json", *oof)
    assert result.exit_code == 0, result.output
    assert "Scores on the rows the ensemble was fitted on, NOT a holdout" in result.output
    assert "Holdout scores" not in result.output
    val = [zoo_out / "members" / name / "predictions" / "val.safetensors" for name in ("resnet", "effnet")]
    assert "Holdout scores" in invoke("ensemble", "score", zoo_out / "ensemble.json", *val).output


def test_9_reports_describe_the_members_as_they_are(probe_zoo, data, tmp_path):
    zoo_out, zoo_file = probe_zoo
    copy = tmp_path / "zoo"
    shutil.copytree(zoo_out, copy)
    result = invoke("run", data, "--out", copy, "--zoo", zoo_file, "--folds", "3", "--cv", "2", "--latency-repeats", "1")
    assert result.exit_code == 0, result.output
    assert "3 folds" not in result.output and "3x" not in result.output, result.output
    assert "resnet (2 folds)" in result.output
    report = re.sub(r"data:[^\"')]+", "", (copy / "report.html").read_text())  # its words, not its base64 images
    assert "3 folds" not in report and "3x" not in report


def test_10_folds_that_leave_a_class_fewer_than_2_held_out_images_are_refused(data, tmp_path):
    line = refused(invoke("finetune", "test_resnet", "--data", data, "--out", tmp_path / "run", "--folds", "6", *TINY),
                   "--folds 6", "use --folds 5 or fewer")
    assert "class 'ant'" in line
    assert not (tmp_path / "run").exists()


def test_11_a_warmup_longer_than_the_run_is_one_warning(data, tmp_path):
    result = invoke("finetune", "test_resnet", "--data", data, "--out", tmp_path / "run",
                    *TINY[:-2], "--warmup-epochs", "5")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "--warmup-epochs 5 is longer than --epochs 1" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:")


# ----------------------------------------------------------------------------- 12-16: tracebacks that became one line

@pytest.mark.parametrize("args, named", [
    (["--input-size", "0"], "--input-size"),
    (["--input-size", "-32"], "--input-size"),
    (["--mean", "0", "0", "0", "--std", "0", "0", "0"], "--std"),
])
def test_12_bad_sizes_and_normalisation_are_one_line(data, tmp_path, args, named):
    options = [a for a in TINY if a not in ("--input-size", "32")]
    refused(invoke("finetune", "test_resnet", "--data", data, "--out", tmp_path / "run", *options, *args), named)
    assert not (tmp_path / "run").exists()


def test_12_a_vit_input_size_that_is_not_a_multiple_of_its_patch_is_one_line(data, tmp_path):
    options = [a for a in TINY if a not in ("--input-size", "32")]
    line = refused(invoke("finetune", "test_vit", "--data", data, "--out", tmp_path / "run", *options, "--input-size", "33"),
                   "--input-size 33")
    assert "multiple of" in line


def test_13_a_mistyped_ensemble_file_and_zoo_file_are_one_line(probe_zoo, data, tmp_path):
    zoo_out, _ = probe_zoo
    ens = json.loads((zoo_out / "ensemble.json").read_text())
    ens["final_temperature"] = "hot"
    hot = tmp_path / "hot.json"
    hot.write_text(json.dumps(ens))
    val = [zoo_out / "members" / name / "predictions" / "val.safetensors" for name in ("resnet", "effnet")]
    refused(invoke("ensemble", "score", hot, *val), hot, "final_temperature")
    zoo_file = tmp_path / "zoo.toml"
    zoo_file.write_text('[[member]]\nbackbone = "test_resnet"\nepochs = "ten"\n[[member]]\nbackbone = "test_efficientnet"\n')
    refused(invoke("run", data, "--out", tmp_path / "zoo", "--zoo", zoo_file), zoo_file, "epochs must be a whole number")
    assert not (tmp_path / "zoo").exists()


def test_14_members_trained_on_other_data_are_refused_before_any_work(probe_zoo, tmp_path):
    zoo_out, zoo_file = probe_zoo
    other = make_image_folder(tmp_path / "data2", per_class=(10, 4, 3), seed=1)
    before = snapshot(zoo_out.parent)
    line = refused(invoke("run", other, "--out", zoo_out, "--zoo", zoo_file, "--folds", "2"), "member resnet", other)
    assert "trained on" in line
    assert snapshot(zoo_out.parent) == before


def test_15_predict_with_weights_that_do_not_fit_the_config_is_one_line(trained, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config = json.loads((run / "config.json").read_text())
    config["classes"] = config["classes"][:2]  # a config from another run: 2 classes, the weights have 3
    (run / "config.json").write_text(json.dumps(config))
    refused(invoke("predict", run, "--data", data, "--out", tmp_path / "p.csv"), run / "model.safetensors", "do not fit")
    assert not (tmp_path / "p.csv").exists()


def test_16_every_member_is_checked_before_the_first_trains_in_the_zoo_files_words(data, tmp_path):
    zoo_file = tmp_path / "zoo.toml"
    zoo_file.write_text('[defaults]\nepochs = 1\npretrained = false\n[[member]]\nbackbone = "test_resnet"\n'
                        '[[member]]\nbackbone = "test_efficientnet"\n[[member]]\nbackbone = "test_vit"\nlayer_decay = 7\n')
    line = refused(invoke("run", data, "--out", tmp_path / "zoo", "--zoo", zoo_file), zoo_file, "member 3", "layer_decay")
    assert "--layer-decay" not in line
    zoo_file.write_text('[defaults]\nlr = -1\n[[member]]\nbackbone = "test_resnet"\n[[member]]\nbackbone = "test_vit"\n')
    refused(invoke("run", data, "--out", tmp_path / "zoo", "--zoo", zoo_file), f"{zoo_file} [defaults]", "lr must be")
    refused(invoke("run", data, "--out", tmp_path / "zoo", "--backbones", "test_resnet,test_resnett", "--no-pretrained"),
            "--backbones", "test_resnett")
    assert not (tmp_path / "zoo").exists()


# ----------------------------------------------------------------------------- 17-20: clearer messages, less noise

def test_17_a_safetensors_file_with_other_names_says_the_names_do_not_match(data, tmp_path):
    import timm
    from safetensors.torch import save_file

    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    renamed = tmp_path / "renamed.safetensors"
    save_file({f"backbone.{i}": t.contiguous() for i, t in enumerate(state.values())}, str(renamed))
    line = refused(invoke("finetune", "test_resnet", "--data", data, "--out", tmp_path / "run", "--weights", renamed,
                          *[a for a in TINY if a != "--no-pretrained"]), renamed, "names do not match")
    assert "another architecture" not in line and ".pth" in line


def test_18_a_single_bracket_member_table_says_so(data, tmp_path):
    zoo_file = tmp_path / "zoo.toml"
    zoo_file.write_text('[member]\nbackbone = "test_resnet"\n')
    line = refused(invoke("run", data, "--out", tmp_path / "zoo", "--zoo", zoo_file), zoo_file, "[[member]]")
    assert "no members" not in line


def test_19_a_dangling_symlink_is_skipped_and_listed(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=(8, 3, 0))
    (data / "train" / "ant" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    result = invoke("finetune", "test_resnet", "--data", data, "--out", tmp_path / "run", *TINY)
    assert result.exit_code == 0, result.output
    assert "train/ant/gone.png" in (tmp_path / "run" / "skipped_images.txt").read_text()


def test_20_noise_is_gone_and_a_cross_fit_warns_once(data, tmp_path, caplog):
    # Each fold trains on 15 images: at batch 32 one update an epoch, so 2 epochs less 1 of warmup leave the cosine
    # one update, which timm warns about; --freeze 1 with --no-pretrained warns (rightly) once, not once per fold.
    result = invoke("finetune", "test_resnet", "--data", data, "--out", tmp_path / "cf", "--folds", "2", "--no-pretrained",
                    "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "32", "--input-size", "32", "--workers", "0",
                    "--threads", "1", "--auto-augment", "none", "--freeze", "1")
    assert result.exit_code == 0, result.output
    freeze = [line for line in result.output.splitlines() if "--freeze 1 with --no-pretrained" in line]
    assert len(freeze) == 1, result.output
    assert "Cosine annealing scheduler will have no effect" not in result.output + caplog.text
    for line in result.output.splitlines():  # any Python warning that still leaks is one line, not a file:line + source pair
        assert not line.lstrip().startswith("warnings.warn(") and "Warning:" not in line.split("(")[0], line


def test_20_library_warnings_are_one_line_each_once():
    import warnings

    import click

    @click.command("noisy")
    def noisy():
        for _ in range(3):
            warnings.warn("lbfgs failed to converge\nIncrease the number of iterations", UserWarning)
        click.echo("done")

    main.add_command(noisy)
    try:
        result = CliRunner().invoke(main, ["noisy"])
    finally:
        main.commands.pop("noisy")
    lines = [line for line in result.output.splitlines() if "converge" in line]
    assert lines == ["warning: lbfgs failed to converge (UserWarning)"], result.output
