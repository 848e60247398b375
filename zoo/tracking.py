"""Experiment tracking behind one small interface: TensorBoard event files and MLflow runs.

The training loop and the pipeline call a ``Tracker`` (parameters once, metrics once per epoch or
stage, artifacts at the end); the tracker hands them to

- TensorBoard, whenever the ``tensorboard`` package is installed: event files in ``RUN/tb/``
  (``tensorboard --logdir RUN``, or the ``zoo run`` folder, which holds every member's);
- MLflow, with ``--mlflow`` or when ``MLFLOW_TRACKING_URI`` is set: one MLflow run per run
  directory, nested under its parent (a ``zoo run``'s run, a cross-fit member's run). The
  run's id is kept in ``RUN/tracking.json``, so a resumed or re-run training continues the
  same MLflow run instead of starting another.

So ``finetune`` and ``zoo.pipeline`` never import either library, and neither is needed
(``pip install 'zoo-ensemble[tensorboard]'`` / ``'zoo-ensemble[mlflow]'``, mlflow-skinny is
enough). Nothing here imports torch, tensorboard or mlflow before a tracker is opened.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from zoo import atomic
from zoo.errors import Interrupted, UserInputError
from zoo.rundir import Folder

MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"
MLFLOW_EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "zoo"

# metrics.csv's columns -> TensorBoard tags (related curves share a chart); ``lr/<group>`` keeps its name.
TENSORBOARD_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_accuracy": "accuracy/train",
                    "val_accuracy": "accuracy/val", "images_per_second": "speed/images_per_second",
                    "seconds": "speed/epoch_seconds"}
# Bookkeeping columns of metrics.csv that are not curves worth plotting.
NOT_TRACKED = frozenset({"epoch", "train_images", "shard_overlap"})


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def mlflow_wanted(option: bool | None) -> bool:
    """``--mlflow`` / ``--no-mlflow``; unset: on when ``MLFLOW_TRACKING_URI`` is set."""
    return bool(os.environ.get(MLFLOW_URI_ENV)) if option is None else bool(option)


@dataclass(frozen=True)
class Tracking:
    """Where a run reports: ``mlflow`` (None: when ``MLFLOW_TRACKING_URI`` is set), ``tensorboard`` (None: when
    installed), and the MLflow run it nests under (``parent_run_id``)."""

    mlflow: bool | None = None
    tensorboard: bool | None = None
    parent_run_id: str | None = None

    def under(self, parent: "Tracker") -> "Tracking":
        """The same settings for a run nested under ``parent`` (a fold of a cross-fit, a member of a zoo)."""
        return replace(self, parent_run_id=parent.mlflow_run_id or self.parent_run_id)

    def open(self, folder: Folder, name: str, params: dict[str, Any] | None = None, *,
             resume_step: int | None = None) -> "Tracker":
        """A tracker for the run in ``folder`` (a ``RunDir`` or ``ZooRunDir``; named ``name`` in MLflow). ``resume_step``:
        the run continues after that step, so TensorBoard drops what a cut-off session logged at later steps."""
        sinks: list = []
        if self.tensorboard or (self.tensorboard is None and tensorboard_installed()):
            sinks.append(_TensorBoard(folder.tensorboard, resume_step))
        if mlflow_wanted(self.mlflow):
            sinks.append(_MLflow.open(folder.tracking, name, self.parent_run_id))
        tracker = Tracker(sinks)
        if params:
            tracker.log_params(params)
        return tracker


class Tracker:
    """What a run reports, handed to each sink: ``log_params``, ``log_epoch`` (a metrics.csv row),
    ``log_metrics``, ``log_artifacts``, then ``close``. A context manager: an exception marks the
    MLflow run failed (killed, for Ctrl-C/SIGTERM). With no sinks it does nothing.

    A sink that fails (a tracking server gone away) is dropped with one warning: tracking never
    stops a training run."""

    def __init__(self, sinks: Iterable = ()):
        self.sinks = list(sinks)
        self.closed = False

    def _each(self, method: str, *args) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as e:  # noqa: BLE001 - any library's failure: the training goes on without it
                from zoo.progress import write

                self.sinks.remove(sink)
                first = _first_line(e)
                write(f"warning: {sink.name} tracking stopped ({first}); training goes on, metrics.csv has every epoch")

    @property
    def mlflow_run_id(self) -> str | None:
        return next((s.run_id for s in self.sinks if isinstance(s, _MLflow)), None)

    def log_params(self, params: dict[str, Any]) -> None:
        self._each("log_params", {k: v for k, v in params.items() if v is not None})

    def log_epoch(self, step: int, row: dict[str, Any]) -> None:
        """One epoch's row of metrics.csv: losses, accuracies, each group's learning rate, seconds, images/s."""
        self.log_metrics({k: v for k, v in row.items() if k not in NOT_TRACKED}, step)

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        self._each("log_metrics", numbers, step)

    def log_artifacts(self, paths: Iterable[str | os.PathLike]) -> None:
        self._each("log_artifacts", [Path(p) for p in paths if Path(p).is_file()])

    def close(self, error: BaseException | None = None, *, stopped: bool = False) -> None:
        """End the run: finished; ``stopped`` before its end (killed in MLflow); or failed with ``error`` (killed for
        Ctrl-C or SIGTERM). Only the first call counts."""
        if self.closed:
            return
        self.closed = True
        killed = stopped or isinstance(error, (Interrupted, KeyboardInterrupt))
        self._each("close", "KILLED" if killed else ("FAILED" if error is not None else "FINISHED"))

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(error)


class _TensorBoard:
    name = "TensorBoard"

    def __init__(self, log_dir: Path, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard present but unusable (e.g. a protobuf clash): say so, train on
            raise UserInputError(f"tensorboard is installed but cannot be used ({e}); fix it with "
                                 "pip install -U 'zoo-ensemble[tensorboard]', or uninstall tensorboard") from None
        # purge_step: a resumed run drops the events a cut-off session wrote after its last saved epoch.
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def log_params(self, params: dict[str, Any]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))
        self.writer.add_text("params", "| option | value |\n|---|---|\n" + table, 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(TENSORBOARD_TAGS.get(key, key), value, step)

    def log_artifacts(self, files: list[Path]) -> None:
        self.writer.flush()  # the files stay where they are; TensorBoard shows curves, not files

    def close(self, status: str) -> None:
        self.writer.close()


def mlflow_name(key: str) -> str:
    """A metric name MLflow accepts: a stage group such as ``conv1+bn1`` gets ``_`` for what MLflow refuses."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key)


