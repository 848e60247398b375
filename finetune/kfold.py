"""Cross-fitting: ``zoo finetune --folds K`` trains K fold models of one backbone.

Fold model i trains on the other K-1 folds of the pool and picks its epoch on fold i, so
its predictions of fold i come from a model that never saw those images. Put together,
the K held-out folds are out-of-fold predictions of every pool image
(``RUN/predictions/oof.safetensors``): the rows ensemble weights can be fitted on
without the leak of fitting them on the images that chose each member's epoch. The
dataset's ``val/`` stays out of training and selection (the holdout); the K models'
mean probability on it is ``RUN/predictions/val.safetensors``.

The layout (``RUN/config.json``, ``RUN/folds.json``, ``RUN/fold-1`` ... ``RUN/fold-K``, each
an ordinary run directory) lets folds run anywhere: ``--fold I`` trains one (a GPU or a
Slurm array task per fold); whichever finishes the last fold assembles the out-of-fold
file. Re-running the command skips finished folds and continues an interrupted one from
its resume state, so a killed cross-fit costs only the unfinished work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, replace

import numpy as np

from finetune import distributed
from finetune.config import NOT_RESULT_OPTIONS, FinetuneConfig, check_resume_options
from finetune.engine import log_loss_and_accuracy, quiet_log, stderr_log
from finetune.inference import predict_run
from finetune.train import FinetuneResult, TrainingInterrupted, finetune, run_name
from zoo import atomic
from zoo.data import CLASS_ORDER, read_listing
from zoo.errors import UserInputError
from zoo.folds import fold_sizes, folds_record, pool_folds, write_folds
from zoo.predictions import Predictions, mean_probability, read_predictions, write_predictions
from zoo.progress import progress as progress_bar
from zoo.rundir import RunDir, check_out_folder, hold_folder, is_finetune_run
from zoo.timelimit import TimeBudget
from zoo.tracking import Tracker, Tracking



@dataclass
class CrossFitResult:
    run: RunDir
    folds: int
    trained: dict[int, FinetuneResult]  # folds trained (or continued) by this call
    skipped: list[int]  # folds finished earlier
    assembled: bool  # every fold done and the out-of-fold file written
    scores: dict[str, dict[str, float]]  # oof / holdout: log_loss, accuracy (when assembled)
    stopped: str = "finished"  # finished | interrupted | waiting (other folds still to run) | time-limit (folds not started)
    rank: int = 0


def finetune_folds(cfg: FinetuneConfig, *, log=stderr_log, progress: bool | None = None,
                   stop_after_epoch: int | None = None, tracking: Tracking | None = None,
                   time_budget: TimeBudget | None = None) -> CrossFitResult:
    """Cross-fit ``cfg.backbone``: train the fold models of ``cfg.folds`` (or ``cfg.fold`` alone) into
    ``cfg.out/fold-i``, then, once every fold is finished, write the out-of-fold and holdout predictions.

    ``stop_after_epoch`` is passed to each fold (tests stop a fold part-way, as a kill would).
    Under torchrun the folds run in turn, each data-parallel over all processes. ``tracking``: the
    cross-fit is one MLflow run, its fold models runs nested under it. ``time_budget``: a fold starts
    only when an epoch of it and of every fold after it still fits (``stopped`` is ``time-limit`` else);
    finished folds are kept, and running the command again with more time continues.
    """
    run = RunDir(check_out_folder(cfg.out, "a zoo finetune run", is_finetune_run))
    # A process of all folds holds the whole run; one of `--fold I` holds only its fold's folder (in finetune()),
    # so the K fold processes of one cross-fit run side by side.
    with contextlib.nullcontext() if cfg.fold else hold_folder(run.root):
        return _finetune_folds(run, cfg, log, progress, stop_after_epoch, tracking, time_budget)


def start_cross_fit(cfg: FinetuneConfig) -> RunDir:
    """Write a cross-fit's ``RUN/config.json`` and ``RUN/folds.json`` (options checked against a cross-fit already in
    ``cfg.out``) before its ``--fold I`` processes start side by side: each then finds the run made and checks its
    own options against it, instead of racing to make it. Writes what ``--fold I`` would, the same bytes."""
    run = RunDir(check_out_folder(cfg.out, "a zoo finetune run", is_finetune_run))
    with hold_folder(run.root):
        cfg = _options_to_run(replace(cfg, fold=None, resume=False), run).validate()
        listing = read_listing(cfg.data, allow_outside_root=cfg.allow_outside_root)
        _, holdout, folds, excluded = pool_folds(listing, cfg.folds, cfg.fold_seed, cfg.pool, cfg.exclude)
        write_cross_fit_parent(run, cfg, listing.classes, folds, "val" if holdout else None, excluded)
    return run


def _finetune_folds(run: RunDir, cfg: FinetuneConfig, log, progress: bool | None, stop_after_epoch: int | None,
                    tracking: Tracking | None, time_budget: TimeBudget | None) -> CrossFitResult:
    cfg = _options_to_run(cfg, run).validate()
    log = _warnings_once(log)  # every fold model starts alike: a warning about its options is said once, not K times
    dist = distributed.setup(cfg.device)  # once for all folds: each fold's finetune() joins this group
    try:
        if not dist.is_main:
            log = quiet_log
        listing = read_listing(cfg.data, allow_outside_root=cfg.allow_outside_root)
        pool, holdout, folds, excluded = pool_folds(listing, cfg.folds, cfg.fold_seed, cfg.pool, cfg.exclude)
        if dist.is_main:
            write_cross_fit_parent(run, cfg, listing.classes, folds, "val" if holdout else None, excluded)
        dist.barrier()
        log(f"cross-fitting {cfg.backbone}: {len(pool)} pool images ({cfg.pool}) in {cfg.folds} folds of {fold_sizes(folds, cfg.folds)} "
            f"(--fold-seed {cfg.fold_seed}{excluded_note(excluded, cfg.exclude)}); holdout: "
            + (f"{len(holdout)} val/ images, never trained or selected on" if holdout else "none"))
        result = CrossFitResult(run, cfg.folds, {}, [], False, {}, rank=dist.rank)
        todo = [cfg.fold] if cfg.fold else list(range(1, cfg.folds + 1))
        tracking = tracking or Tracking(mlflow=cfg.mlflow)
        tracker = tracking.open(run, run_name(run), cfg.to_dict()) if dist.is_main else Tracker()
        pending = [f for f in todo if not run.fold_run(f).result.is_file()]
        with tracker, progress_bar(len(todo), f"cross-fit of {cfg.backbone}", unit="folds", enabled=progress if dist.is_main else False) as bar:
            for fold in todo:
                fold_run = run.fold_run(fold)
                if fold_run.result.is_file():
                    log(f"fold {fold}/{cfg.folds}: finished earlier ({fold_run.root}); skipped")
                    result.skipped.append(fold)
                    bar.update(1)
                    continue
                if time_budget is not None:
                    time_budget.later_epochs = len(pending) - pending.index(fold) - 1
                    if dist.max([int(not time_budget.fits_epoch())])[0]:
                        log(f"time limit: folds {pending[pending.index(fold):]} would not all end in time "
                            f"({time_budget.describe()}); the cross-fit is left unfinished (run again to continue it)")
                        result.stopped = "time-limit"
                        tracker.close(stopped=True)
                        return result
                resume = fold_run.resume_state.is_file()
                log(f"fold {fold}/{cfg.folds}: " + ("continuing from its resume state" if resume else "training") + f" -> {fold_run.root}")
                fold_cfg = replace(cfg, out=str(fold_run.root), fold=fold, resume=resume)
                try:
                    trained = finetune(fold_cfg, log=log, progress=progress, stop_after_epoch=stop_after_epoch,
                                       tracking=tracking.under(tracker), time_budget=time_budget)
                except TrainingInterrupted:
                    log(f"the cross-fit continues with: zoo finetune --resume --out {run.root}")
                    raise
                result.trained[fold] = trained
                if trained.stopped == "interrupted":
                    result.stopped = "interrupted"
                    tracker.close(stopped=True)
                    return result
                if dist.is_main and holdout:
                    _predict_holdout(fold_run, cfg, log, progress)
                dist.barrier()
                bar.update(1)
        unfinished = [i for i in range(1, cfg.folds + 1) if not run.fold_run(i).result.is_file()]
        if unfinished:
            log(f"folds {unfinished} are not finished yet; the out-of-fold predictions are written when the last one ends")
            result.stopped = "waiting"
            return result
        if dist.is_main:
            result.scores = assemble(run, cfg, folds, bool(holdout), log)
            tracker.log_metrics({f"{split}_{k}": v for split, s in result.scores.items() for k, v in s.items()})
            tracker.log_artifacts([run.config, run.folds, run.result])
        dist.barrier()
        result.assembled = True
        return result
    finally:
        dist.cleanup()


def _warnings_once(log):
    said: set[str] = set()

    def once(line: str) -> None:
        if line.startswith("warning:"):
            if line in said:
                return
            said.add(line)
        log(line)
    return once


def _options_to_run(cfg: FinetuneConfig, run: RunDir) -> FinetuneConfig:
    """The options of this cross-fit: the saved ones for ``--resume``; else the command's, which must
    match those of a cross-fit already in ``--out`` (re-running the command continues it)."""
    if not run.is_run():
        if cfg.resume:
            raise UserInputError(f"{run.root}: nothing to resume (no config.json); start the cross-fit without --resume")
        return cfg
    saved = run.read_config()
    if saved.get("kind") != "cross-fit":
        raise UserInputError(f"{run.root}: holds a single-split run, not a cross-fit; choose another --out for --folds")
    saved_cfg = FinetuneConfig.from_dict(saved["options"])
    if cfg.resume:
        check_resume_options(cfg, saved_cfg, run.root)
        return replace(saved_cfg, fold=cfg.fold if cfg.fold is not None else saved_cfg.fold, resume=False,
                       **{name: getattr(cfg, name) if getattr(cfg, name) is not None else getattr(saved_cfg, name)
                          for name in ("workers", "threads", "device")})
    for f in dataclasses.fields(FinetuneConfig):
        if f.name not in NOT_RESULT_OPTIONS and getattr(cfg, f.name) != getattr(saved_cfg, f.name):
            raise UserInputError(f"{run.root}: holds a cross-fit with --{f.name.replace('_', '-')} {getattr(saved_cfg, f.name)!r}, "
                                 f"this command asks for {getattr(cfg, f.name)!r}; continue it with the same options "
                                 "(or `zoo finetune --resume --out RUN`), or choose another --out")
    return cfg


def write_cross_fit_parent(run: RunDir, cfg: FinetuneConfig, classes: list[str], folds: dict[str, int], holdout_split: str | None,
                           excluded: list[str]) -> None:
    """``RUN/config.json`` and ``RUN/folds.json``: the same bytes from every ``--fold`` task (atomic writes)."""
    write_folds(run.root, folds_record(folds, cfg.folds, cfg.fold_seed, cfg.pool, holdout_split))
    if not run.is_run():
        atomic.write_json(run.config, {
            "kind": "cross-fit", "backbone": cfg.backbone, "classes": classes, "class_order": CLASS_ORDER,
            "num_classes": len(classes), "folds": cfg.folds, "fold_runs": [f"fold-{i}" for i in range(1, cfg.folds + 1)],
            "holdout_split": holdout_split, "options": replace(cfg, fold=None, resume=False).to_dict(), "excluded_ids": excluded,
        })


def excluded_note(excluded: list[str], source: str | None) -> str:
    """What a cross-fit's first line says about ``--exclude``."""
    return f"; {len(excluded)} image(s) left out of every fold (--exclude {source})" if excluded else ""


