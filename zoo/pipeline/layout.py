"""The folder of ``zoo run --out OUT`` (and ``zoo demo``): every path in it is built here.

A member is an ordinary run directory (``zoo.rundir.RunDir``) under ``OUT/members``; the
other files are the pipeline's stages' outputs, named once so that the stages, the report,
the demo and the tests agree.
"""

from __future__ import annotations

from pathlib import Path

from zoo.rundir import Folder, RunDir


class ZooRunDir(Folder):
    # Stage 1: the members.
    @property
    def members(self) -> Path:
        return self.root / "members"

    def member(self, name: str) -> RunDir:
        return RunDir(self.members / name)

    @property
    def logs(self) -> Path:
        """The training jobs' specs and output under ``--launcher local|slurm`` (``zoo.pipeline.launch``)."""
        return self.root / "logs"

    # Stages 2-3: correlation and weights on the selection rows.
    @property
    def correlation(self) -> Path:
        return self.root / "correlation"

    @property
    def heatmap(self) -> Path:
        """Written by ``ensemble.diversity.write_correlation`` into :attr:`correlation`."""
        return self.correlation / "heatmap.png"

    @property
    def ensemble(self) -> Path:
        return self.root / "ensemble.json"

    @property
    def label_issues(self) -> Path:
        """Suspected label errors among the pool images (cross-fitted members only; ``zoo.pipeline.label_issues``)."""
        return self.root / "label_issues.csv"

    # Stages 4-5: predictions and scores of the untouched splits, latency.
    @property
    def test_predictions(self) -> Path:
        return self.root / "test_predictions.csv"

    @property
    def test_scores(self) -> Path:
        return self.root / "test_scores.csv"

    @property
    def holdout_scores(self) -> Path:
        return self.root / "holdout_scores.csv"

    @property
    def latency(self) -> Path:
        """Each member's measured latency, keyed by the model file it timed (a re-run times only what changed)."""
        return self.root / "latency.json"

    @property
    def student(self) -> RunDir:
        """``--distill``: the ensemble distilled into one model (``zoo.pipeline.distill``), an ordinary run directory."""
        return RunDir(self.root / "student")

    # Stage 6: the tables and the report.
    @property
    def leaderboard(self) -> Path:
        return self.root / "leaderboard.csv"

    @property
    def pareto(self) -> Path:
        return self.root / "pareto.csv"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    # ``zoo demo``: the generated dataset it runs on.
    @property
    def demo_data(self) -> Path:
        return self.root / "data"


def is_zoo_run(folder: Path) -> bool:
    """A ``zoo run`` (or ``zoo demo``) folder, finished or not: what ``zoo run --out`` may continue."""
    layout = ZooRunDir(folder)
    return layout.members.is_dir() or layout.ensemble.is_file() or (layout.demo_data / "train").is_dir()
