"""``zoo run``: fine-tune a zoo of backbones, correlate them, fit and score the ensemble, write the report.

One call runs every stage through the same library functions as the single commands:

1. each member is fine-tuned into ``OUT/members/<name>`` (``finetune``, or ``finetune_folds``
   with ``folds``). A member whose ``result.json`` exists is finished and skipped; one with
   resume state (``last.pt``) is continued from it. Re-running after a kill, or after adding a
   member to the zoo, costs only the unfinished work; Ctrl-C saves the resume state.
2. ``correlate`` on the members' selection rows: out-of-fold predictions with ``folds``, else
   each run's validation split (taken from ``train/``, so that ``val/`` stays untouched).
3. ``fit_ensemble`` on the same rows (cross-validated scores).
4. the holdout (the dataset's ``val/``, else ``test/``) and ``test/`` are predicted by each
   member once (kept in its run directory), and the ensemble predicts ``test/``.
5. ``score_ensemble`` on the holdout; the latency of each member is measured on this device.
6. the leaderboard (``leaderboard.csv``), the accuracy-vs-latency Pareto front of member
   subsets (``pareto.csv``) and ``report.html``.

The members come from ``zoo/cli/zoo_file.py``, the latency, leaderboard and Pareto front
from ``zoo/cli/leaderboard.py``, the report from ``zoo/cli/report_html.py``. No click here
(``zoo/cli/run_commands.py`` is the command); torch is imported only inside the functions
that need it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from zoo import atomic
from zoo.cli.leaderboard import (MAX_EXHAUSTIVE, LeaderRow, Subset, format_front, format_leaderboard, measure_latency,
                                 pareto_front, pick_under_budget, subset_table, write_leaderboard, write_subsets)
from zoo.cli.zoo_file import NO_HUB_HELP, MemberSpec, check_options, default_zoo, device_kind, unique_names
from zoo.errors import HubUnreachable, UserInputError
from zoo.rundir import RunDir

# finetune's log lines worth showing under zoo run (the per-epoch line, the member's result).
_SHOWN = ("epoch", "cpu budget", "fold ", "cross-fitting", "out-of-fold", "holdout", "best epoch", "early stop", "warning",
          "SIG", "note")


@dataclass
class RunResult:
    out: Path
    status: str  # finished | interrupted
    trained: list[str] = field(default_factory=list)  # members trained (or continued) by this call
    resumed: list[str] = field(default_factory=list)  # of those, continued from resume state
    skipped: list[str] = field(default_factory=list)  # finished earlier
    leaderboard: list[LeaderRow] = field(default_factory=list)
    subsets: list[Subset] = field(default_factory=list)
    front: list[Subset] = field(default_factory=list)
    pick: Subset | None = None
    summary: str = ""
    report: Path | None = None
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------
# The run.


def _member_config(spec: MemberSpec, data, out: Path, shared: dict, given: dict, folds: int | None,
                   fold_seed: int | None):
    from finetune.config import FinetuneConfig

    values = {**shared, **spec.options, **given}
    values.update(backbone=spec.backbone, data=str(data), out=str(out / "members" / spec.name), folds=folds,
                  val_from_train=not folds, resume=False)
    if fold_seed is not None:
        values["fold_seed"] = fold_seed
    if spec.weights:
        values["weights"] = spec.weights
    return FinetuneConfig(**values)


def _changed_options(run: RunDir, cfg) -> list[str]:
    """Options of a finished member that differ from what this run asks (it is kept as it is)."""
    from finetune.kfold import NOT_RESULT_OPTIONS

    saved = run.read_config().get("options", {})
    return [k for k, v in cfg.to_dict().items()
            if k in saved and k not in NOT_RESULT_OPTIONS | {"val_from_train"} and saved[k] != v]


def _train_member(spec: MemberSpec, cfg, run: RunDir, result: RunResult, log, stop_after_epoch: int | None) -> bool:
    """Fine-tune one member unless it is finished; True when it is finished afterwards."""
    from finetune.kfold import finetune_folds
    from finetune.train import finetune

    if run.result.is_file():
        changed = _changed_options(run, cfg)
        log(f"  {spec.name}: finished earlier; skipped" + (
            f" (note: it was trained with other {', '.join('--' + c.replace('_', '-') for c in changed)}; "
            f"delete {run.root} to train it again)" if changed else ""))
        result.skipped.append(spec.name)
        return True
    if run.is_run() and bool(run.is_cross_fit()) != bool(cfg.folds):
        raise UserInputError(f"{run.root}: holds a {'cross-fit' if run.is_cross_fit() else 'single-split run'} but this run "
                             f"asks for {'--folds ' + str(cfg.folds) if cfg.folds else 'no --folds'}; keep the option it "
                             "started with, or choose another --out")
    member_log = (lambda m: log("    " + m) if m.startswith(_SHOWN) or " -> " in m else None)
    if cfg.linear_probe:  # seconds, no epochs and no resume state: an unfinished probe is redone from scratch
        from finetune.probe import linear_probe

        if run.is_run():
            if not run.read_config().get("options", {}).get("linear_probe"):
                raise UserInputError(f"{run.root}: holds an unfinished fine-tune, but member {spec.name} is now a linear "
                                     "probe; finish it with the options it started with, or delete that folder")
            shutil.rmtree(run.root)  # a probe cut off before its result.json: zoo's own partial output, redone in seconds
        log(f"  {spec.name}: linear probe of {cfg.backbone}{' (' + str(cfg.folds) + ' folds)' if cfg.folds else ''} -> {run.root}")
        result.trained.append(spec.name)
        member_log(linear_probe(cfg, log=member_log).summary + " -> " + str(run.root))
        return True
    resume = (run.resume_state.is_file() or any(r.resume_state.is_file() for r in run.fold_runs())) and run.is_run()
    log(f"  {spec.name}: {'continuing ' + cfg.backbone + ' from its resume state' if resume else 'fine-tuning ' + cfg.backbone}"
        f"{' (' + str(cfg.folds) + ' folds)' if cfg.folds else ''} -> {run.root}")
    result.trained.append(spec.name)
    if resume:
        result.resumed.append(spec.name)
    try:
        if cfg.folds:
            done = finetune_folds(cfg, log=member_log, stop_after_epoch=stop_after_epoch)
            return done.assembled
        done = finetune(replace(cfg, resume=run.resume_state.is_file()), log=member_log, stop_after_epoch=stop_after_epoch)
        return done.stopped != "interrupted"
    except HubUnreachable as e:
        if not spec.weights:
            raise UserInputError(f"{e}\n{NO_HUB_HELP}") from None
        raise


def _cached_predictions(path: Path, make):
    from zoo.predictions import read_predictions, write_predictions

    if path.is_file():
        return read_predictions(path)
    preds = make()
    write_predictions(path, preds)
    return preds


def _latencies(out: Path, names: list[str], runs: list[RunDir], repeats: int, device, threads, log) -> list[dict]:
    """Each member's latency, measured once per model file, device and thread count (kept in OUT/latency.json:
    re-running a finished zoo does not time it again; a retrained member is timed again)."""
    path = out / "latency.json"
    cache = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    measured = []
    for name, run in zip(names, runs):
        entry = cache.get(name)
        model = (run.fold_runs() or [run])[0].model
        stamp = f"{model.stat().st_mtime_ns}:{model.stat().st_size}"
        fresh = entry is None or entry.get("model") != stamp or entry.get("repeats") != repeats \
            or (device and entry.get("device") != device) or (threads and entry.get("threads") != threads)
        if fresh:
            entry = {**measure_latency(run.root, repeats=repeats, device=device, threads=threads), "model": stamp}
            cache[name] = entry
            atomic.write_json(path, cache)
            log(f"  {name}: {entry['params'] / 1e6:.2f} M parameters, {entry['ms_per_image_batch1']:.2f} ms/image at batch 1, "
                f"{entry['ms_per_image_batch64']:.2f} at batch 64 ({entry['device']}, {entry['threads']} thread(s))")
        measured.append(entry)
    return measured


def run_zoo(data: str | os.PathLike, out: str | os.PathLike, members: Sequence[MemberSpec] | None = None, *,
            shared: dict[str, Any] | None = None, given: dict[str, Any] | None = None, folds: int | None = None,
            fold_seed: int | None = None, cv: int = 5, max_latency: float | None = None, latency_repeats: int = 5,
            title: str = "zoo run", log: Callable[[str], None] = print, stop_after_epoch: int | None = None) -> RunResult:
    """Run every stage of a zoo into ``out``; see the module docstring.

    ``members``: the zoo (None: the default zoo for this device, printed); ``shared``: finetune options
    for every member (a zoo file's [defaults]); ``given``: options typed on the command line, which win
    over both; ``folds``: cross-fit every member (out-of-fold selection rows, ``val/`` the holdout);
    ``cv``: folds of the ensemble fit's cross-validation; ``max_latency``: pick the best member subset
    within this many ms per image (batch 64); ``stop_after_epoch``: stop the member being trained after
    that many epochs, as a kill would (tests). Returns a ``RunResult`` (``status`` ``interrupted`` then).
    """
    from zoo.data import read_listing

    start = time.perf_counter()
    out = Path(out)
    shared, given = dict(shared or {}), check_options(dict(given or {}), "command line")
    device, threads = given.get("device") or shared.get("device"), given.get("threads") or shared.get("threads")
    listing = read_listing(data, allow_outside_root=bool(given.get("allow_outside_root", shared.get("allow_outside_root"))))
    has_val, has_test = bool(listing.split("val")), bool(listing.split("test"))
    if members is None:
        kind = device_kind(device)
        members = default_zoo(kind)
        log(f"no --backbones or --zoo: the default zoo for {kind}: "
            + ", ".join(f"{m.name} ({m.backbone})" for m in members) + " (weights from the Hugging Face hub)")
    members = unique_names(list(members), "the zoo")
    if len(members) < 2:
        raise UserInputError(f"a zoo needs at least 2 members to correlate and ensemble, got {len(members)}; "
                             "use `zoo finetune` for one backbone")
    out.mkdir(parents=True, exist_ok=True)
    result = RunResult(out, "finished")
    runs = [RunDir(out / "members" / m.name) for m in members]
    names = [m.name for m in members]

    log(f"[1/6] fine-tuning {len(members)} members" + (f", {folds} folds each" if folds else "") + f" -> {out / 'members'}")
    for spec, run in zip(members, runs):
        cfg = _member_config(spec, data, out, shared, given, folds, fold_seed)
        try:
            finished = _train_member(spec, cfg, run, result, log, stop_after_epoch)
        except SystemExit:  # TrainingInterrupted: Ctrl-C / SIGTERM, resume state saved
            log(f"zoo run stopped while training {spec.name}; its resume state is saved. Run the same command again to continue")
            raise
        if not finished:
            log(f"  {spec.name}: stopped before its end; run the same command again to continue it")
            result.status = "interrupted"
            result.seconds = time.perf_counter() - start
            return result

    return _after_training(result, listing, data, out, members, runs, names, folds, has_val, has_test, cv, max_latency,
                           latency_repeats, device, threads, title, log, start)


def _after_training(result, listing, data, out, members, runs, names, folds, has_val, has_test, cv, max_latency,
                    latency_repeats, device, threads, title, log, start) -> RunResult:
    from ensemble.diversity import correlate, write_correlation
    from ensemble.file import write_ensemble
    from ensemble.fit import fit_ensemble
    from ensemble.metrics import score_table_from_log_probs
    from ensemble.predict import predict_ensemble
    from ensemble.report import format_correlation
    from ensemble.score import score_ensemble, write_score_table
    from finetune.inference import predict_run
    from zoo.predictions import align_predictions, load_predictions, write_output

    select_split = "oof" if folds else "val"
    log(f"[2/6] correlation of the {'out-of-fold' if folds else 'validation'} predictions -> {out / 'correlation'}")
    select = align_predictions([load_predictions(r.root, select_split) for r in runs])
    correlation = correlate(select, k=len(select), names=names)
    write_correlation(correlation, out / "correlation")

    log(f"[3/6] fitting ensemble weights on them (slsqp{f', {cv}-fold cross-validated' if cv else ''}) -> {out / 'ensemble.json'}")
    ens = fit_ensemble(select, method="slsqp", cv=cv)
    write_ensemble(out / "ensemble.json", ens)
    for w in ens.warnings:
        log(f"  warning: {w}")

    holdout_split = "val" if has_val else ("test" if has_test else None)
    log("[4/6] predicting " + " and ".join(f"{s}/" for s in dict.fromkeys(filter(None, [holdout_split, "test" if has_test else None])))
        if holdout_split else "[4/6] no val/ or test/ folder: no holdout to score on")
    predict = dict(threads=threads, device=device)
    holdout = member_holdout = None
    if holdout_split:
        member_holdout = []
        for run in runs:
            if folds and holdout_split == "val":
                member_holdout.append(load_predictions(run.root, "val"))  # the fold models' mean, written by the cross-fit
            else:
                member_holdout.append(_cached_predictions(run.predictions("holdout" if holdout_split == "val" else "test"),
                                                          lambda run=run: predict_run(run.root, data, split=holdout_split, **predict)))
        holdout = align_predictions(member_holdout)
    test_table = None
    if has_test:
        if holdout_split == "test":  # no val/: the holdout is test/, predicted just above (into the same files)
            test = member_holdout
        else:
            test = [_cached_predictions(run.predictions("test"), lambda run=run: predict_run(run.root, data, split="test", **predict))
                    for run in runs]
        kept = [test[names.index(m.name)] for m in ens.members]
        write_output(out / "test_predictions.csv", predict_ensemble(ens, predictions=kept))
        if holdout_split != "test" and (test[0].labels >= 0).all():
            test_table = score_ensemble(ens, predictions=test)
            write_score_table(out / "test_scores.csv", test_table)

    log("[5/6] scoring on the holdout and measuring latency on this device")
    latency = _latencies(out, names, runs, latency_repeats, device, threads, log)
    labels = select[0].labels
    weights = {m.name: m.weight for m in ens.members}
    holdout_table = None
    if holdout is not None and (holdout[0].labels >= 0).all():
        holdout_table = score_ensemble(ens, predictions=holdout)
        write_score_table(out / "holdout_scores.csv", holdout_table)
    by_row = {r.name: r for r in holdout_table.rows} if holdout_table else {}

    def hold(name):
        r = by_row.get(name)
        return {"accuracy": r.accuracy, "log_loss": r.log_loss, "ece": r.ece} if r else None

    rows = []
    for j, (spec, p) in enumerate(zip(members, select)):
        rows.append(LeaderRow(spec.name, "member" if spec.name in weights else "dropped member", spec.backbone,
                              latency[j]["params"], latency[j]["ms_per_image_batch1"], latency[j]["ms_per_image_batch64"],
                              score_table_from_log_probs(p.log_probabilities(), labels), hold(spec.name),
                              weights.get(spec.name, 0.0)))
    select_probs = np.stack([p.probabilities() for p in select])
    every = list(range(len(members)))
    kept_idx = [names.index(n) for n in weights]
    rows.append(LeaderRow("equal-weight average", "equal weights", f"{len(members)} members",
                          sum(latency[j]["params"] for j in every), sum(latency[j]["ms_per_image_batch1"] for j in every),
                          sum(latency[j]["ms_per_image_batch64"] for j in every),
                          score_table_from_log_probs(np.log(np.clip(select_probs.mean(axis=0), 1e-30, None)), labels),
                          hold("equal weights"), None))
    cv_scores = (ens.scores.get("cv") or {}).get("ensemble") or ens.scores["in_sample"]["ensemble"]
    rows.append(LeaderRow("fitted ensemble", "ensemble", f"{ens.method}, {len(kept_idx)} members",
                          sum(latency[j]["params"] for j in kept_idx), sum(latency[j]["ms_per_image_batch1"] for j in kept_idx),
                          sum(latency[j]["ms_per_image_batch64"] for j in kept_idx),
                          {k: cv_scores.get(k) for k in ("accuracy", "log_loss", "ece")}, hold("ensemble"), None))
    write_leaderboard(out / "leaderboard.csv", rows, select_split)

    holdout_probs = np.stack([p.probabilities() for p in holdout]) if holdout_table else None
    subsets = subset_table(names, [e["ms_per_image_batch64"] for e in latency], [e["params"] for e in latency],
                           select_probs, labels, holdout_probs, holdout[0].labels if holdout_table else None)
    front_idx = pareto_front([s.latency_ms for s in subsets], [s.accuracy for s in subsets], [-s.log_loss for s in subsets])
    front = [subsets[i] for i in front_idx]
    pick = pick_under_budget(subsets, max_latency) if max_latency is not None else None
    write_subsets(out / "pareto.csv", subsets, front)

    result.leaderboard, result.subsets, result.front, result.pick = rows, subsets, front, pick
    lines = [f"Leaderboard ({select_split}: {'out-of-fold rows of train/' if folds else 'validation split of train/'}, "
             f"{len(labels)} images; the fitted ensemble's {select_split} scores are cross-validated"
             + (f"; holdout: the dataset's {holdout_split}/, {len(holdout[0].ids)} images never trained or selected on)"
                if holdout_table else "; no labelled holdout)"),
             format_leaderboard(rows, select_split)]
    if folds:
        lines.append(f"  (a cross-fitted member predicts with its {folds} fold models: its holdout scores cost {folds}x "
                     "the latency shown, which is one model's)")
    lines += ["", f"Accuracy vs latency: the Pareto front of {len(subsets)} member subsets "
                  f"({'all' if len(members) <= MAX_EXHAUSTIVE else 'greedy'}; equal weights, chosen on {select_split}):",
              format_front(front, select_split, pick)]
    if max_latency is not None:
        lines.append(f"best subset within {max_latency:g} ms/image: " + (
            f"{' + '.join(pick.members)} ({pick.latency_ms:.3g} ms, {select_split} accuracy {pick.accuracy:.4f}"
            + (f", holdout {pick.holdout_accuracy:.4f}" if pick.holdout_accuracy is not None else "") + ")"
            if pick else f"none (the fastest member takes {min(s.latency_ms for s in subsets):.3g} ms)"))
    if test_table is not None:
        from ensemble.score import format_score_table

        lines += ["", "test/ (also untouched):", format_score_table(test_table)]
    correlation_text = format_correlation(correlation, "prob_corr")
    lines += ["", f"Correlation of the {select_split} predictions:", correlation_text]

    log("[6/6] writing the report")
    from zoo.cli.report_html import ReportInputs, write_report

    result.seconds = time.perf_counter() - start
    result.report = write_report(out / "report.html", ReportInputs(
        title=title, leaderboard=rows, select_split=select_split, subsets=subsets, front=front, pick=pick,
        max_latency=max_latency, heatmap=out / "correlation" / "heatmap.png", ensemble=ens, names=names, runs=runs,
        select=select, holdout=holdout if holdout_table else None, holdout_split=holdout_split,
        listing=listing, seconds=result.seconds, trained=result.trained, skipped=result.skipped,
        correlation_text=correlation_text))
    lines += ["", f"trained {len(result.trained)} member(s) ({', '.join(result.trained) or 'none'}), "
                  f"skipped {len(result.skipped)} finished earlier; {result.seconds:.0f} s; report: {result.report}"]
    result.summary = "\n".join(lines)
    return result