def _predict_holdout(fold_run: RunDir, cfg: FinetuneConfig, log, progress: bool | None = None) -> Predictions:
    """The fold model's predictions of the holdout (the dataset's val split), kept in its run directory."""
    path = fold_run.predictions("holdout")
    if path.is_file():
        return read_predictions(path)
    preds = predict_run(fold_run.root, cfg.data, split="val", workers=cfg.workers, threads=cfg.threads, device=cfg.device,
                        log=log, allow_outside_root=cfg.allow_outside_root, progress=progress)
    write_predictions(path, preds)
    return preds


def assemble(run: RunDir, cfg: FinetuneConfig, folds: dict[str, int], has_holdout: bool, log) -> dict[str, dict[str, float]]:
    """Write ``oof.safetensors`` (each pool image once, from the fold model that did not train on it)
    and, with a holdout, ``val.safetensors`` (the fold models' mean probability), for the run and for
    each of its snapshots. Returns the run's scores."""
    fold_runs = [run.fold_run(i) for i in range(1, cfg.folds + 1)]
    scores = _assemble(run, cfg, fold_runs, folds, has_holdout, log)
    for index in range(1, cfg.restarts + 2) if cfg.snapshots else ():
        # Snapshot c of the cross-fit: a cross-fit of its own whose fold models are each fold's snapshot c.
        snapshot = run.snapshot(index)
        config = {**run.read_config(), "fold_runs": [f"../fold-{i}/snapshot-{index}" for i in range(1, cfg.folds + 1)],
                  "snapshot": {"index": index, "of": cfg.restarts + 1}}
        atomic.write_json(snapshot.config, config)
        atomic.write_text(snapshot.folds, run.folds.read_text(encoding="utf-8"))
        log(f"snapshot {index}/{cfg.restarts + 1}:")
        _assemble(snapshot, cfg, [r.snapshot(index) for r in fold_runs], folds, has_holdout, log)
    return scores


