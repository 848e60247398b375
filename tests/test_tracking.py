"""Tracking: TensorBoard event files and MLflow runs, read back (EventAccumulator; MLflow's local file store,
and a real ``mlflow server`` when full mlflow is installed)."""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import make_image_folder, tiny_config
from zoo.errors import UserInputError
from zoo.rundir import RunDir
from zoo.tracking import TENSORBOARD_TAGS, Tracker, Tracking

pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'zoo-ensemble[tensorboard]')")
pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'zoo-ensemble[mlflow]')")


def scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A local MLflow file store, as MLFLOW_TRACKING_URI; returns a client of it."""
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    return MlflowClient(uri)


def _runs(client) -> list:
    experiment = client.get_experiment_by_name("zoo")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _metrics_csv(run: RunDir) -> list[dict]:
    with run.metrics_csv.open() as f:
        return list(csv.DictReader(f))


def test_a_fine_tune_writes_every_epoch_to_tensorboard_and_one_mlflow_run_that_resume_continues(tmp_path, mlflow_store):
    data = make_image_folder(tmp_path / "data")
    from finetune.member import train_member

    cfg = tiny_config(data, tmp_path / "run", epochs=2)
    first = train_member(cfg, log=lambda m: None, stop_after_epoch=1)  # a session cut off after epoch 1, as a kill would
    assert first.stopped == "interrupted"
    (run_info,) = _runs(mlflow_store)
    assert run_info.info.status == "KILLED"
    from dataclasses import replace

    train_member(replace(cfg, resume=True), log=lambda m: None)
    run, rows = RunDir(cfg.out), _metrics_csv(RunDir(cfg.out))
    # TensorBoard: each metrics.csv column under its tag, one point per epoch, the same numbers.
    tb = scalars(run.tensorboard)
    lr_tags = [k for k in rows[0] if k.startswith("lr/")]
    assert len(lr_tags) >= 2 and set(lr_tags) <= set(tb)
    for column, tag in TENSORBOARD_TAGS.items():
        assert [step for step, _ in tb[tag]] == [1, 2], tag
        assert [v for _, v in tb[tag]] == pytest.approx([float(r[column]) for r in rows], rel=1e-5), tag
    # MLflow: the resumed session continued the same run (its id kept in tracking.json), now finished.
    (run_info,) = _runs(mlflow_store)
    assert run_info.info.status == "FINISHED" and run_info.info.run_name == "run"
    assert run_info.data.params["backbone"] == "test_resnet" and run_info.data.params["epochs"] == "2"
    history = mlflow_store.get_metric_history(run_info.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([float(r["val_loss"]) for r in rows], rel=1e-6)
    assert {"metrics.csv", "config.json", "report.json"} <= {a.path for a in mlflow_store.list_artifacts(run_info.info.run_id)}


def test_zoo_run_mlflow_is_a_parent_run_with_one_nested_run_per_member_and_the_ensemble_in_tensorboard(tmp_path, mlflow_store):
    from zoo.cli import main

    data = make_image_folder(tmp_path / "data", per_class=(8, 3, 0))
    out = tmp_path / "zoo"
    result = CliRunner().invoke(main, ["run", str(data), "--out", str(out), "--backbones", "test_resnet,test_efficientnet",
                                       "--no-pretrained", "--epochs", "1", "--batch-size", "8", "--input-size", "32",
                                       "--workers", "0", "--threads", "1", "--auto-augment", "none", "--cv", "2",
                                       "--latency-repeats", "1", "--mlflow"])
    assert result.exit_code == 0, result.output
    client = mlflow_store
    runs = {r.info.run_name: r for r in _runs(client)}
    assert set(runs) == {"zoo", "test_resnet", "test_efficientnet"}
    parent = runs["zoo"].info.run_id
    assert all(runs[m].data.tags.get("mlflow.parentRunId") == parent for m in ("test_resnet", "test_efficientnet"))
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["zoo"].data.params["members"] == "test_resnet=test_resnet, test_efficientnet=test_efficientnet"
    with (out / "leaderboard.csv").open() as f:
        board = {r["name"]: r for r in csv.DictReader(f)}
    assert runs["zoo"].data.metrics["scores/fitted_ensemble/holdout_log_loss"] == pytest.approx(
        float(board["fitted ensemble"]["holdout_log_loss"]), abs=1e-6)
    assert {"report.html", "leaderboard.csv", "ensemble.json"} <= {a.path for a in client.list_artifacts(parent)}
    # TensorBoard: each member's curves in its own tb/, the ensemble's scores in OUT/tb.
    assert scalars(out / "members" / "test_resnet" / "tb")["loss/val"][0][0] == 1
    assert scalars(out / "tb")["scores/fitted_ensemble/holdout_log_loss"][0][1] == pytest.approx(
        float(board["fitted ensemble"]["holdout_log_loss"]), abs=1e-6)


def test_no_tracking_without_the_packages_and_a_clear_message_when_mlflow_is_asked_for(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = RunDir(tmp_path / "run")
    monkeypatch.setattr("zoo.tracking.tensorboard_installed", lambda: False)
    tracker = Tracking().open(run, "run", {"lr": 0.1})
    assert tracker.sinks == [] and not run.tensorboard.exists() and not run.tracking.exists()
    tracker.log_epoch(1, {"val_loss": 0.5})
    tracker.close()
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(UserInputError, match=r"needs MLflow: pip install 'zoo-ensemble\[mlflow\]'"):
        Tracking(mlflow=True).open(run, "run")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid")  # the variable alone asks for MLflow too
    with pytest.raises(UserInputError, match="needs MLflow"):
        Tracking().open(run, "run")
    assert Tracking(mlflow=False).open(run, "run").sinks == []  # --no-mlflow wins over the variable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_mlflow() -> bool:
    try:
        importlib.metadata.distribution("mlflow")  # mlflow-skinny logs but has no server
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("sqlalchemy") is not None and importlib.util.find_spec("flask") is not None


@pytest.mark.skipif(not _full_mlflow(), reason="needs full mlflow for `mlflow server` (pip install mlflow); skinny only logs")
def test_a_real_mlflow_server_receives_params_epochs_and_files(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", (tmp_path / "store").as_uri(),
                               "--artifacts-destination", str(tmp_path / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                              # a file store: no database migrations to wait for at start-up
                              env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"})
    try:
        uri = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail(f"mlflow server did not start on port {port}")
                time.sleep(0.5)
        run = RunDir(tmp_path / "run")
        run.root.mkdir()
        (run.root / "metrics.csv").write_text("epoch,val_loss\n1,0.5\n")
        with Tracking(tensorboard=False).open(run, "server-run", {"backbone": "test_resnet"}) as tracker:
            for epoch, loss in ((1, 0.5), (2, 0.25)):
                tracker.log_epoch(epoch, {"epoch": epoch, "val_loss": loss, "lr/head": 0.1 / epoch})
            tracker.log_artifacts([run.root / "metrics.csv"])
        client = MlflowClient(uri)
        (found,) = client.search_runs([client.get_experiment_by_name("zoo").experiment_id])
        assert found.info.status == "FINISHED" and found.data.params == {"backbone": "test_resnet"}
        assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "val_loss")] == [(1, 0.5), (2, 0.25)]
        assert [a.path for a in client.list_artifacts(found.info.run_id)] == ["metrics.csv"]
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(tmp_path / "artifacts", ignore_errors=True)


def test_tracker_marks_failed_and_killed_runs():
    class Sink:
        name = "test"

        def __init__(self):
            self.status = None

        def close(self, status):
            self.status = status

    from zoo.errors import Interrupted

    for error, expected in ((None, "FINISHED"), (ValueError("x"), "FAILED"), (Interrupted(130), "KILLED")):
        sink = Sink()
        Tracker([sink]).close(error)
        assert sink.status == expected
    sink = Sink()
    with pytest.raises(KeyboardInterrupt):
        with Tracker([sink]):
            raise KeyboardInterrupt
    assert sink.status == "KILLED"


def test_a_failing_sink_is_dropped_with_one_warning_and_the_others_go_on(capsys):
    class Broken:
        name = "MLflow"

        def log_metrics(self, metrics, step):
            raise ConnectionError("server gone\nsecond line")

    class Kept:
        name = "kept"
        seen: list = []

        def log_metrics(self, metrics, step):
            self.seen.append((step, metrics))

    kept = Kept()
    tracker = Tracker([Broken(), kept])
    tracker.log_epoch(1, {"val_loss": 0.5, "epoch": 1})
    tracker.log_epoch(2, {"val_loss": 0.4, "epoch": 2})
    assert kept.seen == [(1, {"val_loss": 0.5}), (2, {"val_loss": 0.4})] and tracker.sinks == [kept]
    assert capsys.readouterr().err.count("warning: MLflow tracking stopped (server gone)") == 1
