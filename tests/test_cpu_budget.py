"""The CPU budget: free cores measured on fake machines, their split, and what a run applies and records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_config
from zoo.cpu import CpuBudget, MachineLoad, apply_budget, cpu_budget, measure_load
from zoo.errors import UserInputError

NO_ENV: dict[str, str] = {}  # no OMP_NUM_THREADS, not under torchrun


def budget_on(cores: int, busy: float, starting: int = 0, **kwargs) -> CpuBudget:
    kwargs.setdefault("environ", NO_ENV)
    return cpu_budget(measure=lambda: MachineLoad(cores=cores, busy=busy, starting=starting), **kwargs)


@pytest.mark.parametrize("cores,busy,share", [(8, 3, 5), (8, 2.6, 5), (8, 2.4, 6), (2, 1, 1), (2, 0, 2), (8, 8, 1), (2, 3.5, 1)])
def test_the_share_is_the_cores_less_those_busy_elsewhere_at_least_one(cores, busy, share):
    budget = budget_on(cores, busy)
    assert budget.share == share, f"{cores} cores, {busy} busy: expected a share of {share}, got {budget}"
    assert budget.threads + budget.workers == share, f"expected threads + workers == {share}, got {budget}"


def test_torchrun_processes_split_the_free_cores():
    assert budget_on(8, 0, world_size=2).share == 4
    assert budget_on(8, 2, world_size=2).share == 3
    from_env = budget_on(8, 0, environ={"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert (from_env.processes, from_env.share) == (2, 4), f"expected 2 local processes of 4 cores each, got {from_env}"


def test_zoo_runs_starting_together_split_the_cores_they_each_see_free():
    # Two runs started together measure each other idle: without sharing, both take 2 threads on 2 cores.
    budget = budget_on(2, 0, starting=1)
    assert (budget.processes, budget.threads, budget.workers) == (2, 1, 0), budget


def test_on_the_cpu_threads_and_workers_never_exceed_the_share():
    wrong = []
    for cores in range(1, 34):
        for busy in (0, 1, 3):
            for threads in (None, 1, 2, 6):
                b = budget_on(cores, busy, requested_threads=threads)
                if b.threads + b.workers > max(b.share, b.threads) or b.threads < 1 or b.workers < 0 or \
                        (threads is not None and b.threads != threads):
                    wrong.append(f"{cores} cores, {busy} busy, --threads {threads}: {b.threads} threads + {b.workers} "
                                 f"workers for a share of {b.share}")
    assert not wrong, f"{len(wrong)} budgets over their share, e.g. {wrong[:3]}"


def test_on_the_cpu_one_or_two_cores_decode_in_the_main_process_and_more_give_a_quarter_to_workers():
    assert (budget_on(2, 0).threads, budget_on(2, 0).workers) == (2, 0)
    assert (budget_on(16, 0).threads, budget_on(16, 0).workers) == (12, 4)
    assert budget_on(64, 0).workers == 8  # at most 8 loader processes


def test_on_a_gpu_the_loader_workers_get_the_cores():
    budget = budget_on(8, 0, device_type="cuda")
    assert (budget.threads, budget.workers) == (1, 7), budget
    assert budget_on(1, 0, device_type="cuda").workers == 1  # decoding overlaps the GPU even on one core
    assert budget_on(32, 0, device_type="cuda").workers == 8


def test_requested_values_win_and_omp_num_threads_counts_as_requested():
    assert budget_on(8, 0, requested_workers=3).threads == 5
    assert budget_on(8, 6, requested_threads=4, requested_workers=2).threads == 4  # as given, even over the share
    assert budget_on(8, 0, environ={"OMP_NUM_THREADS": "3"}).threads == 3
    assert budget_on(8, 0, requested_threads=2, environ={"OMP_NUM_THREADS": "3"}).threads == 2
    line = budget_on(2, 1, requested_threads=1).describe()
    assert line == "cpu budget: 1 of 2 cores free (1 busy elsewhere): 1 torch thread (as given), 0 loader workers", line


@pytest.mark.parametrize("kwargs,message", [(dict(requested_threads=0), "--threads must be at least 1, got 0"),
                                            (dict(environ={"OMP_NUM_THREADS": "0"}), "OMP_NUM_THREADS must be at least 1, got 0"),
                                            (dict(requested_workers=-1), "--workers must be 0 or more, got -1")])
def test_bad_requests_are_refused(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        budget_on(4, 0, **kwargs)


def test_measuring_sees_the_cores_this_process_may_use():
    load = measure_load(interval=0.3)
    assert 1 <= load.cores <= len(os.sched_getaffinity(0)), f"expected 1..{len(os.sched_getaffinity(0))} cores, got {load}"
    assert 0 <= load.busy <= load.cores + 0.1, f"expected 0..{load.cores} busy cores, got {load}"


def test_measuring_counts_other_live_runs_starting_now_and_forgets_dead_ones(tmp_path):
    registry = tmp_path / "registry"
    registry.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (registry / dead.stdout.strip()).touch()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (registry / str(other.pid)).touch()
        assert measure_load(interval=0.05, registry=registry).starting == 1
        assert not (registry / dead.stdout.strip()).exists(), "a dead process's entry should be removed"
        old = time.time() - 60
        os.utime(registry / str(other.pid), (old, old))  # chose its budget a minute ago: its load shows in /proc/stat
        assert measure_load(interval=0.05, registry=registry).starting == 0
    finally:
        other.kill()
        other.wait()


def test_applying_twice_in_one_process_sets_the_threads_both_times():
    before = torch.get_num_threads()
    try:
        apply_budget(budget_on(4, 0, requested_threads=3))
        apply_budget(budget_on(4, 0, requested_threads=2))  # the inter-op pool can be set once only: no error
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def threads_during_training(monkeypatch):
    """torch.get_num_threads() at the start of every training epoch."""
    from finetune.engine import Trainer

    seen, train_epoch = [], Trainer.train_epoch

    def recording(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return train_epoch(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_epoch", recording)
    yield seen
    torch.set_num_threads(1)  # conftest's setting, for the tests that follow


def test_finetune_threads_is_applied_during_training_and_recorded(tmp_path, image_folder, threads_during_training):
    from zoo.cli import main

    torch.set_num_threads(1)
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["finetune", "test_resnet", "--data", str(image_folder), "--out", str(run), "--threads", "2",
                                       "--no-pretrained", "--epochs", "1", "--batch-size", "8", "--input-size", "32",
                                       "--workers", "0", "--auto-augment", "none"])
    assert result.exit_code == 0, result.output
    assert threads_during_training == [2], f"expected 2 torch threads during training, got {threads_during_training}"
    config = json.loads((run / "config.json").read_text())
    assert config["options"]["threads"] == 2 and config["cpu_budget"]["threads"] == 2, config.get("cpu_budget")
    assert config["cpu_budget"]["threads_given"] and config["cpu_budget"]["workers"] == 0, config["cpu_budget"]


def test_a_resumed_run_keeps_the_threads_it_started_with(tmp_path, image_folder, threads_during_training, monkeypatch):
    from finetune.train import finetune

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    finetune(tiny_config(image_folder, tmp_path / "run"), progress=False, log=lambda m: None, stop_after_epoch=1)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # another budget now: the run's float sums would change with it
    finetune(tiny_config(image_folder, tmp_path / "run", resume=True), progress=False, log=lambda m: None)
    assert threads_during_training == [1, 1], f"expected the resumed epoch on the recorded 1 thread, got {threads_during_training}"