def _assemble(run: RunDir, cfg: FinetuneConfig, fold_runs: list[RunDir], folds: dict[str, int], has_holdout: bool,
              log) -> dict[str, dict[str, float]]:
    parts = [read_predictions(r.predictions("val")) for r in fold_runs]
    rows: dict[str, tuple[int, int]] = {}  # id -> (fold, row)
    for fold, part in enumerate(parts, start=1):
        for row, sample_id in enumerate(part.ids):
            if folds.get(sample_id) != fold:  # a model scored an image it may have trained on: never fit on that
                raise UserInputError(f"{fold_runs[fold - 1].predictions('val')}: holds {sample_id!r}, which is in fold "
                                     f"{folds.get(sample_id)} (not {fold}); the fold runs do not match {run.folds}; cross-fit again")
            rows[sample_id] = (fold, row)
    ids = sorted(rows)
    oof = Predictions(logits=np.stack([parts[rows[i][0] - 1].logits[rows[i][1]] for i in ids]),
                      labels=np.array([parts[rows[i][0] - 1].labels[rows[i][1]] for i in ids]), ids=ids,
                      classes=parts[0].classes, backbone=cfg.backbone, run=str(run.root.resolve()), split="oof")
    write_predictions(run.predictions("oof"), oof)
    missing = len(folds) - len(ids)
    scores = {"oof": _scores(oof)}
    log(f"out-of-fold: {len(ids)} pool images{f' ({missing} unreadable, skipped)' if missing else ''}: log loss "
        f"{scores['oof']['log_loss']:.4f}, accuracy {scores['oof']['accuracy']:.4f} -> {run.predictions('oof')}")
    if has_holdout:
        held = [_predict_holdout(r, cfg, log) for r in fold_runs]
        mean = mean_probability(held, backbone=cfg.backbone, run=str(run.root.resolve()), split="val")
        write_predictions(run.predictions("val"), mean)
        scores["holdout"] = _scores(mean)
        log(f"holdout (val/, mean of {cfg.folds} fold models): log loss {scores['holdout']['log_loss']:.4f}, accuracy "
            f"{scores['holdout']['accuracy']:.4f} -> {run.predictions('val')}")
    atomic.write_json(run.result, {"status": "finished", "folds": cfg.folds, "scores": scores,
                                   "fold_results": [_read_json(r.result) for r in fold_runs]})
    return scores


def _scores(preds: Predictions) -> dict[str, float]:
    loss, accuracy = log_loss_and_accuracy(preds.logits, preds.labels)
    return {"log_loss": loss, "accuracy": accuracy, "images": len(preds.ids)}


def _read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))
