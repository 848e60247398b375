"""``zoo run --launcher local|slurm``: the members' folds as separate jobs give the sequential run's files, a killed
job is finished by the re-run alone, a failed job is one line, and the Slurm path runs end to end on a fake Slurm."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests import fake_slurm
from tests.conftest import make_image_folder
from zoo.errors import JobsFailed, UserInputError
from zoo.pipeline.launch import LaunchOptions, gpu_slots, parse_slurm_extra
from zoo.pipeline.run import run_zoo
from zoo.pipeline.zoo_file import MemberSpec
from zoo.predictions import read_predictions

# Threads and loader workers pinned alike in every process: they decide the float sums.
TINY = dict(pretrained=False, epochs=3, batch_size=8, input_size=32, workers=0, threads=1, warmup_epochs=0.5,
            auto_augment="none", patience=0)
MEMBERS = [MemberSpec("resnet", "test_resnet"), MemberSpec("efficientnet", "test_efficientnet")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("launch") / "data", per_class=(8, 3, 0))


def _run(data, out, members=MEMBERS, launch=None, log=None, **kwargs):
    return run_zoo(data, out, members, given=dict(TINY), cv=2, latency_repeats=1, log=log or (lambda m: None),
                   launch=launch, **kwargs)


def _kill_when_training(job_log: Path, resume_state: Path, stop: threading.Event, killed: list) -> None:
    """SIGTERM the job whose output is ``job_log`` once its first epoch saved resume state (zoo saves the mid-epoch
    state and exits 143), as `kill` or a scheduler would."""
    while not stop.is_set():
        if resume_state.is_file() and job_log.is_file():
            pid = int(re.search(r"\(pid (\d+)\)", job_log.read_text()).group(1))
            os.kill(pid, signal.SIGTERM)
            killed.append(pid)
            return
        time.sleep(0.02)


def _ensemble_without_paths(out: Path) -> dict:
    text = (out / "ensemble.json").read_text().replace(str(out.resolve()), "OUT").replace(str(out), "OUT")
    return json.loads(text)


def test_local_jobs_match_the_sequential_run_and_a_killed_job_is_all_the_rerun_trains(data, tmp_path):
    sequential = tmp_path / "sequential"
    _run(data, sequential, folds=2)

    out, lines = tmp_path / "parallel", []
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_when_training, args=(out / "logs" / "resnet-fold-2.log",
                                                                out / "members" / "resnet" / "fold-2" / "last.pt", stop, killed))
    killer.start()
    try:
        with pytest.raises(JobsFailed, match=r"member\(s\) resnet did not finish.*resnet-fold-2\.log"):
            _run(data, out, folds=2, launch=LaunchOptions("local", jobs=2), log=lines.append)
    finally:
        stop.set()
        killer.join()
    assert killed, "the job was never seen training"
    failed = [line for line in lines if "failed" in line]
    assert len(failed) == 1 and re.search(r"member resnet, fold 2/2: failed \(exit 143.*log: .*resnet-fold-2\.log$", failed[0])
    # The other jobs went on: every other fold finished, the efficientnet member is assembled.
    assert all((out / "members" / m / f"fold-{i}" / "result.json").is_file() for m, i in
               (("resnet", 1), ("efficientnet", 1), ("efficientnet", 2)))
    assert (out / "members" / "efficientnet" / "result.json").is_file() and not (out / "leaderboard.csv").exists()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("members/*/fold-*/result.json")}

    lines.clear()
    result = _run(data, out, folds=2, launch=LaunchOptions("local", jobs=2), log=lines.append)
    assert result.status == "finished" and result.resumed == ["resnet"] and result.skipped == ["efficientnet"]
    progress = [line for line in lines if re.match(r"\s+\[\d+/\d+\]", line)]
    assert len(progress) == 1 and re.fullmatch(r"  \[1/1\] member resnet, fold 2/2: finished in \d+ s \(log: .*resnet-fold-2\.log\)",
                                               progress[0])
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # only the killed fold was trained again

    # Bit for bit the sequential run's predictions and ensemble, the killed-and-resumed fold included.
    for member in ("resnet", "efficientnet"):
        for split in ("oof", "val"):
            a = read_predictions(sequential / "members" / member / "predictions" / f"{split}.safetensors")
            b = read_predictions(out / "members" / member / "predictions" / f"{split}.safetensors")
            assert a.ids == b.ids and np.array_equal(a.logits, b.logits), (member, split)
    assert _ensemble_without_paths(sequential) == _ensemble_without_paths(out)


def test_a_failing_job_is_one_line_and_the_other_members_finish(data, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a weights file")  # only loading it, in the job, finds that out
    members = [MemberSpec(m.name, m.backbone, options={"pretrained": False}) for m in MEMBERS]
    members.append(MemberSpec("bad", "test_resnet", weights=str(broken)))
    given = {**{k: v for k, v in TINY.items() if k != "pretrained"}, "epochs": 1}
    lines = []
    with pytest.raises(JobsFailed) as error:
        run_zoo(data, tmp_path / "zoo", members, given=given, cv=2, latency_repeats=1, log=lines.append,
                launch=LaunchOptions("local", jobs=2))
    failed = [line for line in lines if "failed" in line]
    assert len(failed) == 1
    assert re.fullmatch(r"  member bad: failed \(exit 1: error: .*broken\.safetensors: cannot be read as weights.*\); "
                        r"log: .*/logs/bad\.log", failed[0])
    assert "member(s) bad did not finish" in str(error.value) and "\n" not in str(error.value)
    assert all((tmp_path / "zoo" / "members" / m.name / "result.json").is_file() for m in MEMBERS)
    assert not (tmp_path / "zoo" / "ensemble.json").exists()


def test_slurm_array_end_to_end_on_a_fake_slurm_with_a_preempted_job_requeued(data, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    state = tmp_path / "slurm"
    for name, value in fake_slurm.install(tmp_path / "bin", state).items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "zoo"
    # The first task (resnet) gets USR2 once its first epoch saved resume state: submitit requeues it.
    monkeypatch.setenv("FAKE_SLURM_PREEMPT", "1000_0")
    monkeypatch.setenv("FAKE_SLURM_PREEMPT_WHEN", str(out / "members" / "resnet" / "last.pt"))
    launch = LaunchOptions("slurm", jobs=2, gpus_per_job=1, partition="debug", cpus_per_job=1, time_min=30,
                           slurm_extra=parse_slurm_extra(["account=lab", "constraint=a100"]), wait=False, poll_seconds=0.3)
    lines = []
    submitted = _run(data, out, launch=launch, log=lines.append, time_limit="1h")
    assert submitted.status == "submitted"
    (sbatch,) = [json.loads(p.read_text()) for p in state.glob("sbatch-*.json")]
    options = sbatch["options"]
    assert options["array"] == "0-1%2"  # one array of 2 jobs, 2 at a time
    assert (options["partition"], options["gpus-per-node"], options["cpus-per-task"], options["time"]) == ("debug", "1", "1", "30")
    assert (options["account"], options["constraint"], options["signal"]) == ("lab", "a100", "USR2@90")
    assert re.search(r"^export ZOO_DEADLINE=\d", sbatch["script"], flags=re.M)

    # The same command again, waiting: the array is still queued or running, so nothing is resubmitted.
    lines.clear()
    result = _run(data, out, launch=replace(launch, wait=True), log=lines.append, time_limit="1h")
    assert result.status == "finished", lines
    assert len(list(state.glob("sbatch-*.json"))) == 1
    assert any("not resubmitted" in line for line in lines) or all(
        (out / "members" / m.name / "result.json").is_file() for m in MEMBERS)
    assert (state / "preempted-1000_0").is_file()
    assert (state / "scontrol.log").read_text().split() == ["requeue", "1000_0"]
    with (out / "members" / "resnet" / "metrics.csv").open() as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["1", "2", "3"]  # continued, not restarted
    assert (out / "report.html").is_file()


def test_launch_options_are_checked_in_one_line():
    with pytest.raises(UserInputError, match="--partition: only with --launcher slurm"):
        LaunchOptions("local", jobs=2, partition="gpu").validate()
    with pytest.raises(UserInputError, match="--jobs and --gpus-per-job need --launcher local or slurm"):
        LaunchOptions("sequential", jobs=4).validate()
    with pytest.raises(UserInputError, match=r"--slurm-extra 'account': expected KEY=VALUE"):
        parse_slurm_extra(["account"])
    with pytest.raises(UserInputError, match="needs 4 GPUs; this machine shows 2"):
        gpu_slots(["0", "1"], jobs=2, per_job=2)
    assert gpu_slots(["0", "1", "2", "3"], jobs=2, per_job=2) == ["0,1", "2,3"]
    assert gpu_slots(["4", "5"], jobs=2, per_job=None) == ["4", "5"]
    assert gpu_slots([], jobs=2, per_job=None) == [None, None]
