"""The run directory of ``zoo finetune --out RUN``: every path in it is built here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo.errors import UserInputError


@dataclass(frozen=True)
class Folder:
    """A folder of zoo's whose paths a subclass builds, each in one place; equal when the roots are."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    # Tracking (zoo.tracking): any run's or zoo run's folder.
    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files, when the tensorboard package is installed."""
        return self.root / "tb"

    @property
    def tracking(self) -> Path:
        """The MLflow run this folder logs to, so that a resumed run continues it."""
        return self.root / "tracking.json"


class RunDir(Folder):

    # The files the run-directory table of docs/commands.md names.
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def model(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def resume_state(self) -> Path:
        return self.root / "last.pt"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def metrics_png(self) -> Path:
        return self.root / "metrics.png"

    @property
    def predictions_dir(self) -> Path:
        return self.root / "predictions"

    def predictions(self, split: str = "val") -> Path:
        return self.predictions_dir / f"{split}.safetensors"

    # Reports of the best epoch.
    @property
    def skipped_images(self) -> Path:
        return self.root / "skipped_images.txt"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    @property
    def worst_errors(self) -> Path:
        return self.root / "worst_val_errors.csv"

    @property
    def confusion_csv(self) -> Path:
        return self.root / "confusion_matrix.csv"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def result(self) -> Path:
        """Written when training ends (finished or early-stopped): a run without it is unfinished."""
        return self.root / "result.json"

    # Cross-fitted runs (``zoo finetune --folds K``): each fold is a run directory of its own.
    @property
    def folds(self) -> Path:
        return self.root / "folds.json"

    def fold_run(self, fold: int) -> "RunDir":
        return RunDir(self.root / f"fold-{fold}")

    def is_cross_fit(self) -> bool:
        return self.folds.is_file() and self.config.is_file()

    def fold_runs(self) -> list["RunDir"]:
        """The fold runs of a cross-fitted run, in fold order (empty for any other run).

        ``config.json`` lists them relative to the run: ``fold-i`` for a cross-fit,
        ``../fold-i/snapshot-c`` for the cross-fit of its fold models' snapshot c."""
        if not self.is_cross_fit():
            return []
        config = self.read_config()
        return [RunDir(self.root / p) for p in config.get("fold_runs") or [f"fold-{i}" for i in range(1, int(config["folds"]) + 1)]]

    # Snapshot members (``--restarts R --snapshots``): the model at the end of each cosine cycle.
    def snapshot(self, index: int) -> "RunDir":
        return RunDir(self.root / f"snapshot-{index}")

    def is_run(self) -> bool:
        return self.config.is_file()

    def read_config(self) -> dict[str, Any]:
        if not self.config.is_file():
            raise UserInputError(
                f"{self.root}: not a zoo run directory (no config.json); "
                "pass the --out folder of a `zoo finetune` run"
            )
        try:
            return json.loads(self.config.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserInputError(f"{self.config}: not valid JSON ({e}); re-run `zoo finetune` or restore the file") from None
