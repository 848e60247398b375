"""The ensemble file (``zoo ensemble fit --out ens.json``): the one module that reads and writes it.

JSON, no pickle::

    {"format": 1, "kind": "zoo-ensemble", "classes": [...],
     "method": "slsqp", "metric": "log_loss", "combine": "arithmetic", "calibrate": true,
     "final_temperature": 0.93, "options": {...},
     "members": [{"name": "convnext", "backbone": "convnext_tiny.fb_in22k", "weight": 0.61,
                  "temperature": 1.12, "run": "runs/convnext", "run_abs": "/home/me/runs/convnext",
                  "predictions": "runs/convnext/predictions/val.safetensors", "predictions_abs": "...",
                  "scores": {"accuracy": ..., "log_loss": ..., "ece": ...}}, ...],
     "dropped": [...zero-weight members, scores only...],
     "stacking": null | {"coef": [[...]], "intercept": [...], "clip": -16.1},
     "scores": {"target": "log_loss", "samples": N,
                "in_sample": {"ensemble": {...}, "best_member": {...}, "equal_weight": {...}},
                "cv": null | {"folds": 5, "ensemble": {...}, "best_member": {...}, "equal_weight": {...}, ...}},
     "warnings": [...], "zoo_version": "0.1.0"}

Paths are stored relative to the ensemble file's folder (so a project folder can move)
with the absolute path as a fallback; reading resolves them back to absolute paths.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ensemble.combine import COMBINE_RULES
from ensemble.metrics import METRICS
from ensemble.model import Ensemble, Member
from zoo import __version__, atomic
from zoo.errors import UserInputError

FORMAT_VERSION = 1
KIND = "zoo-ensemble"


def _relative(path: str | None, folder: Path) -> str | None:
    if path is None:
        return None
    try:
        return Path(os.path.relpath(path, folder)).as_posix()
    except ValueError:  # another drive on Windows
        return None


def _member_json(m: Member, folder: Path) -> dict[str, Any]:
    return {
        "name": m.name, "backbone": m.backbone, "weight": m.weight, "temperature": m.temperature,
        "run": _relative(m.run, folder), "run_abs": m.run,
        "predictions": _relative(m.predictions, folder), "predictions_abs": m.predictions,
        "scores": m.scores, "tta": m.tta,
    }


def ensemble_to_json(ens: Ensemble, folder: str | os.PathLike = ".") -> dict[str, Any]:
    folder = Path(folder).resolve()
    return {
        "format": FORMAT_VERSION,
        "kind": KIND,
        "classes": list(ens.classes),
        "method": ens.method,
        "metric": ens.metric,
        "combine": ens.combine,
        "calibrate": ens.calibrate,
        "final_temperature": ens.final_temperature,
        "options": ens.options,
        "members": [_member_json(m, folder) for m in ens.members],
        "dropped": [_member_json(m, folder) for m in ens.dropped],
        "stacking": ens.stacking,
        "scores": ens.scores,
        "warnings": ens.warnings,
        "zoo_version": __version__,
    }


def write_ensemble(path: str | os.PathLike, ens: Ensemble) -> Path:
    """Write ``ens`` to ``path`` (JSON) atomically."""
    path = Path(path)
    validate_ensemble(ens, str(path))
    # NaN is not JSON: a score that is undefined (e.g. ECE of no rows) is written as null.
    return atomic.write_json(path, _finite(ensemble_to_json(ens, path.parent)))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _resolve(entry: dict[str, Any], key: str, folder: Path) -> str | None:
    """Absolute path of ``entry[key]``: relative to the ensemble file's folder if that exists, else the stored absolute path."""
    rel, absolute = entry.get(key), entry.get(f"{key}_abs")
    if rel is not None and (folder / rel).exists():
        return str((folder / rel).resolve())
    if absolute is not None and Path(absolute).exists():
        return str(absolute)
    # Neither exists: keep the relative candidate (the file's own choice) for the error message.
    if rel is not None:
        return str((folder / rel).resolve())
    return absolute


def _member_from_json(entry: Any, where: str, index: int, folder: Path) -> Member:
    if not isinstance(entry, dict):
        raise UserInputError(f"{where}: member {index} is not a JSON object; the file is damaged, fit the ensemble again")
    for key in ("name", "weight"):
        if key not in entry:
            raise UserInputError(f"{where}: member {index} has no {key!r}; the file is damaged, fit the ensemble again")
    try:
        return Member(
            name=str(entry["name"]), backbone=str(entry.get("backbone") or ""), weight=float(entry["weight"]),
            temperature=float(entry.get("temperature", 1.0)), run=_resolve(entry, "run", folder),
            predictions=_resolve(entry, "predictions", folder), scores=dict(entry.get("scores") or {}),
            tta=int(entry.get("tta") or 1),
        )
    except (TypeError, ValueError) as e:
        raise UserInputError(f"{where}: member {index} ({entry.get('name')!r}) has a bad value ({e}); fit the ensemble again") from None


def open_ensemble(ensemble: Ensemble | str | os.PathLike) -> tuple[Ensemble, str]:
    """An ensemble given as itself or as its file, and the name messages use for it (the file's path)."""
    if isinstance(ensemble, Ensemble):
        return ensemble, "ensemble"
    return read_ensemble(ensemble), str(ensemble)


