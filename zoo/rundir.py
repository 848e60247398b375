"""The run directory of ``zoo finetune --out RUN``: every path in it is built here."""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

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

    @property
    def teacher_targets(self) -> Path:
        """A distillation's student: its teacher's outputs for every view of every training image (``zoo distill``)."""
        return self.root / "teacher_targets.safetensors"

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


# ----------------------------------------------------------------------------- the --out folder

LOCK_NAME = ".zoo.lock"


def _is_leftover(path: Path) -> bool:
    """zoo's lock file, or the temporary file of an atomic write that was killed."""
    return path.name == LOCK_NAME or (path.name.startswith(".") and path.name.endswith(".tmp"))


def _only_zoo_leftovers(folder: Path) -> bool:
    return all(_is_leftover(p) for p in folder.iterdir())


def check_out_folder(path: str | os.PathLike, what: str, is_ours: Callable[[Path], bool], option: str = "--out") -> Path:
    """Refuse, before any work, an ``--out`` that zoo may not write: a file, a folder that cannot be
    written, or a folder that holds anything but a run of this command's kind (``is_ours``).

    A new or empty folder is taken; so is one of ours, which the command continues or refuses by its
    own rules. Checked without writing anything.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{option} {folder}: is a file, not a folder; name a new folder for {what}")
    _check_can_make(folder, f"{option} {folder}")
    if folder.is_dir() and not is_ours(folder) and not _only_zoo_leftovers(folder):
        raise UserInputError(f"{option} {folder}: holds files that are not {what} (e.g. {next(iter(sorted(folder.iterdir()))).name}); "
                             "zoo will not write over them: name a new or empty folder")
    return folder


def check_out_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """Refuse, before any work, an output file path that is a folder or whose folder cannot be made or written."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{option} {path}: is a folder; name a file in it, e.g. {path / 'out.png'}")
    _check_can_make(path.parent, f"{option} {path}")
    return path


def _check_can_make(folder: Path, named: str) -> None:
    """``folder`` exists and is writable, or the nearest folder above it that exists is (so it can be made)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(f"{named}: {existing} is a file, so no folder can be made under it; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"{named}: {existing} is not writable by this user; choose a folder you can write")


def is_finetune_run(folder: Path) -> bool:
    """A ``zoo finetune`` run (single, cross-fit, probe or fold) or the start of one: a config.json that zoo wrote,
    not merely a file of that name."""
    if _written_by_zoo(RunDir(folder).config):
        return True
    entries, targets = list(folder.iterdir()), RunDir(folder).teacher_targets
    # A distillation's student whose teacher targets are written and whose training has not started yet.
    if targets.is_file() and all(p == targets or _is_leftover(p) for p in entries):
        return True
    # A cross-fit whose `--fold I` processes started before any wrote the run's config.json: only fold folders.
    folds = [p for p in entries if p.is_dir() and re.fullmatch(r"fold-\d+", p.name)]
    return (bool(folds) and all(_written_by_zoo(RunDir(p).config) or _only_zoo_leftovers(p) for p in folds)
            and all(p in folds or _is_leftover(p) for p in entries))


def _written_by_zoo(config: Path) -> bool:
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "backbone" in data and "classes" in data


@contextlib.contextmanager
def hold_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Hold ``path`` (made if new) for this process: a second zoo process that wants to write it refuses.

    An operating-system lock (``flock``) on ``path/.zoo.lock``, released when the process ends however
    it ends, so a killed run's folder is free to resume; a pid file would outlive its holder and mean
    nothing on another node of a shared file system. Under torchrun only rank 0 holds it (the ranks
    write one folder together).
    """
    import fcntl

    folder = Path(path)
    if int(os.environ.get("RANK", "0")) != 0:
        yield folder
        return
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock_file = folder / LOCK_NAME
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserInputError(f"{folder}: another zoo process is writing this folder (it holds {lock_file}); "
                                 "wait for it to end, or choose another --out") from None
        held = True
        yield folder
    finally:
        # Refused before writing anything: leave no trace (only the holder may remove the lock file).
        if held and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            lock_file.unlink()
            if made:
                folder.rmdir()
        os.close(fd)  # closing the descriptor releases the lock
