"""One member trained from its config: a linear probe, a cross-fit or a single-split fine-tune.

``train_member`` picks the kind from the config, as ``zoo finetune`` does, and returns what
every kind has in common (``MemberResult``), with the kind's own result in ``detail``.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune import kfold, probe_run, train
from finetune.config import FinetuneConfig
from finetune.engine import stderr_log
from finetune.kfold import CrossFitResult
from finetune.probe_run import ProbeResult
from finetune.train import FinetuneResult
from zoo.rundir import RunDir
from zoo.timelimit import TimeBudget
from zoo.tracking import Tracking


@dataclass
class MemberResult:
    run: RunDir
    kind: str  # probe | cross-fit | single
    finished: bool  # a probe always; a cross-fit once assembled; a single run unless interrupted
    stopped: str  # the kind's own: finished | early-stopped | time-limit | interrupted | waiting (other folds still to run)
    rank: int  # under torchrun: this process's rank (only rank 0 should print the summary); 0 for probes
    summary: str  # the line `zoo finetune` prints
    detail: ProbeResult | CrossFitResult | FinetuneResult


def train_member(cfg: FinetuneConfig, *, log=stderr_log, progress: bool | None = None,
                 stop_after_epoch: int | None = None, tracking: Tracking | None = None,
                 time_budget: TimeBudget | None = None) -> MemberResult:
    """Train the member ``cfg`` describes into ``cfg.out``: a linear probe (``cfg.linear_probe``), a cross-fit
    (``cfg.folds``, or ``cfg.resume`` of a run that holds one) or a single-split fine-tune.

    ``progress`` and ``stop_after_epoch`` go to the fine-tunes; a probe takes seconds and has neither.
    SIGINT or SIGTERM during a fine-tune raises ``finetune.train.TrainingInterrupted``. ``tracking``
    (default: as ``cfg.mlflow`` says) reports the member to TensorBoard and MLflow, one MLflow run per
    member; ``time_budget`` stops a fine-tune's epochs (a cross-fit's folds) that would not end in time.
    """
    tracking = tracking or Tracking(mlflow=cfg.mlflow)
    # Called through their modules, so that tests that replace finetune.train.finetune (etc.) reach this dispatch too.
    if cfg.linear_probe:
        probe = probe_run.linear_probe(cfg, log=log)
        with tracking.open(probe.run, probe.run.root.name, cfg.to_dict()) as tracker:
            tracker.log_metrics({f"{split}_{k}": v for split, s in probe.scores.items() for k, v in s.items()})
            tracker.log_artifacts([probe.run.config, probe.run.result])
        return MemberResult(probe.run, "probe", True, "finished", 0, probe.summary, probe)
    if cfg.folds or (cfg.resume and RunDir(cfg.out).is_cross_fit()):
        crossfit = kfold.finetune_folds(cfg, log=log, progress=progress, stop_after_epoch=stop_after_epoch,
                                        tracking=tracking, time_budget=time_budget)
        scores = "".join(f"\t{split}_log_loss={s['log_loss']:.4f}\t{split}_accuracy={s['accuracy']:.4f}"
                         for split, s in crossfit.scores.items())
        summary = (f"{crossfit.run.root}\tfolds={crossfit.folds}\ttrained={sorted(crossfit.trained)}\t"
                   f"skipped={crossfit.skipped}{scores}\t{crossfit.stopped}")
        return MemberResult(crossfit.run, "cross-fit", crossfit.assembled, crossfit.stopped, crossfit.rank, summary, crossfit)
    single = train.finetune(cfg, log=log, progress=progress, stop_after_epoch=stop_after_epoch, tracking=tracking,
                            time_budget=time_budget)
    summary = (f"{single.run.root}\tbest_epoch={single.best_epoch}\tval_loss={single.best_val_loss:.4f}\t"
               f"val_accuracy={single.best_val_accuracy:.4f}\t{single.stopped}")
    return MemberResult(single.run, "single", single.stopped != "interrupted", single.stopped, single.rank, summary, single)
