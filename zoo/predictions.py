"""The prediction file: the one module that reads and writes it.

A prediction file is a ``.safetensors`` file with tensors ``logits`` (float32 [N, C];
with test-time augmentation, the log of the mean probability) and ``labels`` (int64
[N], -1 where unknown), and string metadata ``ids`` (JSON list, one per row),
``classes`` (JSON list), ``backbone``, ``run``, ``split``, ``tta`` and ``format``.

Only numpy is needed here: the ensemble commands read prediction files without torch.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from zoo import atomic
from zoo.errors import UserInputError
from zoo.rundir import RunDir, check_out_file

FORMAT_VERSION = 1
OUTPUT_SUFFIXES = (".safetensors", ".csv")  # what `zoo predict` and `zoo ensemble predict` write


@dataclass
class Predictions:
    logits: np.ndarray
    labels: np.ndarray
    ids: list[str]
    classes: list[str]
    backbone: str = ""
    run: str = ""
    split: str = ""
    tta: int = 1
    source: str = field(default="", compare=False)  # where it was read from; not stored

    def __post_init__(self):
        self.logits = np.asarray(self.logits, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.ids = [str(i) for i in self.ids]
        self.classes = [str(c) for c in self.classes]
        _validate(self, self.source or "<predictions>")

    @property
    def name(self) -> str:
        """A short label for tables: the run folder's name, else the file's stem."""
        if self.run:
            return Path(self.run).name
        return Path(self.source).stem if self.source else self.backbone

    def probabilities(self) -> np.ndarray:
        return softmax(self.logits)

    def log_probabilities(self) -> np.ndarray:
        z = self.logits.astype(np.float64)
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    def to_records(self, top_k: int = 0) -> list[dict]:
        """One dict per image: ``id``, ``prediction``, one probability per class and, with ``top_k``, the k most
        probable classes and their probabilities (``top1_class``, ``top1_prob``, ...): the columns of the CSV."""
        probs = self.probabilities()
        k = check_top_k(top_k, len(self.classes))
        best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [{"id": sid, "prediction": self.classes[int(np.argmax(row))],
                 **dict(zip(self.classes, map(float, row))),
                 **{f"top{j + 1}_{what}": (self.classes[c] if what == "class" else float(row[c]))
                    for j, c in enumerate(order) for what in ("class", "prob")}}
                for sid, row, order in zip(self.ids, probs, best)]

    def to_pandas(self, top_k: int = 0):
        """:meth:`to_records` as a pandas DataFrame indexed by id (pandas is imported here, and only here)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Predictions.to_pandas() needs pandas: pip install pandas (to_records() works without it)") from None
        return pd.DataFrame(self.to_records(top_k)).set_index("id")

    def take(self, order: Sequence[int]) -> "Predictions":
        order = np.asarray(order, dtype=np.int64)
        return Predictions(
            logits=self.logits[order], labels=self.labels[order], ids=[self.ids[i] for i in order],
            classes=self.classes, backbone=self.backbone, run=self.run, split=self.split,
            tta=self.tta, source=self.source,
        )


def _validate(p: Predictions, where: str) -> None:
    if p.logits.ndim != 2:
        raise UserInputError(f"{where}: logits must be 2-D [N, C], got shape {tuple(p.logits.shape)}")
    n, c = p.logits.shape
    if p.labels.shape != (n,):
        raise UserInputError(f"{where}: labels must have shape ({n},) to match logits {tuple(p.logits.shape)}, got {tuple(p.labels.shape)}")
    if len(p.ids) != n:
        raise UserInputError(f"{where}: {len(p.ids)} ids for {n} rows of logits; the file is inconsistent, write it again")
    if len(p.classes) != c:
        raise UserInputError(f"{where}: {len(p.classes)} classes for {c} columns of logits; the file is inconsistent, write it again")
    if len(set(p.classes)) != c:
        raise UserInputError(f"{where}: duplicated class names {sorted(p.classes)}")
    if len(set(p.ids)) != n:
        seen, dup = set(), None
        for i in p.ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise UserInputError(f"{where}: sample id {dup!r} appears more than once; each row needs its own id")
    if not np.all(np.isfinite(p.logits)):
        row = int(np.argwhere(~np.isfinite(p.logits))[0][0])
        raise UserInputError(f"{where}: logits contain NaN or infinity (first at row {row}, id {p.ids[row]!r}); predict again")
    bad = (p.labels < -1) | (p.labels >= c)
    if bad.any():
        row = int(np.argmax(bad))
        raise UserInputError(f"{where}: label {int(p.labels[row])} at row {row} is outside -1..{c - 1}")


