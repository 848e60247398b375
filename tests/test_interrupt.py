"""Interruption, resume, atomic saves and a diverging loss, with real signals to real processes.

A run killed by SIGINT/SIGTERM mid-epoch saves its resume state at the next step and
exits 130/143 with the command that continues it; continuing it gives bit for bit the
weights of an unbroken run. A run killed while saving leaves the previous files whole.
A loss that turns NaN stops the run with one line and keeps the last good checkpoint.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import make_image_folder
from zoo.cli import main

REPO = Path(__file__).resolve().parents[1]

# `python driver.py finetune ...` is `zoo finetune ...` whose train loader sleeps before each
# batch and writes "rank epoch batch" to $ZOO_TEST_HEARTBEAT, so a test knows when a run is
# mid-epoch and signals it there. Sleeping changes no number the run computes.
SLOW_DRIVER = '''
import os, sys, time
from finetune import loaders

make, beat, delay = loaders.train_loader, os.environ["ZOO_TEST_HEARTBEAT"], float(os.environ["ZOO_TEST_DELAY"])
epochs = [0]

class Slow:
    def __init__(self, loader):
        self.loader = loader
    def __len__(self):
        return len(self.loader)
    def __iter__(self):
        epochs[0] += 1
        for i, batch in enumerate(self.loader):
            with open(beat, "a") as f:
                f.write(f"{os.environ.get('RANK', '0')} {epochs[0]} {i}\\n")
            time.sleep(delay)
            yield batch

loaders.train_loader = lambda *a, **k: Slow(make(*a, **k))
from zoo.cli import main
main(sys.argv[1:], prog_name="zoo")
'''

# `python driver.py finetune ...` whose Nth call of the writer named by $ZOO_TEST_CRASH
# (safetensors' save_file: model.safetensors; torch.save: last.pt) writes half its file and
# kills the process on the spot, as a power cut or SIGKILL during the save would.
CRASH_DRIVER = '''
import os, sys
which, at, calls = os.environ["ZOO_TEST_CRASH"], int(os.environ["ZOO_TEST_CRASH_AT"]), [0]

def crashing(real):
    def save(obj, path, *args, **kwargs):
        calls[0] += 1
        real(obj, path, *args, **kwargs)
        if calls[0] == at:
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])
            os._exit(9)
    return save

if which == "weights":
    import safetensors.torch as st
    st.save_file = crashing(st.save_file)
else:
    import torch
    torch.save = crashing(torch.save)
from zoo.cli import main
main(sys.argv[1:], prog_name="zoo")
'''


def run_args(data: Path, out: Path, workers: int = 0) -> list[str]:
    """One small run: 42 train images in batches of 4, 10 steps an epoch (mixup drops the last 2), 3 epochs.

    Drop path (torch's RNG) and mixup (numpy's) draw random numbers in the training step
    itself, so resuming mid-epoch is exact only if the RNG states saved at the stop are
    restored, not merely re-seeded.
    """
    return ["finetune", "test_resnet", "--data", str(data), "--out", str(out), "--no-pretrained", "--epochs", "3",
            "--batch-size", "4", "--input-size", "32", "--workers", str(workers), "--threads", "1", "--warmup-epochs", "0.5",
            "--auto-augment", "none", "--patience", "0", "--lr", "3e-3", "--drop-path", "0.1", "--mixup", "0.2"]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def invoke(args: list[str]):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("interrupt") / "data", per_class=(14, 4, 0))  # 42 train


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, data):
    """The uninterrupted run of each worker count, made once (in this process, one thread)."""
    runs = {}

    def get(workers: int) -> Path:
        if workers not in runs:
            out = tmp_path_factory.mktemp(f"unbroken{workers}") / "run"
            invoke(run_args(data, out, workers))
            runs[workers] = out
        return runs[workers]

    return get


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before it was signalled:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the run did not reach the point to signal it")
        time.sleep(0.02)


def heartbeat_reached(path: Path, epoch: int, batch: int):
    def reached() -> bool:
        if not path.exists():
            return False
        return any(line.split()[1:] == [str(epoch), str(batch)] for line in path.read_text().splitlines())
    return reached


@pytest.mark.parametrize("sig,workers", [pytest.param(signal.SIGINT, 0, id="SIGINT-workers0"),
                                         pytest.param(signal.SIGTERM, 2, id="SIGTERM-workers2")])
def test_a_signal_mid_epoch_saves_state_and_resume_gives_the_unbroken_weights(tmp_path, data, unbroken, sig, workers):
    driver = tmp_path / "slow_zoo.py"
    driver.write_text(SLOW_DRIVER)
    run, beat = tmp_path / "run", tmp_path / "heartbeat"
    proc = subprocess.Popen([sys.executable, str(driver), *run_args(data, run, workers)], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=subprocess_env(ZOO_TEST_HEARTBEAT=str(beat), ZOO_TEST_DELAY="0.1"))
    wait_for(heartbeat_reached(beat, epoch=2, batch=3), proc)  # epoch 2 is under way
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    said = re.search(rf"{sig.name}: stopped (at epoch 2, batch (\d+)|after epoch 2); resume state saved\. "
                     rf"Continue with: zoo finetune --resume --out {re.escape(str(run))}", err)
    assert said, err
    state = torch.load(run / "last.pt", weights_only=True)
    if said.group(2):  # mid-epoch, as intended: the state holds the place reached in epoch 2
        assert state["epoch"] == 1 and state["partial"]["batches"] == int(said.group(2)) and 0 < int(said.group(2)) < 10
        assert safe_open(str(run / "model.safetensors"), "pt").metadata()["epoch"] == "1"
        assert len((run / "metrics.csv").read_text().splitlines()) == 2  # epoch 1 only
        resumes_at = f"resuming {run} at epoch 2, batch {int(said.group(2)) + 1}"
    else:  # a machine so slow that the signal landed at the end of epoch 2: still a clean stop
        assert state["epoch"] == 2 and state["partial"] is None
        resumes_at = f"resuming {run} at epoch 3"

    result = invoke(["finetune", "--resume", "--out", str(run)])
    assert resumes_at in result.output
    reference = unbroken(workers)
    assert same_weights(run / "model.safetensors", reference / "model.safetensors")
    a, b = torch.load(run / "last.pt", weights_only=True), torch.load(reference / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]


@pytest.mark.parametrize("which,real_name,best_epoch", [("weights", "model.safetensors", "1"), ("resume", "last.pt", "2")])
def test_a_run_killed_while_saving_keeps_the_previous_good_files(tmp_path, data, unbroken, which, real_name, best_epoch):
    driver = tmp_path / "crash_zoo.py"
    driver.write_text(CRASH_DRIVER)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(driver), *run_args(data, run)], cwd=tmp_path, capture_output=True, text=True,
                          env=subprocess_env(ZOO_TEST_CRASH=which, ZOO_TEST_CRASH_AT="2"), timeout=120)
    assert proc.returncode == 9, proc.stderr  # killed while writing epoch 2's file
    # The half-written file is a temporary beside the real one; the real one is the last good one, whole
    # (epoch 2's model.safetensors is written, and whole, before epoch 2's last.pt).
    leftovers = [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{real_name}."), leftovers
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        assert f.metadata()["epoch"] == best_epoch and all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["partial"] is None
    # And the run continues from there to the weights of an unbroken run.
    invoke(["finetune", "--resume", "--out", str(run)])
    assert same_weights(run / "model.safetensors", unbroken(0) / "model.safetensors")


def test_a_loss_that_becomes_nan_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, image_folder, monkeypatch):
    import finetune.engine as engine

    real, calls = engine.soft_cross_entropy, [0]

    def nan_at_step_5(logits, targets, weights=None):
        calls[0] += 1
        loss = real(logits, targets, weights)
        return loss * float("nan") if calls[0] == 5 else loss  # epoch 2 (3 steps an epoch), batch 2

    monkeypatch.setattr(engine, "soft_cross_entropy", nan_at_step_5)
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["finetune", "test_resnet", "--data", str(image_folder), "--out", str(run), "--no-pretrained",
                                       "--epochs", "3", "--batch-size", "8", "--input-size", "32", "--workers", "0",
                                       "--auto-augment", "none"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert "training loss became nan by batch 3 of 3 in epoch 2; the last good checkpoint is kept" in errors[0]
    assert "(model.safetensors: best epoch 1; last.pt: after epoch 1)" in errors[0] and "lower --lr" in errors[0]
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        assert f.metadata()["epoch"] == "1" and all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_diverging_lr_in_the_first_epoch_says_nothing_was_saved_and_the_folder_can_be_reused(tmp_path, image_folder):
    from finetune.train import finetune
    from tests.conftest import tiny_config
    from zoo.errors import UserInputError

    cfg = tiny_config(image_folder, tmp_path / "run", lr=1e12, optimizer="sgd", freeze=0, warmup_epochs=0, label_smoothing=0.0)
    with pytest.raises(UserInputError, match=r"loss became (nan|inf).* in epoch 1, before anything was saved\. Start again with a lower --lr"):
        finetune(cfg, progress=False, log=lambda m: None)
    assert not (tmp_path / "run" / "model.safetensors").exists() and not (tmp_path / "run" / "last.pt").exists()
    messages = []
    assert finetune(tiny_config(image_folder, tmp_path / "run", epochs=1), progress=False, log=messages.append).best_epoch == 1
    assert any("stopped before its first save; starting it again" in m for m in messages)


def test_stop_flag_first_signal_asks_to_stop_second_ctrl_c_quits():
    from finetune.train import StopFlag

    stop = StopFlag()
    previous = stop.install()
    try:
        assert not stop()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop() and stop.signal_name == "SIGINT" and stop.signum == 2
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    finally:
        StopFlag.uninstall(previous)
