"""Members: what they are called in tables and which run directory they came from."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from zoo.errors import UserInputError
from zoo.folds import check_same_folds
from zoo.predictions import Predictions
from zoo.rundir import RunDir


def member_run(pred: Predictions) -> Path | None:
    """The run directory a prediction file belongs to, when it can be found."""
    if pred.source:
        source = Path(pred.source)
        if source.parent.name == "predictions" and RunDir(source.parent.parent).is_run():
            return source.parent.parent.resolve()
    if pred.run and RunDir(pred.run).is_run():
        return Path(pred.run).resolve()
    return None


def member_names(preds: Sequence[Predictions]) -> list[str]:
    """Short unique names for tables: the run folder's name, else the file's stem.

    Two members with the same short name get their parent folders prefixed until they
    differ (``a/convnext`` and ``b/convnext``), else a ``#k`` suffix.
    """
    paths = []
    for p in preds:
        run = member_run(p)
        paths.append(run if run is not None else Path(p.run) if p.run else Path(p.source).with_suffix("") if p.source else Path(p.name or "member"))
    names = [path.name or str(path) for path in paths]
    for depth in range(2, 5):
        if len(set(names)) == len(names):
            return names
        deeper = ["/".join(path.parts[-depth:]) if names.count(name) > 1 else name for name, path in zip(names, paths)]
        if len(set(deeper)) > len(set(names)):  # only when the parents tell them apart
            names = deeper
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if names.count(name) == 1 else f"{name}#{seen[name]}")
    return unique


def check_oof_members(preds: Sequence[Predictions]) -> None:
    """Out-of-fold members must come from runs cross-fitted on the same folds (else their
    rows leak into each other's weights); refuse otherwise, naming both runs."""
    oof = [p for p in preds if p.split == "oof"]
    if oof:
        check_same_folds([(p.source or p.name, member_run(p)) for p in oof])


def check_same_kind_of_rows(preds: Sequence[Predictions]) -> None:
    """Refuse out-of-fold members mixed with others: out-of-fold rows are the whole pool,
    not a validation split."""
    oof = [p for p in preds if p.split == "oof"]
    if oof and len(oof) < len(preds):
        other = next(p for p in preds if p.split != "oof")
        raise UserInputError(f"{oof[0].source} holds out-of-fold predictions but {other.source or other.name} holds "
                             f"{other.split or 'other'} predictions; every member must be scored on the same kind of rows")