def read_ensemble(path: str | os.PathLike) -> Ensemble:
    """Read and check an ensemble file; member paths come back absolute."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise UserInputError(f"{where}: no such ensemble file; write one with `zoo ensemble fit ... --out {path.name}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{where}: not valid JSON ({e}); fit the ensemble again") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise UserInputError(f"{where}: not a zoo ensemble file (no \"kind\": \"{KIND}\"); pass the --out file of `zoo ensemble fit`")
    fmt = data.get("format")
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION or fmt < 1:
        raise UserInputError(f"{where}: ensemble file format {fmt!r} is not one this zoo reads (1..{FORMAT_VERSION}); upgrade zoo")
    for key in ("classes", "members", "method", "combine"):
        if key not in data:
            raise UserInputError(f"{where}: key {key!r} missing; the file is damaged, fit the ensemble again")
    if not isinstance(data["members"], list) or not data["members"]:
        raise UserInputError(f"{where}: \"members\" must be a non-empty list; fit the ensemble again")
    folder = path.resolve().parent
    for key, kind in (("classes", list), ("final_temperature", (int, float, type(None))), ("calibrate", (bool, type(None))),
                      ("options", (dict, type(None))), ("scores", (dict, type(None))), ("dropped", (list, type(None))),
                      ("warnings", (list, type(None))), ("stacking", (dict, type(None)))):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if key in data and (not isinstance(data[key], kinds) or (isinstance(data[key], bool) and bool not in kinds)):
            raise UserInputError(f"{where}: {key!r} is {data[key]!r}, which is not a {_json_kind(kind)}; the file was edited "
                                 "or damaged: fit the ensemble again")
    ens = Ensemble(
        classes=[str(c) for c in data["classes"]],
        members=[_member_from_json(e, where, i, folder) for i, e in enumerate(data["members"])],
        method=str(data["method"]), metric=str(data.get("metric", "log_loss")), combine=str(data["combine"]),
        calibrate=bool(data.get("calibrate", True)), final_temperature=float(data.get("final_temperature") or 1.0),
        stacking=data.get("stacking"), options=dict(data.get("options") or {}), scores=dict(data.get("scores") or {}),
        dropped=[_member_from_json(e, where, i, folder) for i, e in enumerate(data.get("dropped") or [])],
        warnings=list(data.get("warnings") or []),
    )
    validate_ensemble(ens, where)
    return ens


def _json_kind(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    words = {list: "list", dict: "JSON object", int: "number", float: "number", bool: "true/false", type(None): "null"}
    return " or ".join(dict.fromkeys(words[k] for k in kinds))


def validate_ensemble(ens: Ensemble, where: str = "<ensemble>") -> None:
    """Refuse an ensemble that cannot be applied, naming what is wrong."""
    from ensemble.weights import WEIGHT_SEARCHES

    if not ens.classes or len(set(ens.classes)) != len(ens.classes):
        raise UserInputError(f"{where}: classes must be a non-empty list of distinct names, got {ens.classes}")
    if ens.method not in WEIGHT_SEARCHES:
        raise UserInputError(f"{where}: method {ens.method!r} is not one of {', '.join(WEIGHT_SEARCHES)}")
    if ens.combine not in COMBINE_RULES:
        raise UserInputError(f"{where}: combine rule {ens.combine!r} is not one of {', '.join(COMBINE_RULES)}")
    if ens.metric not in METRICS:
        raise UserInputError(f"{where}: metric {ens.metric!r} is not one of {', '.join(METRICS)}")
    if not ens.members:
        raise UserInputError(f"{where}: the ensemble has no members")
    names = [m.name for m in ens.members]
    if len(set(names)) != len(names):
        raise UserInputError(f"{where}: member names must differ, got {names}")
    for m in ens.members:
        if not (math.isfinite(m.weight) and m.weight >= 0):
            raise UserInputError(f"{where}: member {m.name!r} has weight {m.weight}; weights must be finite and >= 0")
        if not (math.isfinite(m.temperature) and m.temperature > 0):
            raise UserInputError(f"{where}: member {m.name!r} has temperature {m.temperature}; temperatures must be > 0")
    if not (math.isfinite(ens.final_temperature) and ens.final_temperature > 0):
        raise UserInputError(f"{where}: final_temperature {ens.final_temperature} must be > 0")
    if ens.method == "stacking":
        st = ens.stacking
        if not isinstance(st, dict) or not {"coef", "intercept", "clip"} <= set(st):
            raise UserInputError(f"{where}: a stacking ensemble needs \"stacking\" with coef, intercept and clip; fit it again")
        c, m = len(ens.classes), len(ens.members)
        coef = st["coef"]
        if len(coef) != c or any(len(row) != m * c for row in coef) or len(st["intercept"]) != c:
            raise UserInputError(f"{where}: stacking coefficients must be [{c}, {m * c}] with {c} intercepts for "
                                 f"{m} members and {c} classes; fit it again")
    elif abs(sum(m.weight for m in ens.members) - 1.0) > 1e-6:
        raise UserInputError(f"{where}: member weights sum to {sum(m.weight for m in ens.members):.6f}, expected 1")
