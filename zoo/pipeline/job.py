"""One training job of ``zoo run --launcher local|slurm`` (``zoo.pipeline.launch``), and what runs it in its own process.

A job is what ``zoo finetune ... --folds K --fold I --out OUT/members/NAME`` trains: one fold of a cross-fitted
member, a single-split member, or a linear probe (all its folds). :func:`run_job` makes the same library call,
``finetune.member.train_member`` on the member's config, in a fresh process: ``python -m zoo.pipeline.job JOB.json``
(the local launcher) or submitit's task (``zoo.pipeline.slurm_job``). The run's deadline and MLflow parent run
come from the environment (:data:`DEADLINE_ENV`, :data:`MLFLOW_PARENT_ENV`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from zoo.errors import UserInputError

DEADLINE_ENV = "ZOO_DEADLINE"  # the run's training deadline, seconds since the epoch (--time-limit)
MLFLOW_PARENT_ENV = "ZOO_MLFLOW_PARENT_RUN_ID"  # the zoo run's MLflow run: each member's nests under it
TIME_LIMIT_EXIT = 75  # a job's process status when the time limit stopped it (EX_TEMPFAIL: run again with more time)
FINISHED = ("finished", "early-stopped", "waiting", "skipped")  # a job's train_member ``stopped`` that means done


@dataclass(frozen=True)
class Job:
    """One training job: ``member``'s fold ``fold`` of ``folds`` (None: the whole member), trained from ``config``
    (a ``FinetuneConfig``'s fields) with the member's own ``time_limit`` (seconds), its output to ``log``."""

    member: str
    fold: int | None
    folds: int | None
    config: dict[str, Any]
    log: str
    time_limit: float | None = None
    stop_after_epoch: int | None = None  # tests: stop after that many epochs, as a kill would

    @property
    def name(self) -> str:
        return f"{self.member}-fold-{self.fold}" if self.fold else self.member

    def describe(self) -> str:
        return f"member {self.member}" + (f", fold {self.fold}/{self.folds}" if self.fold else "")

    @property
    def done_file(self) -> Path:
        """The file whose presence means the job's work is finished (a fold's, or the member's, ``result.json``)."""
        from zoo.rundir import RunDir

        run = RunDir(self.config["out"])
        return (run.fold_run(self.fold) if self.fold else run).result


def run_job(job: Job) -> str:
    """Train ``job`` in this process (a fresh one); returns ``train_member``'s ``stopped``. The run's deadline and
    MLflow parent come from the environment (:data:`DEADLINE_ENV`, :data:`MLFLOW_PARENT_ENV`)."""
    from finetune.config import FinetuneConfig
    from finetune.member import train_member
    from zoo.rundir import RunDir
    from zoo.timelimit import TimeBudget, member_budget
    from zoo.tracking import Tracking

    cfg = FinetuneConfig.from_dict(job.config)
    if not cfg.folds and not cfg.linear_probe:  # a single run continues what a killed or requeued try left
        cfg = replace(cfg, resume=RunDir(cfg.out).resume_state.is_file())
    deadline = os.environ.get(DEADLINE_ENV)
    run_budget = TimeBudget(float(deadline) - time.time()) if deadline else None
    budget = member_budget(run_budget, job.time_limit)
    tracking = Tracking(mlflow=cfg.mlflow, parent_run_id=os.environ.get(MLFLOW_PARENT_ENV) or None)
    print(f"zoo job {job.name}: {job.describe()} -> {cfg.out} (pid {os.getpid()})", flush=True)
    done = train_member(cfg, log=lambda m: print(m, flush=True), progress=False, stop_after_epoch=job.stop_after_epoch,
                        tracking=tracking, time_budget=budget)
    print(f"zoo job {job.name}: {done.stopped}", flush=True)
    return done.stopped


def job_exit_status(stopped: str) -> int:
    return 0 if stopped in FINISHED else TIME_LIMIT_EXIT if stopped == "time-limit" else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m zoo.pipeline.job JOB.json``: what the local launcher starts for each job."""
    from zoo.errors import Interrupted

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m zoo.pipeline.job JOB.json (written by zoo run --launcher local)", file=sys.stderr)
        return 2
    job = Job(**json.loads(Path(args[0]).read_text(encoding="utf-8")))
    try:
        return job_exit_status(run_job(job))
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_status


if __name__ == "__main__":
    sys.exit(main())
