"""``--exclude FILE``: sample ids left out of a run's training and validation images.

The file is ``zoo label-issues``'s output (or any CSV with an ``id`` column) or a text file of
one id per line, so a user can review the suspected label errors, keep the rows they agree
with and train again without them. Only images a run trains or selects on can be left out:
an id of the holdout (``val/`` of a cross-fit, or ``test/``) is refused, because the holdout
is what the exclusion is judged on, and an id not in the data at all is refused too (a typo
or another dataset's file would otherwise change nothing, silently).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from pathlib import Path
from typing import Iterable

from zoo.data import Dataset
from zoo.errors import UserInputError

ID_COLUMN = "id"


def read_id_file(path: str | os.PathLike) -> list[str]:
    """The ids of ``path``, in file order, without repeats: the ``id`` column of a CSV whose header has one,
    else every non-blank line (lines starting with ``#`` are comments)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise UserInputError(f"--exclude {path}: cannot read it ({e.strerror}); pass a CSV with an id column (e.g. "
                             "`zoo label-issues`'s output) or a text file of one sample id per line") from None
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    header = next(csv.reader(io.StringIO(lines[0]))) if lines else []
    if ID_COLUMN in [h.strip() for h in header]:
        rows = csv.DictReader(io.StringIO("\n".join(lines)), skipinitialspace=True)
        rows.fieldnames = [h.strip() for h in rows.fieldnames or []]
        ids = [(row.get(ID_COLUMN) or "").strip() for row in rows]
    else:
        ids = [line.strip() for line in lines]
    ids = [i for i in ids if i]
    if not ids:
        raise UserInputError(f"--exclude {path}: no ids in it; expected a CSV with an id column or one sample id per line")
    return list(dict.fromkeys(ids))


def excluded_ids(path: str | os.PathLike | None, pool: Iterable[str], listing: Dataset) -> frozenset[str]:
    """The ids of the file at ``path`` (none for None), each checked to be one of ``pool``: the images the run
    trains or selects on. An id elsewhere in ``listing`` (the holdout) or nowhere in it is refused, naming the file."""
    if path is None:
        return frozenset()
    ids = read_id_file(path)
    pool = set(pool)
    outside = [i for i in ids if i not in pool]
    if outside:
        split_of = {s.id: name for name, samples in listing.splits.items() for s in samples}
        held = [i for i in outside if i in split_of]
        if held:
            raise UserInputError(f"--exclude {path}: {len(held)} id(s) are {split_of[held[0]]}/ images, which this run never "
                                 f"trains or selects on (e.g. {held[0]!r}); leave only training images out")
        raise UserInputError(f"--exclude {path}: {len(outside)} of its {len(ids)} ids are not images of {listing.root} "
                             f"(e.g. {outside[0]!r}); ids are paths relative to the dataset root, as `zoo label-issues` writes them")
    return frozenset(ids)


def without_excluded(dataset: Dataset, path: str | os.PathLike | None, splits: tuple[str, ...] = ("train", "val")) -> Dataset:
    """``dataset`` with the ids of ``path`` taken out of ``splits`` (a single-split run's training and validation
    images; its test split is the holdout) and recorded in ``Dataset.excluded``."""
    drop = excluded_ids(path, (s.id for split in splits for s in dataset.split(split)), dataset)
    if not drop:
        return dataset
    kept = {name: [s for s in samples if s.id not in drop] if name in splits else samples
            for name, samples in dataset.splits.items()}
    return dataclasses.replace(dataset, splits=kept, excluded=sorted(drop))