class _MLflow:
    name = "MLflow"

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, state_file: Path, name: str, parent_run_id: str | None) -> "_MLflow":
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise UserInputError("--mlflow (or MLFLOW_TRACKING_URI) needs MLflow: pip install 'zoo-ensemble[mlflow]' "
                                 "(mlflow-skinny), or leave --mlflow out and unset MLFLOW_TRACKING_URI") from None
        from mlflow.exceptions import MlflowException

        try:
            client = MlflowClient()
            uri = client.tracking_uri
            saved = json.loads(state_file.read_text(encoding="utf-8")) if state_file.is_file() else {}
            if saved.get("mlflow_tracking_uri") == uri and saved.get("mlflow_run_id"):
                client.update_run(saved["mlflow_run_id"], status="RUNNING")  # a resumed run continues its MLflow run
                return cls(client, saved["mlflow_run_id"])
            experiment_name = os.environ.get(MLFLOW_EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
            experiment = client.get_experiment_by_name(experiment_name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
            tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
            run = client.create_run(experiment_id, run_name=name, tags=tags)
        except MlflowException as e:
            first = _first_line(e)
            raise UserInputError(f"MLflow at {os.environ.get(MLFLOW_URI_ENV) or 'its default URI'}: {first}; "
                                 f"set {MLFLOW_URI_ENV} to a tracking server or database (e.g. http://host:5000)") from None
        state_file.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(state_file, {"mlflow_tracking_uri": uri, "mlflow_run_id": run.info.run_id})
        return cls(client, run.info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params  # a resumed run: MLflow refuses to change a logged param
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())
                                                   if k not in logged])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_name(k), v, now, step) for k, v in metrics.items()])

    def log_artifacts(self, files: list[Path]) -> None:
        for path in files:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


__all__ = ["Tracking", "Tracker", "tensorboard_installed", "mlflow_wanted", "TENSORBOARD_TAGS", "MLFLOW_URI_ENV"]


def _first_line(error: Exception) -> str:
    """An error's first line (its type's name when it says nothing), for a one-line message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
