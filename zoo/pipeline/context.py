"""What the stages of ``zoo run`` share (``ZooRun``) and what the call returns (``RunResult``)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from zoo.pipeline.layout import ZooRunDir
from zoo.pipeline.leaderboard import Leaderboard, Subset
from zoo.pipeline.zoo_file import MemberSpec
from zoo.rundir import RunDir


@dataclass
class RunResult:
    """What ``zoo run`` (``zoo.run``) made: ``leaderboard`` (dict rows; ``.to_pandas()``), ``ensemble`` (the fitted
    ``ensemble.model.Ensemble``, which ``zoo.predict`` takes), ``report`` (the HTML file), ``summary`` (what the
    command prints) and which members this call trained, skipped or left out for time."""

    out: Path
    status: str  # finished | interrupted | submitted (--launcher slurm --no-wait: the jobs are queued)
    trained: list[str] = field(default_factory=list)  # members trained (or continued) by this call
    resumed: list[str] = field(default_factory=list)  # of those, continued from resume state
    skipped: list[str] = field(default_factory=list)  # finished earlier
    timed_out: dict[str, str] = field(default_factory=dict)  # member -> why it is left out for the time limit
    leaderboard: Leaderboard = field(default_factory=Leaderboard)
    ensemble: Any = None  # ensemble.model.Ensemble
    subsets: list[Subset] = field(default_factory=list)
    front: list[Subset] = field(default_factory=list)
    pick: Subset | None = None
    summary: str = ""
    report: Path | None = None
    seconds: float = 0.0


@dataclass
class ZooRun:
    """What the stages share: the settings of the call, then what each stage adds for the next."""

    data: str | os.PathLike
    layout: ZooRunDir
    members: list[MemberSpec]
    shared: dict[str, Any]  # a zoo file's [defaults]
    given: dict[str, Any]  # options typed on the command line (they win)
    folds: int | None
    fold_seed: int | None
    cv: int
    max_latency: float | None
    latency_repeats: int
    latency_backend: str  # a key of zoo.pipeline.leaderboard.LATENCY_BACKENDS
    device: str | None
    threads: int | None
    title: str
    log: Callable[[str], None]
    listing: Any  # zoo.data.Dataset as listed
    result: RunResult
    start: float
    tracking: Any  # zoo.tracking.Tracking of the members (nested under the run's own MLflow run)
    tracker: Any  # zoo.tracking.Tracker of the run: its parameters, the ensemble's scores, its files
    time_budget: Any = None  # zoo.timelimit.TimeBudget of the training stage, or None
    clock: Callable[[], float] = time.monotonic  # what time budgets are measured on (tests move it)
    launch: Any = None  # zoo.pipeline.launch.LaunchOptions: how stage 1 runs its training jobs
    distill: dict[str, Any] | None = None  # the student to distil the ensemble into (backbone, weights, options), or None
    # Filled by the stages, in order.
    select: list = field(default_factory=list)  # Predictions of the selection rows, aligned (stage 2)
    correlation: Any = None  # ensemble.diversity.CorrelationReport (stage 2)
    ensemble: Any = None  # ensemble.model.Ensemble (stage 3)
    label_issues: Any = None  # zoo.pipeline.label_issues.LabelIssues of the ensemble's out-of-fold rows (stage 3, --folds)
    holdout: list | None = None  # Predictions of the holdout, aligned (stage 4)
    test_table: Any = None  # ensemble.score.ScoreTable of test/ when it is labelled and not the holdout (stage 4)
    holdout_table: Any = None  # the same on the holdout (stage 5)
    latency: list[dict] = field(default_factory=list)  # per member (stage 5)
    student: Any = None  # zoo.pipeline.leaderboard.LeaderRow of the student (stage 5, with distill)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def runs(self) -> list[RunDir]:
        return [self.layout.member(m.name) for m in self.members]

    @property
    def select_split(self) -> str:
        return "oof" if self.folds else "val"

    @property
    def has_test(self) -> bool:
        return bool(self.listing.split("test"))

    @property
    def holdout_split(self) -> str | None:
        return "val" if self.listing.split("val") else ("test" if self.has_test else None)

    @property
    def predict_options(self) -> dict[str, Any]:
        return dict(threads=self.threads, device=self.device)
