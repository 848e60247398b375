"""Cross-fitting folds: which fold every pool image belongs to, and the file that records it.

The assignment is a function of the sample ids, their labels, K and the fold seed alone:
never of the backbone, the order images were listed in, the order runs were started
in, or the machine. Every member trained on the same pool therefore holds out the same
images in the same fold, which is what makes fitting ensemble weights on their
out-of-fold predictions free of leaks (no member has seen the row it is weighted on).

Stratified: each class's ids are ordered by a keyed hash (SHA-256 of seed and id) and
dealt round-robin over the folds, continuing where the previous class stopped, so fold
sizes differ by at most one and every class is spread as evenly as it can be.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from zoo import atomic
from zoo.data import Dataset, Sample
from zoo.errors import UserInputError
from zoo.exclude import excluded_ids

FOLDS_FILE = "folds.json"


def _hash_key(seed: int, sample_id: str) -> str:
    return hashlib.sha256(f"{seed}\0{sample_id}".encode()).hexdigest()


def assign_folds(ids: Sequence[str], labels: Sequence, k: int, seed: int = 0, classes: Sequence[str] | None = None
                 ) -> dict[str, int]:
    """The fold (1..k) of every id: stratified by label, a function of (ids, labels, k, seed) only.

    With ``classes`` (the names of the labels), folds that would hold out fewer than 2 images of a
    class are refused: each fold model picks its epoch on its fold, and on 1 image of a class that
    choice is noise."""
    if len(set(ids)) != len(ids):
        raise ValueError("ids: every sample id must be unique")
    if len(ids) != len(labels):
        raise ValueError(f"labels: expected one per id ({len(ids)}), got {len(labels)}")
    if not (isinstance(k, int) and k >= 2):
        raise UserInputError(f"--folds must be 2 or more, got {k!r}")
    if len(ids) < k:
        raise UserInputError(f"--folds {k} needs at least {k} pool images, got {len(ids)}")
    by_class: dict = {}
    for sample_id, label in zip(ids, labels):
        by_class.setdefault(label, []).append(sample_id)
    folds: dict[str, int] = {}
    position = 0
    for label in sorted(by_class):
        for sample_id in sorted(by_class[label], key=lambda s: _hash_key(seed, s)):
            folds[sample_id] = position % k + 1
            position += 1
    if classes is not None:
        _check_held_out_per_class(by_class, folds, k, classes)
    return {sample_id: folds[sample_id] for sample_id in sorted(folds)}


def _check_held_out_per_class(by_class: dict, folds: dict[str, int], k: int, classes: Sequence[str]) -> None:
    for label in sorted(by_class, key=lambda lab: len(by_class[lab])):
        held_out = min(sum(folds[i] == fold for i in by_class[label]) for fold in range(1, k + 1))
        if held_out < 2:
            n, largest = len(by_class[label]), min(len(ids) for ids in by_class.values()) // 2
            raise UserInputError(
                f"--folds {k}: class {classes[label]!r} has {n} pool image(s), so a fold would hold out {held_out} of it "
                "(each fold model picks its epoch on its fold: at least 2 per class are needed); "
                + (f"use --folds {largest} or fewer" if largest >= 2 else
                   f"add images of {classes[label]!r} (at least 4 to cross-fit) or train without --folds"))


def pool_and_holdout(dataset: Dataset, pool: str) -> tuple[list[Sample], list[Sample]]:
    """The images the folds split (sorted by id) and the untouched holdout (the dataset's val split, unless pooled)."""
    samples = dataset.split("train") + (dataset.split("val") if pool == "train+val" else [])
    by_id: dict[str, Sample] = {}
    for sample in samples:
        by_id.setdefault(sample.id, sample)  # an image listed in train and val (CSV) is one pool image
    holdout = [] if pool == "train+val" else sorted(dataset.split("val"), key=lambda s: s.id)
    return [by_id[i] for i in sorted(by_id)], holdout


def pool_folds(dataset: Dataset, k: int, seed: int, pool: str = "train", exclude: str | os.PathLike | None = None
               ) -> tuple[list[Sample], list[Sample], dict[str, int], list[str]]:
    """``(pool, holdout, folds, excluded)``: the images the folds split, the untouched holdout, the fold of every pool
    id, and the ids ``exclude`` (a file, ``zoo.exclude``) takes out of every fold.

    Folds are assigned on the whole listed pool first, so that leaving images out moves no other image to
    another fold: a run with ``--exclude`` holds out the same images in the same folds as one without it.
    """
    samples, holdout = pool_and_holdout(dataset, pool)
    folds = assign_folds([s.id for s in samples], [s.label for s in samples], k, seed, dataset.classes)
    drop = excluded_ids(exclude, folds, dataset)
    return ([s for s in samples if s.id not in drop], holdout, {i: f for i, f in folds.items() if i not in drop},
            sorted(drop))


def fold_dataset(dataset: Dataset, k: int, seed: int, fold: int, pool: str = "train",
                 exclude: str | os.PathLike | None = None) -> Dataset:
    """The dataset as fold model ``fold`` sees it: train = the other folds, val = fold ``fold``,
    ``holdout`` = the untouched holdout, ``test`` as listed; the ids of ``exclude`` in neither."""
    samples, holdout, folds, excluded = pool_folds(dataset, k, seed, pool, exclude)
    splits = {"train": [s for s in samples if folds[s.id] != fold], "val": [s for s in samples if folds[s.id] == fold]}
    if holdout:
        splits["holdout"] = holdout
    if dataset.split("test"):
        splits["test"] = dataset.split("test")
    return Dataset(root=dataset.root, kind=dataset.kind, classes=dataset.classes, splits=splits,
                   val_source=f"fold {fold} of {k}", warnings=dataset.warnings, excluded=excluded)


def fold_sizes(folds: dict[str, int], k: int) -> list[int]:
    """How many ids each of the k folds holds."""
    return [sum(1 for f in folds.values() if f == i) for i in range(1, k + 1)]


def folds_record(folds: dict[str, int], k: int, seed: int, pool: str, holdout: str | None) -> dict[str, Any]:
    """What ``folds.json`` holds."""
    return {"k": k, "fold_seed": seed, "pool": pool, "holdout": holdout,
            "sizes": fold_sizes(folds, k), "folds": folds}


def write_folds(run_root: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``RUN/folds.json``, or check that the one there says the same (other --fold tasks wrote it)."""
    path = Path(run_root) / FOLDS_FILE
    existing = read_folds(run_root)
    if existing is not None:
        if existing["folds"] != record["folds"] or existing["k"] != record["k"]:
            raise UserInputError(f"{path}: holds another fold assignment (k={existing['k']}, seed {existing['fold_seed']}, "
                                 f"{len(existing['folds'])} ids) than this command's (k={record['k']}, seed {record['fold_seed']}, "
                                 f"{len(record['folds'])} ids); use another --out, or the same data, --folds and --fold-seed")
        return path
    return atomic.write_json(path, record)


def read_folds(run_root: str | os.PathLike) -> dict[str, Any] | None:
    """``RUN/folds.json`` as a dict, or None when the run is not cross-fitted."""
    path = Path(run_root) / FOLDS_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path}: not valid JSON ({e}); run `zoo finetune --folds` again into a new --out") from None
    if not isinstance(record, dict) or not isinstance(record.get("folds"), dict) or "k" not in record:
        raise UserInputError(f"{path}: not a zoo folds file (no k and folds); run `zoo finetune --folds` again into a new --out")
    return record


def check_same_folds(members: Sequence[tuple[str, str | os.PathLike | None]]) -> None:
    """Refuse out-of-fold members whose fold assignments differ, naming both runs.

    ``members``: (name, run directory) of each member fitted on out-of-fold predictions.
    A run without ``folds.json`` is refused too: its rows cannot be shown to be out of fold.
    """
    first: tuple[str, dict] | None = None
    for name, run in members:
        record = read_folds(run) if run is not None else None
        if record is None:
            raise UserInputError(f"{run or name}: out-of-fold predictions without a folds.json beside them; "
                                 "fit only members made by `zoo finetune --folds` (or pass --split val)")
        if first is None:
            first = (str(run), record)
            continue
        if record["folds"] != first[1]["folds"]:
            other = record["folds"]
            differ = next((i for i in sorted(set(other) | set(first[1]["folds"])) if other.get(i) != first[1]["folds"].get(i)), None)
            raise UserInputError(
                f"{run} and {first[0]} were cross-fitted on different folds (k={record['k']} seed {record.get('fold_seed')} vs "
                f"k={first[1]['k']} seed {first[1].get('fold_seed')}; first differing id {differ!r}): weights fitted on their "
                "out-of-fold rows would leak; train every member with the same data, --folds and --fold-seed")
