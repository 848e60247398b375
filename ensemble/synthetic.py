"""Synthetic members from known distributions, for tests, benchmarks and demos.

Member j's logits are ``scale_j * (signal_j * onehot(label) + sqrt(shared_j) * G + sqrt(1 - shared_j) * E_j)``,
with G noise common to every member (what makes members correlated) and E_j its own.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from zoo import atomic
from zoo.predictions import Predictions, write_predictions
from zoo.rundir import RunDir


def synthetic_labels(n: int, n_classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_classes, n)


def synthetic_members(n_members: int, n: int, n_classes: int, *, signal: float | Sequence[float] = 2.0,
                      shared: float | Sequence[float] = 0.3, scale: float | Sequence[float] = 1.0,
                      seed: int = 0, labels: np.ndarray | None = None, split: str = "val") -> list[Predictions]:
    """``n_members`` prediction sets over the same ``n`` samples and ``n_classes`` classes."""
    rng = np.random.default_rng(seed)
    labels = synthetic_labels(n, n_classes, seed) if labels is None else np.asarray(labels)
    signal, shared, scale = (np.broadcast_to(np.asarray(v, dtype=np.float64), (n_members,)) for v in (signal, shared, scale))
    common = rng.standard_normal((n, n_classes), dtype=np.float32)
    ids = [f"img_{i:06d}.jpg" for i in range(n)]
    classes = [f"class_{c:03d}" for c in range(n_classes)]
    rows = np.arange(n)
    members = []
    for j in range(n_members):
        logits = rng.standard_normal((n, n_classes), dtype=np.float32)
        logits *= np.float32(np.sqrt(1.0 - shared[j]))
        logits += np.float32(np.sqrt(shared[j])) * common
        logits[rows, labels] += np.float32(signal[j])
        logits *= np.float32(scale[j])
        members.append(Predictions(logits=logits, labels=labels, ids=ids, classes=classes,
                                   backbone=f"synthetic_{j}", run=f"member_{j:02d}", split=split))
    return members


def sample_labels(logits: np.ndarray, seed: int = 0) -> np.ndarray:
    """Labels drawn from ``softmax(logits)``: a member with these logits is then perfectly calibrated."""
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    u = np.random.default_rng(seed).random((len(p), 1))
    return np.minimum((p.cumsum(axis=1) < u).sum(axis=1), p.shape[1] - 1)


def write_synthetic_runs(root: str | os.PathLike, members: Sequence[Predictions], split: str = "val") -> list[Path]:
    """A run directory per member under ``root`` (``config.json`` and ``predictions/<split>.safetensors``),
    as ``zoo finetune`` would leave them, for demos and tests of the ensemble commands."""
    runs = []
    for j, p in enumerate(members):
        run = RunDir(Path(root) / (Path(p.run).name if p.run else f"member_{j:02d}"))
        if not run.is_run():
            atomic.write_json(run.config, {"backbone": p.backbone or f"synthetic_{j}", "classes": p.classes})
        write_predictions(run.predictions(split), replace(p, run=str(run.root.resolve()), split=split, source=""))
        runs.append(run.root)
    return runs