def write_predictions(path: str | os.PathLike, preds: Predictions) -> Path:
    """Write ``preds`` to ``path`` atomically."""
    from safetensors.numpy import save_file

    metadata = {
        "ids": json.dumps(preds.ids),
        "classes": json.dumps(preds.classes),
        "backbone": preds.backbone,
        "run": preds.run,
        "split": preds.split,
        "tta": str(int(preds.tta)),
        "format": str(FORMAT_VERSION),
    }
    tensors = {"logits": np.ascontiguousarray(preds.logits, dtype=np.float32),
               "labels": np.ascontiguousarray(preds.labels, dtype=np.int64)}
    return atomic.write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_predictions(path: str | os.PathLike) -> Predictions:
    """Read and check one prediction file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such prediction file; pass a .safetensors file written by zoo, or a run directory")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            missing = {"logits", "labels"} - keys
            if missing:
                raise UserInputError(f"{path}: not a zoo prediction file (missing tensors {sorted(missing)}; found {sorted(keys)})")
            logits, labels = f.get_tensor("logits"), f.get_tensor("labels")
    except UserInputError:
        raise
    except Exception as e:  # safetensors raises its own error types for foreign or broken files
        raise UserInputError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); "
            "zoo reads only prediction files it wrote (never pickles)"
        ) from None
    for key in ("ids", "classes"):
        if key not in meta:
            raise UserInputError(f"{path}: not a zoo prediction file (metadata {key!r} missing)")
    fmt = int(meta.get("format", "0") or 0)
    if fmt > FORMAT_VERSION:
        raise UserInputError(f"{path}: prediction file format {fmt} is newer than this zoo understands ({FORMAT_VERSION}); upgrade zoo")
    try:
        ids, classes = json.loads(meta["ids"]), json.loads(meta["classes"])
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path}: metadata ids/classes are not JSON lists ({e})") from None
    if logits.dtype != np.float32 or labels.dtype != np.int64:
        raise UserInputError(f"{path}: expected float32 logits and int64 labels, got {logits.dtype} and {labels.dtype}")
    return Predictions(
        logits=logits, labels=labels, ids=ids, classes=classes, backbone=meta.get("backbone", ""),
        run=meta.get("run", ""), split=meta.get("split", ""), tta=int(meta.get("tta", "1") or 1),
        source=str(path),
    )


def load_predictions(source: str | os.PathLike, split: str = "val") -> Predictions:
    """Read a prediction file, or the ``split`` predictions of a run directory."""
    source = Path(source)
    if source.is_dir():
        run = RunDir(source)
        if not run.is_run():
            raise UserInputError(f"{source}: neither a prediction file nor a zoo run directory (no config.json)")
        path = run.predictions(split)
        if not path.is_file():
            if split == "oof":
                raise UserInputError(f"{source}: the run has no out-of-fold predictions ({path} is missing); they come from "
                                     f"cross-fitting (`zoo finetune BACKBONE --data DATA --folds 5 --out RUN`), or pass --split val")
            raise UserInputError(f"{source}: the run has no {split} predictions ({path} is missing); make them with "
                                 f"`zoo predict {source} --data DATA --split {split} --out {path}`")
        return read_predictions(path)
    return read_predictions(source)


def align_predictions(preds: Sequence[Predictions]) -> list[Predictions]:
    """Put every member's rows in the first one's id order; refuse mismatched files.

    All files must have the same classes in the same order and the same set of ids.
    """
    if not preds:
        raise UserInputError("no prediction files given")
    first = preds[0]
    out = [first]
    for other in preds[1:]:
        if other.classes != first.classes:
            raise UserInputError(
                f"{other.source or other.name}: classes {other.classes} differ from {first.source or first.name}'s {first.classes}; "
                "members must be trained on the same classes"
            )
        if other.ids == first.ids:
            aligned = other
        else:
            index = {sid: i for i, sid in enumerate(other.ids)}
            missing = next((sid for sid in first.ids if sid not in index), None)
            if missing is not None or len(other.ids) != len(first.ids):
                extra = next((sid for sid in other.ids if sid not in set(first.ids)), None)
                differing = missing if missing is not None else extra
                raise UserInputError(
                    f"{other.source or other.name} and {first.source or first.name} hold different samples "
                    f"({len(other.ids)} vs {len(first.ids)} ids; first differing id {differing!r}); "
                    "predict every member on the same split"
                )
            aligned = other.take([index[sid] for sid in first.ids])
        # Same ids with other labels: the files describe different data, and any result would depend on their order.
        # (A file without labels, -1, conflicts with none: the commands that need labels refuse it themselves.)
        conflict = (aligned.labels != first.labels) & (aligned.labels >= 0) & (first.labels >= 0)
        if conflict.any():
            row = int(np.argmax(conflict))
            raise UserInputError(
                f"{other.source or other.name}: id {first.ids[row]!r} is labelled {_label_name(aligned, row)} there but "
                f"{_label_name(first, row)} in {first.source or first.name}; predict every member on the same labelled data"
            )
        out.append(aligned)
    return out


def _label_name(preds: Predictions, row: int) -> str:
    label = int(preds.labels[row])
    return repr(preds.classes[label]) if 0 <= label < len(preds.classes) else "unlabelled (-1)"


def log_loss_and_accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Log loss and accuracy of the labelled rows (labels >= 0); NaN for both when none is labelled."""
    known = labels >= 0
    if not known.any():
        return float("nan"), float("nan")
    z = logits[known].astype(np.float64)
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    y = labels[known]
    return float(-logp[np.arange(len(y)), y].mean()), float((logp.argmax(1) == y).mean())


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def mean_log_probability(logits: Sequence[np.ndarray]) -> np.ndarray:
    """Log of the mean probability of several models' logits over the same rows [N, C] (float32):
    how a cross-fit's fold models are combined, in files and in ``predict_run`` alike."""
    return np.log(np.clip(np.mean([softmax(z) for z in logits], axis=0), 1e-30, None)).astype(np.float32)


