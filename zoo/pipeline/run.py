"""``zoo run``: fine-tune a zoo of backbones, correlate them, fit and score the ensemble, write the report.

One call runs every stage through the same library functions as the single commands; each
stage is a function over one ``ZooRun`` (what the stages share) and writes into the folder
``zoo.pipeline.layout.ZooRunDir`` names:

1. ``train_members``: each member is trained into ``OUT/members/<name>`` by
   ``finetune.member.train_member`` (a fine-tune, a cross-fit with ``folds``, or a linear
   probe). A member whose ``result.json`` exists is finished and skipped; one with resume
   state (``last.pt``) is continued from it. Re-running after a kill, or after adding a
   member to the zoo, costs only the unfinished work; Ctrl-C saves the resume state.
2. ``correlate_members`` on the members' selection rows: out-of-fold predictions with
   ``folds``, else each run's validation split (taken from ``train/``, so that ``val/`` stays
   untouched).
3. ``fit_weights`` on the same rows (cross-validated scores); with ``folds``, ``find_label_issues``: the pool images
   whose given label the ensemble's out-of-fold probabilities contradict (cleanlab, when installed).
4. ``predict_untouched``: the holdout (the dataset's ``val/``, else ``test/``) and ``test/`` are
   predicted by each member once (kept in its run directory), and the ensemble predicts ``test/``.
5. ``score_and_time``: ``score_ensemble`` on the holdout; the latency of each member on this device.
6. ``write_tables``: the leaderboard, the accuracy-vs-latency Pareto front of member subsets,
   the summary and ``report.html``.

The members come from ``zoo_file``, the latency, leaderboard and Pareto front from
``leaderboard``, the report from ``report_html`` (all in ``zoo.pipeline``). No click here
(``zoo/cli/run_commands.py`` is the command); torch is imported only inside the functions
that need it.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from zoo.errors import HubUnreachable, JobsFailed, UserInputError
from zoo.pipeline.context import RunResult, ZooRun
from zoo.pipeline.launch import LaunchOptions, check_resources
from zoo.pipeline.layout import ZooRunDir, is_zoo_run
from zoo.pipeline.leaderboard import (MAX_EXHAUSTIVE, LeaderRow, cached_latencies, format_front, format_leaderboard,
                                      leaderboard_records, pareto_front, pick_under_budget, subset_table, write_leaderboard,
                                      write_subsets)
from zoo.pipeline.zoo_file import NO_HUB_HELP, MemberSpec, check_options, default_zoo, device_kind, unique_names
from zoo.rundir import RunDir, check_out_folder, hold_folder
from zoo.timelimit import TimeBudget, format_duration, member_budget, parse_duration
from zoo.tracking import Tracking

# finetune's log lines worth showing under zoo run (the per-epoch line, the member's result).
_SHOWN = ("epoch", "cpu budget", "fold ", "cross-fitting", "out-of-fold", "holdout", "best epoch", "early stop", "warning",
          "SIG", "note")


def run_zoo(data: str | os.PathLike, out: str | os.PathLike, members: Sequence[MemberSpec] | None = None, *,
            shared: dict[str, Any] | None = None, given: dict[str, Any] | None = None, folds: int | None = None,
            fold_seed: int | None = None, cv: int = 5, max_latency: float | None = None, latency_repeats: int = 5,
            latency_backend: str = "torch", title: str = "zoo run", log: Callable[[str], None] = print,
            stop_after_epoch: int | None = None, time_limit: float | str | None = None,
            clock: Callable[[], float] = time.monotonic, launch: LaunchOptions | None = None,
            distill: dict[str, Any] | None = None) -> RunResult:
    """Run every stage of a zoo into ``out``; see the module docstring.

    ``members``: the zoo (None: the default zoo for this device, printed); ``shared``: finetune options
    for every member (a zoo file's [defaults]); ``given``: options typed on the command line, which win
    over both; ``folds``: cross-fit every member (out-of-fold selection rows, ``val/`` the holdout);
    ``cv``: folds of the ensemble fit's cross-validation; ``max_latency``: pick the best member subset
    within this many ms per image (batch 64); ``latency_backend``: what times the members, PyTorch eager or their
    exported graphs on onnxruntime (``zoo.pipeline.leaderboard.LATENCY_BACKENDS``); ``stop_after_epoch``: stop the member being trained after
    that many epochs, as a kill would (tests). Returns a ``RunResult`` (``status`` ``interrupted`` then).
    ``time_limit`` (seconds, or ``"2h"``): the training budget, measured on ``clock`` (``zoo.timelimit``);
    members that do not finish in it are left out of the ensemble and named in the report.
    ``launch`` (``zoo.pipeline.launch.LaunchOptions``): train the members' folds as separate jobs, several at a time on
    this machine or as a Slurm job array (default: one after another in this process); the later stages run here.
    ``--mlflow`` (in ``given``/``shared``) or ``MLFLOW_TRACKING_URI``: the run is an MLflow run and each
    member one nested under it; TensorBoard event files go to ``out/tb`` and each member's ``tb/``.
    ``distill`` (``zoo_file.read_distill_table``'s dict: backbone, weights, options): after scoring, the fitted
    ensemble is distilled into that student (``out/student``), scored on the holdout, timed, and added to the
    leaderboard and the report as the row "student".
    """
    from zoo.data import read_listing

    start = time.perf_counter()
    layout = ZooRunDir(check_out_folder(out, "a zoo run", is_zoo_run))
    shared, given = dict(shared or {}), check_options(dict(given or {}), "command line")
    device, threads = given.get("device") or shared.get("device"), given.get("threads") or shared.get("threads")
    listing = read_listing(data, allow_outside_root=bool(given.get("allow_outside_root", shared.get("allow_outside_root"))))
    if members is None:
        kind = device_kind(device)
        members = default_zoo(kind)
        log(f"no --backbones or --zoo: the default zoo for {kind}: "
            + ", ".join(f"{m.name} ({m.backbone})" for m in members) + " (weights from the Hugging Face hub)")
    members = unique_names(list(members), "the zoo")
    if len(members) < 2:
        raise UserInputError(f"a zoo needs at least 2 members to correlate and ensemble, got {len(members)}; "
                             "use `zoo finetune` for one backbone")
    budget = TimeBudget(parse_duration(time_limit), clock) if time_limit is not None else None
    tracking = Tracking(mlflow=given.get("mlflow", shared.get("mlflow")))
    run = ZooRun(data, layout, members, shared, given, folds, fold_seed, cv, max_latency, latency_repeats, latency_backend,
                 device, threads, title, log, listing, RunResult(layout.root, "finished"), start, tracking, None, budget,
                 clock, (launch or LaunchOptions()).validate(), distill=distill)
    check_resources(run.launch, device)  # --jobs x --gpus-per-job must fit this machine, known before anything is written
    check_members(run)
    with hold_folder(layout.root):  # a second `zoo run` on this --out refuses while this one works
        run.tracker = tracking.open(layout, layout.root.name, {
            "members": ", ".join(f"{m.name}={m.backbone}" for m in members), "folds": folds, "cv": cv,
            "time_limit": time_limit, **{f"defaults.{k}": v for k, v in shared.items()}, **given})
        run.tracking = tracking.under(run.tracker)
        return _run_stages(run, stop_after_epoch)


def _run_stages(run: ZooRun, stop_after_epoch: int | None) -> RunResult:
    with run.tracker:
        if not train_members(run, stop_after_epoch):
            if run.result.status == "finished":  # not "submitted" (--no-wait)
                run.result.status = "interrupted"
            run.result.seconds = time.perf_counter() - run.start
            run.tracker.close(stopped=True)
            return run.result
        for stage in (correlate_members, fit_weights, find_label_issues, predict_untouched, score_and_time, distill_student,
                      write_tables):
            stage(run)
    return run.result


# ---------------------------------------------------------------------------------------
# Stage 1: the members.


def member_config(run: ZooRun, spec: MemberSpec):
    """The member's FinetuneConfig: zoo file defaults, then its own options, then the command line's."""
    from finetune.config import FinetuneConfig

    values = {**run.shared, **spec.options, **run.given}
    values.update(backbone=spec.backbone, data=str(run.data), out=str(run.layout.member(spec.name).root), folds=run.folds,
                  val_from_train=not run.folds, resume=False)
    if run.fold_seed is not None:
        values["fold_seed"] = run.fold_seed
    if spec.weights:
        values["weights"] = spec.weights
    return FinetuneConfig(**values)


def check_members(run: ZooRun) -> None:
    """Before any member trains: every member's backbone name and options (a typo in member 3 must not cost
    members 1 and 2's training first), and that members already in OUT were trained on this data."""
    from zoo.backbones import check_model_name

    for spec in run.members:
        try:
            check_model_name(spec.backbone)
            member_config(run, spec).validate()
        except UserInputError as e:
            raise UserInputError(_in_member_terms(str(e), run, spec)) from None
        member = run.layout.member(spec.name)
        if member.is_run():
            _check_trained_on(run, spec, member)
    _check_cv(run)


def _check_cv(run: ZooRun) -> None:
    """The ensemble fit's cross-validation needs a row per fold: known before training, so say it then."""
    from zoo.data import split_from_train
    from zoo.folds import pool_and_holdout

    if not run.cv:
        return
    if run.folds:
        rows, what = len(pool_and_holdout(run.listing, "train")[0]), "out-of-fold rows (every train/ image)"
    else:
        first = member_config(run, run.members[0])
        rows = len(split_from_train(run.listing, first.val_fraction, first.seed).split("val"))
        what = f"validation rows (--val-fraction {first.val_fraction:g} of train/)"
    if rows < run.cv:
        raise UserInputError(f"--cv {run.cv}: the ensemble fit cross-validates on the members' {what}, and there will be "
                             f"{rows}; lower --cv (0: no cross-validation), or add images")


def _in_member_terms(message: str, run: ZooRun, spec: MemberSpec) -> str:
    """A FinetuneConfig message ("--epochs must be ...") in the words of where the option was set: the member's
    table or the zoo file's [defaults] by its key; the command line by its flag."""
    flag = re.search(r"--([a-z0-9-]+)", message)
    key = flag.group(1).replace("-", "_") if flag else None
    if key is not None and key not in run.given and key in spec.options:
        return f"{spec.where}: {message.replace(flag.group(0), key, 1)}"
    if key is not None and key not in run.given and key in run.shared and spec.source:
        return f"{spec.source} [defaults]: {message.replace(flag.group(0), key, 1)}"
    return f"{spec.where or 'member ' + spec.name}: {message}" if key is None else message


def _check_trained_on(run: ZooRun, spec: MemberSpec, member: RunDir) -> None:
    config = member.read_config()
    trained_on = (config.get("options") or {}).get("data")
    if trained_on and Path(trained_on).resolve() != Path(run.data).resolve():
        raise UserInputError(f"{member.root}: member {spec.name} was trained on {trained_on}, not on {run.data}; a zoo's "
                             "members must share their data: choose another --out (or delete that member's folder)")
    if config.get("classes") and list(config["classes"]) != list(run.listing.classes):
        raise UserInputError(f"{member.root}: member {spec.name} was trained on classes {config['classes']}, but {run.data} "
                             f"has {run.listing.classes}; choose another --out (or delete that member's folder)")


def train_members(run: ZooRun, stop_after_epoch: int | None = None) -> bool:
    """Stage 1: train every unfinished member; False when one stopped before its end (run again to continue).

    With a time limit (the run's, a member's own ``time_limit``) a member that does not finish in it is left
    out (``result.timed_out``) and the later stages go on with the members that did."""
    budget, result = run.time_budget, run.result
    folds = {spec.name: _folds_of(run, spec) for spec in run.members}
    described = ("" if not run.folds else f", {run.folds} folds each" if set(folds.values()) == {run.folds} else
                 ", cross-fitted: " + ", ".join(f"{name} ({k} folds)" for name, k in folds.items()))
    run.log(f"[1/6] fine-tuning {len(run.members)} members{described}"
            + (f" within {format_duration(budget.remaining())}" if budget else "")
            + (f", {run.launch.launcher} launcher" if run.launch.launcher != "sequential" else "") + f" -> {run.layout.members}")
    if not (_train_here(run, stop_after_epoch) if run.launch.launcher == "sequential" else _train_in_jobs(run, stop_after_epoch)):
        return False
    left_out = [m.name for m in run.members if m.name in result.timed_out and not run.layout.member(m.name).result.is_file()]
    run.members = [m for m in run.members if m.name not in left_out]
    if left_out:
        run.log(f"  time limit: left out {', '.join(left_out)}; the ensemble is fitted on {', '.join(run.names) or 'nothing'}")
    if len(run.members) < 2:
        raise UserInputError(f"only {len(run.members)} member(s) finished within the time limit ({', '.join(run.names) or 'none'}; "
                             f"left out: {', '.join(left_out)}); an ensemble needs 2. Run the same command again with a longer "
                             "--time-limit: finished members and folds are kept")
    return True


def _train_here(run: ZooRun, stop_after_epoch: int | None) -> bool:
    """The sequential launcher: each member in this process, one after another."""
    from finetune.train import TrainingInterrupted

    budget, result = run.time_budget, run.result
    for spec in run.members:
        member_time = member_budget(budget, spec.time_limit, run.clock)
        if member_time is not None and not run.layout.member(spec.name).result.is_file() and member_time.remaining() <= 0:
            result.timed_out[spec.name] = "not started: no training time left"
            run.log(f"  {spec.name}: not started, no training time left")
            continue
        try:
            stopped = _train_member(run, spec, member_config(run, spec), stop_after_epoch, member_time)
        except TrainingInterrupted:  # Ctrl-C / SIGTERM, resume state saved
            run.log(f"zoo run stopped while training {spec.name}; its resume state is saved. Run the same command again to continue")
            raise
        if stopped == "time-limit" and not run.layout.member(spec.name).result.is_file():
            result.timed_out[spec.name] = "cross-fit left unfinished: its remaining folds would not end in time"
            continue
        if stopped == "time-limit":
            result.timed_out.setdefault(spec.name, "kept, with fewer epochs: later epochs would not have ended in time")
        elif stopped not in ("finished", "early-stopped", "skipped"):
            run.log(f"  {spec.name}: stopped before its end; run the same command again to continue it")
            return False
    return True


def _train_in_jobs(run: ZooRun, stop_after_epoch: int | None) -> bool:
    """``--launcher local|slurm``: each unfinished fold (a single-split member, a probe: the member) is a job
    (``zoo.pipeline.launch``); this process plans them, waits, and assembles the cross-fits whose folds all finished.
    False when the jobs were only submitted (``--no-wait``); ``JobsFailed`` when a member is missing after them."""
    from finetune.kfold import start_cross_fit
    from zoo.pipeline.job import Job
    from zoo.pipeline.launch import launch

    budget, result, logs = run.time_budget, run.result, run.layout.logs
    run.layout.members.mkdir(parents=True, exist_ok=True)  # OUT is a zoo run from now on, even before a job starts
    jobs, planned = [], {}
    for spec in run.members:
        member = run.layout.member(spec.name)
        member_time = member_budget(budget, spec.time_limit, run.clock)
        if member_time is not None and not member.result.is_file() and member_time.remaining() <= 0:
            result.timed_out[spec.name] = "not started: no training time left"
            run.log(f"  {spec.name}: not started, no training time left")
            continue
        cfg = _prepare_member(run, spec, member_config(run, spec))
        if cfg is None:
            continue
        planned[spec.name] = cfg
        job = Job(spec.name, None, cfg.folds, cfg.to_dict(), str(logs / f"{spec.name}.log"), spec.time_limit, stop_after_epoch)
        if not cfg.folds or cfg.linear_probe:  # a probe's folds take seconds: one job
            jobs.append(job)
            continue
        start_cross_fit(cfg)
        jobs += [replace(job, fold=i, config={**job.config, "fold": i, "resume": False}, log=str(logs / f"{spec.name}-fold-{i}.log"))
                 for i in range(1, cfg.folds + 1) if not member.fold_run(i).result.is_file()]
    deadline = time.time() + budget.remaining() if budget is not None else None
    outcomes = launch(jobs, run.launch, logs, device=run.device, deadline=deadline, mlflow_parent=run.tracker.mlflow_run_id,
                      log=run.log) if jobs else []
    if any(o.status == "queued" for o in outcomes):
        run.log(f"  {len(outcomes)} job(s) submitted; run the same command again to collect them: it submits only the "
                "jobs that are neither finished nor still queued or running")
        result.status = "submitted"
        return False
    for name, cfg in planned.items():
        _assemble_cross_fit(run, run.layout.member(name), cfg)
    for name in {o.job.member for o in outcomes if o.status == "time-limit"}:
        if run.layout.member(name).result.is_file():
            result.timed_out.setdefault(name, "kept, with fewer epochs: later epochs would not have ended in time")
        elif not any(o.status == "failed" for o in outcomes if o.job.member == name):
            result.timed_out[name] = "cross-fit left unfinished: its remaining folds would not end in time"
    missing = [name for name in planned if not run.layout.member(name).result.is_file() and name not in result.timed_out]
    if missing:
        failed = [o for o in outcomes if o.status == "failed"]
        raise JobsFailed(f"member(s) {', '.join(missing)} did not finish: {len(failed)} job(s) failed ("
                         + "; ".join(f"{o.job.describe()}: {o.log}" for o in failed) + "); the stages after training need "
                         "every member. Fix the cause and run the same command again: finished folds are kept")
    return True


def _assemble_cross_fit(run: ZooRun, member: RunDir, cfg) -> None:
    """A cross-fit whose fold jobs all finished but none assembled it (two ended at once): its out-of-fold file now."""
    from finetune.member import train_member

    folds = cfg.folds if cfg.folds and not cfg.linear_probe else 0
    if member.result.is_file() or not folds or not all(member.fold_run(i).result.is_file() for i in range(1, folds + 1)):
        return
    shown = _member_log(run.log)
    train_member(replace(cfg, fold=None, resume=False), log=lambda m: None if m.startswith("fold ") else shown(m),
                 tracking=run.tracking)


def _folds_of(run: ZooRun, spec: MemberSpec) -> int | None:
    """The folds a member has (one trained earlier keeps its own) or will have."""
    member = run.layout.member(spec.name)
    return int(member.read_config()["folds"]) if member.is_cross_fit() else run.folds


def _changed_options(member: RunDir, cfg) -> list[str]:
    """Options of a finished member that differ from what this run asks (it is kept as it is)."""
    from finetune.config import NOT_RESULT_OPTIONS

    saved = member.read_config().get("options", {})
    return [k for k, v in cfg.to_dict().items()
            if k in saved and k not in NOT_RESULT_OPTIONS | {"val_from_train"} and saved[k] != v]


def _train_member(run: ZooRun, spec: MemberSpec, cfg, stop_after_epoch: int | None, time_budget: TimeBudget | None) -> str:
    """Train one member unless it is finished; how it stopped (``finetune.member.MemberResult.stopped``; ``skipped``
    when it had finished earlier)."""
    from finetune.member import train_member

    cfg = _prepare_member(run, spec, cfg)
    if cfg is None:
        return "skipped"
    member_log = _member_log(run.log)
    try:
        done = train_member(cfg, log=member_log, stop_after_epoch=stop_after_epoch, tracking=run.tracking,
                            time_budget=time_budget)
    except HubUnreachable as e:
        if not spec.weights:
            raise UserInputError(f"{e}\n{NO_HUB_HELP}") from None
        raise
    if done.kind == "probe":
        member_log(done.summary + " -> " + str(cfg.out))
    return done.stopped if done.finished or done.stopped == "time-limit" else "interrupted"


def _member_log(log: Callable[[str], None]) -> Callable[[str], None]:
    return lambda m: log("    " + m) if m.startswith(_SHOWN) or " -> " in m else None


def _prepare_member(run: ZooRun, spec: MemberSpec, cfg):
    """What training ``spec`` takes, said and checked the same for every launcher: None when it finished earlier
    (skipped); else ``cfg`` set to continue what an earlier run left (the member is then in ``result.trained``)."""
    log, result, member = run.log, run.result, run.layout.member(spec.name)
    if member.result.is_file():
        changed = _changed_options(member, cfg)
        log(f"  {spec.name}: finished earlier; skipped" + (
            f" (note: it was trained with other {', '.join('--' + c.replace('_', '-') for c in changed)}; "
            f"delete {member.root} to train it again)" if changed else ""))
        result.skipped.append(spec.name)
        return None
    if member.is_run() and bool(member.is_cross_fit()) != bool(cfg.folds):
        raise UserInputError(f"{member.root}: holds a {'cross-fit' if member.is_cross_fit() else 'single-split run'} but this "
                             f"run asks for {'--folds ' + str(cfg.folds) if cfg.folds else 'no --folds'}; keep the option it "
                             "started with, or choose another --out")
    folds = f" ({cfg.folds} folds)" if cfg.folds else ""
    if cfg.linear_probe:  # seconds, no epochs and no resume state: an unfinished probe is redone from scratch
        if member.is_run():
            if not member.read_config().get("options", {}).get("linear_probe"):
                raise UserInputError(f"{member.root}: holds an unfinished fine-tune, but member {spec.name} is now a linear "
                                     "probe; finish it with the options it started with, or delete that folder")
            shutil.rmtree(member.root)  # a probe cut off before its result.json: zoo's own partial output, redone in seconds
        log(f"  {spec.name}: linear probe of {cfg.backbone}{folds} -> {member.root}")
    else:
        resume = (member.resume_state.is_file() or any(r.resume_state.is_file() for r in member.fold_runs())) and member.is_run()
        log(f"  {spec.name}: {'continuing ' + cfg.backbone + ' from its resume state' if resume else 'fine-tuning ' + cfg.backbone}"
            f"{folds} -> {member.root}")
        if resume:
            result.resumed.append(spec.name)
        # A cross-fit continues its unfinished folds by itself; a single run is told to resume.
        cfg = replace(cfg, resume=not cfg.folds and member.resume_state.is_file())
    result.trained.append(spec.name)
    return cfg


# ---------------------------------------------------------------------------------------
# Stages 2-3: correlation and weights on the selection rows.


def correlate_members(run: ZooRun) -> None:
    """Stage 2: the members' selection rows, aligned, and how alike they are."""
    from ensemble.diversity import correlate, write_correlation
    from zoo.predictions import align_predictions, load_predictions

    run.log(f"[2/6] correlation of the {'out-of-fold' if run.folds else 'validation'} predictions -> {run.layout.correlation}")
    run.select = align_predictions([load_predictions(r.root, run.select_split) for r in run.runs])
    run.correlation = correlate(run.select, k=len(run.select), names=run.names)
    write_correlation(run.correlation, run.layout.correlation)


def fit_weights(run: ZooRun) -> None:
    """Stage 3: ensemble weights fitted on the selection rows (cross-validated scores)."""
    from ensemble.file import write_ensemble
    from ensemble.fit import fit_ensemble

    run.log(f"[3/6] fitting ensemble weights on them (slsqp{f', {run.cv}-fold cross-validated' if run.cv else ''}) "
            f"-> {run.layout.ensemble}")
    run.ensemble = fit_ensemble(run.select, method="slsqp", cv=run.cv)
    write_ensemble(run.layout.ensemble, run.ensemble)
    for w in run.ensemble.warnings:
        run.log(f"  warning: {w}")


def find_label_issues(run: ZooRun) -> None:
    """Stage 3, cross-fitted members: suspected label errors among the pool images -> ``label_issues.csv``."""
    from ensemble.predict import ensemble_predictions
    from zoo.pipeline import label_issues

    if not run.folds:
        return
    if not label_issues.cleanlab_installed():
        run.log(f"  no {run.layout.label_issues.name}: {label_issues.CLEANLAB_MISSING}")
        return
    ens = run.ensemble.without_zero_weights()
    kept = [run.select[run.names.index(m.name)] for m in ens.members]
    preds = ensemble_predictions(ens, kept, "oof", kept[0].tta, str(run.layout.ensemble))
    run.label_issues = label_issues.find_label_issues(preds, "the fitted ensemble")
    label_issues.write_label_issues(run.layout.label_issues, run.label_issues)
    run.log(f"  label issues: {run.label_issues.summary()} -> {run.layout.label_issues}")


# ---------------------------------------------------------------------------------------
# Stages 4-5: the untouched splits, scores and latency.


def _cached_predictions(path: Path, make):
    from zoo.predictions import read_predictions, write_predictions

    if path.is_file():
        return read_predictions(path)
    preds = make()
    write_predictions(path, preds)
    return preds


def _member_predictions(run: ZooRun, member: RunDir, split: str):
    """A member's predictions of the dataset's ``split`` (val or test), made once and kept in its run directory."""
    from finetune.inference import predict_run
    from zoo.predictions import load_predictions

    if split == "val" and run.folds:
        return load_predictions(member.root, "val")  # the fold models' mean, written by the cross-fit
    return _cached_predictions(member.predictions("holdout" if split == "val" else "test"),
                               lambda: predict_run(member.root, run.data, split=split, **run.predict_options))


def predict_untouched(run: ZooRun) -> None:
    """Stage 4: each member's predictions of the holdout and of ``test/``; the ensemble's of ``test/``."""
    from ensemble.predict import predict_ensemble
    from ensemble.score import score_ensemble, write_score_table
    from zoo.predictions import align_predictions, write_output

    holdout_split, has_test = run.holdout_split, run.has_test
    run.log("[4/6] predicting " + " and ".join(f"{s}/" for s in dict.fromkeys(filter(None, [holdout_split, "test" if has_test else None])))
            if holdout_split else "[4/6] no val/ or test/ folder: no holdout to score on")
    member_holdout = [_member_predictions(run, member, holdout_split) for member in run.runs] if holdout_split else None
    run.holdout = align_predictions(member_holdout) if member_holdout else None
    if not has_test:
        return
    # No val/: the holdout is test/, predicted just above (into the same files).
    test = member_holdout if holdout_split == "test" else [_member_predictions(run, member, "test") for member in run.runs]
    kept = [test[run.names.index(m.name)] for m in run.ensemble.members]
    write_output(run.layout.test_predictions, predict_ensemble(run.ensemble, predictions=kept))
    if holdout_split != "test" and (test[0].labels >= 0).all():
        run.test_table = score_ensemble(run.ensemble, predictions=test)
        write_score_table(run.layout.test_scores, run.test_table)


def score_and_time(run: ZooRun) -> None:
    """Stage 5: the ensemble, equal weights and every member scored on the labelled holdout; each member's latency."""
    from ensemble.score import score_ensemble, write_score_table

    run.log("[5/6] scoring on the holdout and measuring latency on this device")
    run.latency = cached_latencies(run.layout.latency, run.names, run.runs, run.latency_repeats, run.device, run.threads,
                                   run.log, backend=run.latency_backend)
    if run.holdout is not None and (run.holdout[0].labels >= 0).all():
        run.holdout_table = score_ensemble(run.ensemble, predictions=run.holdout)
        write_score_table(run.layout.holdout_scores, run.holdout_table)


def distill_student(run: ZooRun) -> None:
    """Stage 5, with ``distill``: the fitted ensemble distilled into one student (``zoo.pipeline.distill``), trained on
    the pool (out-of-fold teacher targets with cross-fitted members) for a fixed schedule, then scored on the holdout
    and timed like a member. A finished student is kept; an interrupted one continues."""
    if not run.distill:
        return
    from zoo.pipeline.distill import distill
    from zoo.pipeline.leaderboard import measure_latency

    spec, student = dict(run.distill), run.layout.student
    options = {k: v for k, v in {**run.shared, **run.given}.items() if k in ("threads", "workers", "device", "cache", "seed")}
    options.update(spec.pop("options", {}))
    backbone = spec.pop("backbone")
    run.log(f"distilling the ensemble into {backbone} -> {student.root}")
    if not student.result.is_file():
        quiet = lambda m: run.log(f"  {m}") if m.startswith(_SHOWN + ("teacher",)) else None  # noqa: E731
        if student.resume_state.is_file():
            distill(None, None, None, student.root, resume=True, log=quiet, **{k: v for k, v in options.items()
                                                                                 if k in ("threads", "workers", "device")})
        else:
            distill(run.layout.ensemble, run.data, backbone, student.root, log=quiet, **spec, **options)
    holdout = None
    if run.holdout_split:
        from finetune.inference import predict_run

        preds = _cached_predictions(student.predictions("holdout"),
                                    lambda: predict_run(student.root, run.data, split=run.holdout_split, **run.predict_options))
        if (preds.labels >= 0).all():
            from ensemble.metrics import score_table_from_log_probs

            holdout = score_table_from_log_probs(preds.log_probabilities(), preds.labels)
    timed = measure_latency(student.root, repeats=run.latency_repeats, device=run.device, threads=run.threads,
                            backend=run.latency_backend)
    run.student = LeaderRow("student", "student", f"{backbone} distilled", timed["params"], timed["ms_per_image_batch1"],
                            timed["ms_per_image_batch64"], {}, holdout, None)


# ---------------------------------------------------------------------------------------
# Stage 6: the tables, the summary and the report.


def leaderboard_rows(run: ZooRun) -> list[LeaderRow]:
    """Every member, the equal-weight average and the fitted ensemble, with selection and holdout scores."""
    from ensemble.metrics import score_table_from_log_probs

    latency, labels, members = run.latency, run.select[0].labels, run.members
    weights = {m.name: m.weight for m in run.ensemble.members}
    by_row = {r.name: r for r in run.holdout_table.rows} if run.holdout_table else {}

    def hold(name):
        r = by_row.get(name)
        return {"accuracy": r.accuracy, "log_loss": r.log_loss, "ece": r.ece} if r else None

    def cost(indices):
        return (sum(latency[j]["params"] for j in indices), sum(latency[j]["ms_per_image_batch1"] for j in indices),
                sum(latency[j]["ms_per_image_batch64"] for j in indices))

    rows = [LeaderRow(spec.name, "member" if spec.name in weights else "dropped member", spec.backbone,
                      *cost([j]), score_table_from_log_probs(p.log_probabilities(), labels), hold(spec.name),
                      weights.get(spec.name, 0.0))
            for j, (spec, p) in enumerate(zip(members, run.select))]
    select_probs = np.stack([p.probabilities() for p in run.select])
    rows.append(LeaderRow("equal-weight average", "equal weights", f"{len(members)} members", *cost(range(len(members))),
                          score_table_from_log_probs(np.log(np.clip(select_probs.mean(axis=0), 1e-30, None)), labels),
                          hold("equal weights"), None))
    ens = run.ensemble
    cv_scores = (ens.scores.get("cv") or {}).get("ensemble") or ens.scores["in_sample"]["ensemble"]
    kept = [run.names.index(n) for n in weights]
    rows.append(LeaderRow("fitted ensemble", "ensemble", f"{ens.method}, {len(kept)} members", *cost(kept),
                          {k: cv_scores.get(k) for k in ("accuracy", "log_loss", "ece")}, hold("ensemble"), None))
    if run.student is not None:  # trained on every pool image: no selection-row score of its own, the holdout alone
        rows.append(run.student)
    return rows


def write_tables(run: ZooRun) -> None:
    """Stage 6: ``leaderboard.csv``, ``pareto.csv``, the summary the command prints, and ``report.html``."""
    from ensemble.report import format_correlation

    result, select_split, labels = run.result, run.select_split, run.select[0].labels
    rows = leaderboard_rows(run)
    write_leaderboard(run.layout.leaderboard, rows, select_split)
    holdout = run.holdout if run.holdout_table else None
    subsets = subset_table(run.names, [e["ms_per_image_batch64"] for e in run.latency], [e["params"] for e in run.latency],
                           np.stack([p.probabilities() for p in run.select]), labels,
                           np.stack([p.probabilities() for p in holdout]) if holdout else None,
                           holdout[0].labels if holdout else None)
    front = [subsets[i] for i in pareto_front([s.latency_ms for s in subsets], [s.accuracy for s in subsets],
                                              [-s.log_loss for s in subsets])]
    pick = pick_under_budget(subsets, run.max_latency) if run.max_latency is not None else None
    write_subsets(run.layout.pareto, subsets, front)
    result.leaderboard, result.subsets, result.front, result.pick = leaderboard_records(rows, select_split), subsets, front, pick
    result.ensemble = run.ensemble

    correlation_text = format_correlation(run.correlation, "prob_corr")
    lines = _summary_lines(run, rows, subsets, front, pick, correlation_text)
    run.log("[6/6] writing the report")
    from zoo.pipeline.report_html import ReportInputs, write_report

    result.seconds = time.perf_counter() - run.start
    result.report = write_report(run.layout.report, ReportInputs(
        title=run.title, leaderboard=rows, select_split=select_split, subsets=subsets, front=front, pick=pick,
        max_latency=run.max_latency, heatmap=run.layout.heatmap, ensemble=run.ensemble, names=run.names, runs=run.runs,
        select=run.select, holdout=holdout, holdout_split=run.holdout_split, listing=run.listing, seconds=result.seconds,
        trained=result.trained, skipped=result.skipped, correlation_text=correlation_text, label_issues=run.label_issues,
        timed_out=result.timed_out))
    lines += ["", f"trained {len(result.trained)} member(s) ({', '.join(result.trained) or 'none'}), "
                  f"skipped {len(result.skipped)} finished earlier; {result.seconds:.0f} s; report: {result.report}"]
    lines += [f"time limit: {name}: {why}" for name, why in result.timed_out.items()]
    result.summary = "\n".join(lines)
    track_scores(run, result.leaderboard)


def track_scores(run: ZooRun, records: list[dict]) -> None:
    """The run's scores to TensorBoard and MLflow (``zoo.tracking``): each leaderboard row's (``scores/<row>/<metric>``,
    one TensorBoard section), and its files."""
    run.tracker.log_metrics({f"scores/{r['name'].replace(' ', '_')}/{key}": value for r in records for key, value in r.items()
                             if key.endswith(("accuracy", "log_loss", "ece")) or key == "weight"})
    run.tracker.log_artifacts([run.layout.report, run.layout.leaderboard, run.layout.ensemble, run.layout.pareto])


def _summary_lines(run: ZooRun, rows, subsets, front, pick, correlation_text: str) -> list[str]:
    """What ``zoo run`` prints at the end: the leaderboard, the Pareto front, test/ scores, the correlation."""
    s = run.select_split
    lines = [f"Leaderboard ({s}: {'out-of-fold rows of train/' if run.folds else 'validation split of train/'}, "
             f"{len(run.select[0].labels)} images; the fitted ensemble's {s} scores are cross-validated"
             + (f"; holdout: the dataset's {run.holdout_split}/, {len(run.holdout[0].ids)} images never trained or selected on)"
                if run.holdout_table else "; no labelled holdout)"),
             format_leaderboard(rows, s)]
    passes = [(name, entry["passes"], member.is_cross_fit()) for name, entry, member in zip(run.names, run.latency, run.runs)]
    notes = ["a cross-fitted member makes one per fold model, so its holdout scores cost more: "
             + ", ".join(f"{name} {k}x" for name, k, _ in passes if k > 1)] if any(k > 1 for _, k, _ in passes) else []
    shared = [name for name, k, cross_fit in passes if cross_fit and k == 1]
    if shared:
        notes.append(f"{', '.join(shared)}: fold models that share their backbone, one pass and a head per fold")
    if notes:
        lines.append("  (latency is one prediction pass; " + "; ".join(notes) + ")")
    lines += ["", f"Accuracy vs latency: the Pareto front of {len(subsets)} member subsets "
                  f"({'all' if len(run.members) <= MAX_EXHAUSTIVE else 'greedy'}; equal weights, chosen on {s}):",
              format_front(front, s, pick)]
    if run.max_latency is not None:
        lines.append(f"best subset within {run.max_latency:g} ms/image: " + (
            f"{' + '.join(pick.members)} ({pick.latency_ms:.3g} ms, {s} accuracy {pick.accuracy:.4f}"
            + (f", holdout {pick.holdout_accuracy:.4f}" if pick.holdout_accuracy is not None else "") + ")"
            if pick else f"none (the fastest member takes {min(x.latency_ms for x in subsets):.3g} ms)"))
    if run.test_table is not None:
        from ensemble.score import format_score_table

        lines += ["", "test/ (also untouched):", format_score_table(run.test_table)]
    lines += ["", f"Correlation of the {s} predictions:", correlation_text]
    return lines
