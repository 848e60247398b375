"""The Python API: ``zoo.run``, ``zoo.finetune`` and ``zoo.predict`` (docs/python.md).

Each is a thin function over the library call its command makes (``zoo.pipeline.run.run_zoo``,
``finetune.member.train_member``, ``finetune.inference.predict_run`` and
``zoo.pipeline.member_inference.ensemble_predict``), shaped for a notebook: options as keyword
arguments (any ``zoo finetune`` option, underscored: ``epochs=3``, ``lr=2e-3``), results as objects,
and progress as ``tqdm.auto`` bars (widgets in Jupyter; ``progress=False`` for none).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from zoo.errors import UserInputError
from zoo.pipeline.context import RunResult
from zoo.pipeline.launch import LaunchOptions
from zoo.pipeline.layout import ZooRunDir
from zoo.pipeline.run import run_zoo
from zoo.pipeline.zoo_file import MemberSpec, check_options, parse_backbones, read_zoo_file
from zoo.predictions import Predictions
from zoo.progress import bars
from zoo.rundir import RunDir
from zoo.timelimit import TimeBudget, parse_duration


def run(data: str | os.PathLike, out: str | os.PathLike, backbones: Sequence[str | MemberSpec] | str | None = None, *,
        zoo_file: str | os.PathLike | None = None, folds: int | None = None, fold_seed: int | None = None, cv: int = 5,
        max_latency: float | None = None, time_limit: float | str | None = None, mlflow: bool | None = None,
        log: Callable[[str], None] | None = print, progress: bool = True, launch: LaunchOptions | None = None,
        **options: Any) -> RunResult:
    """``zoo run``: fine-tune each backbone into ``out/members``, correlate, fit the ensemble, score, report.

    ``backbones``: timm names (or ``MemberSpec``s); or ``zoo_file``: a TOML zoo file. ``options``: ``zoo finetune``
    options for every member (``epochs=3``, ``pretrained=False`` ...). ``time_limit``: seconds or ``"2h"``;
    ``mlflow``: log to MLflow (default: when ``MLFLOW_TRACKING_URI`` is set); ``launch``: the members' folds as
    separate jobs (``zoo.pipeline.launch.LaunchOptions("local", jobs=4)``, or ``"slurm"``). Returns a ``RunResult``:
    ``.leaderboard`` (dict rows; ``.to_pandas()``), ``.ensemble`` (for ``zoo.predict``), ``.report`` (HTML).
    Calling it again with the same ``out`` continues the run, skipping finished members.
    """
    if (backbones is None) == (zoo_file is None):
        raise UserInputError("zoo.run: pass backbones=[...] (timm names) or zoo_file=PATH, one of the two")
    shared: dict[str, Any] = {}
    if zoo_file is not None:
        members, shared = read_zoo_file(zoo_file)
    elif isinstance(backbones, str):
        members = parse_backbones(backbones)
    else:
        members = [b if isinstance(b, MemberSpec) else parse_backbones(b)[0] for b in backbones]
    given = check_options(options, "zoo.run")
    if mlflow is not None:
        given["mlflow"] = mlflow
    with bars(progress):
        return run_zoo(data, out, members, shared=shared, given=given, folds=folds, fold_seed=fold_seed, cv=cv,
                       max_latency=max_latency, time_limit=time_limit, log=log or _quiet, launch=launch)


def finetune(backbone: str, data: str | os.PathLike, out: str | os.PathLike, *, folds: int | None = None,
             time_limit: float | str | None = None, mlflow: bool | None = None, log: Callable[[str], None] | None = print,
             progress: bool = True, **options: Any):
    """``zoo finetune``: one member into the run directory ``out`` (``folds``: a cross-fit; ``linear_probe=True``:
    a probe). ``options``: any ``zoo finetune`` option, underscored. Returns ``finetune.member.MemberResult``
    (``.run``, ``.summary``, ``.detail``); ``zoo.predict(out, images)`` predicts with it."""
    from finetune.config import FinetuneConfig
    from finetune.member import train_member

    options = check_options(options, "zoo.finetune")
    cfg = FinetuneConfig(backbone=backbone, data=str(data), out=str(out), folds=folds, mlflow=mlflow, **options)
    budget = TimeBudget(parse_duration(time_limit, "time_limit")) if time_limit is not None else None
    with bars(progress):
        return train_member(cfg, log=log or _quiet, time_budget=budget)


def predict(source: Any, images: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *,
            data: str | os.PathLike | None = None, split: str = "test", tta: int = 1, batch_size: int = 64,
            device: str | None = None, threads: int | None = None, allow_outside_root: bool = False,
            log: Callable[[str], None] | None = None, progress: bool | None = True) -> Predictions:
    """Class probabilities of ``images`` (files, globs such as ``"photos/*.jpg"``, folders) or of ``split`` of the
    dataset ``data``, by ``source``: a ``RunResult`` or a ``zoo run`` folder (its ensemble), an ensemble
    (``ensemble.model.Ensemble`` or its JSON file), or a run directory (a cross-fit: its fold models' mean).

    Returns ``Predictions``: ``.ids``, ``.classes``, ``.probabilities()``, ``.to_records(top_k)`` and
    ``.to_pandas(top_k)``. ``progress``: True for ``tqdm.auto`` bars, False for none, None for the command
    line's (a bar on a terminal)."""
    if (images is None) == (data is None):
        raise UserInputError("pass images (files, globs or folders) or data= (a dataset folder or CSV), one of the two")
    if images is not None:
        images = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    what = images if images is not None else data
    style = bars(progress) if progress is not None else contextlib.nullcontext()
    ensemble = _ensemble_of(source)
    with style:
        if ensemble is not None:
            from zoo.pipeline.member_inference import ensemble_predict

            return ensemble_predict(ensemble, data=what, split=split, tta=tta, batch_size=batch_size, device=device, log=log)
        from finetune.inference import predict_run

        return predict_run(_run_dir(source), what, split=split, tta=tta, batch_size=batch_size, device=device, log=log,
                           threads=threads, allow_outside_root=allow_outside_root)


def _ensemble_of(source: Any):
    """The ensemble ``source`` names (an object or a file), or None for a run directory."""
    if isinstance(source, RunResult):
        if source.ensemble is None:
            raise UserInputError(f"{source.out}: this zoo run has no ensemble yet (status {source.status}); run it to the end")
        return source.ensemble
    if not isinstance(source, (str, os.PathLike)):
        return source  # an ensemble.model.Ensemble
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".json":
        return path
    if ZooRunDir(path).ensemble.is_file() and not RunDir(path).is_run():
        return ZooRunDir(path).ensemble
    return None


def _run_dir(source: str | os.PathLike) -> Path:
    path = Path(source)
    if not RunDir(path).is_run():
        raise UserInputError(f"{path}: not a zoo run directory (no config.json), ensemble file (.json) or zoo run folder "
                             "(no ensemble.json); pass what zoo finetune, zoo ensemble fit or zoo run wrote")
    return path


def _quiet(message: str) -> None:
    pass


__all__ = ["run", "finetune", "predict"]