def mean_probability(preds: Sequence[Predictions], **metadata) -> Predictions:
    """One prediction set whose probabilities are the mean of ``preds``' (aligned by id); ``metadata``:
    ``backbone``, ``run``, ``split`` of the result."""
    aligned = align_predictions(preds)
    first = aligned[0]
    return Predictions(logits=mean_log_probability([p.logits for p in aligned]), labels=first.labels, ids=first.ids,
                       classes=first.classes, tta=first.tta, **metadata)


def write_output(path: str | os.PathLike, preds: Predictions, top_k: int = 0) -> Path:
    """``.safetensors``: a prediction file (logits; with TTA or an ensemble, the log of the mean probability);
    ``.csv``: ``id,prediction,<class>...`` with one probability column per class (and ``top_k`` best classes)."""
    path = Path(path)
    if check_output_path(path, top_k) == ".safetensors":
        return write_predictions(path, preds)
    return atomic.write_text(path, predictions_csv(preds, top_k))


def check_output_path(path: str | os.PathLike, top_k: int = 0) -> str:
    """The output's kind (its suffix), or one line refusing any other; checked before the work is done."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise UserInputError(f"{path}: output must end in {' or '.join(OUTPUT_SUFFIXES)} (a prediction file or a CSV of "
                             f"id,prediction,<class probabilities>), got {suffix or 'no suffix'!r}")
    if top_k and suffix != ".csv":
        raise UserInputError(f"--top-k {top_k} adds columns to a CSV; {path} is a prediction file (it keeps every class's "
                             "logit): write a .csv")
    check_out_file(path)
    return suffix


def check_top_k(top_k: int, classes: int) -> int:
    if not 0 <= top_k <= classes:
        raise UserInputError(f"--top-k must be between 1 and the number of classes ({classes}), got {top_k}")
    return top_k


def predictions_csv(preds: Predictions, top_k: int = 0) -> str:
    records = preds.to_records(top_k)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(records[0]) if records else ["id", "prediction", *preds.classes])
    for record in records:
        writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in record.values()])
    return buffer.getvalue()
