"""The leaderboard of ``zoo run``: each member's latency on this device, and the Pareto front of member subsets.

Subsets are chosen on the selection rows (out-of-fold or validation), never on the holdout;
the holdout scores are shown beside. A subset's score is its equal-weight average (nothing
refitted per subset: 255 refits of 8 members on a few hundred rows would overfit them), its
latency the sum of its members' milliseconds per image at batch 64.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ensemble.metrics import accuracy, log_loss
from zoo import atomic
from zoo.errors import UserInputError
from zoo.rundir import RunDir

LATENCY_BACKENDS = {"torch": "PyTorch eager, as zoo predicts",
                    "onnx": "the pass exported to ONNX (zoo export), on onnxruntime's CPU provider, as a deployment runs it"}
MAX_EXHAUSTIVE = 8  # every subset up to this many members (255 subsets); greedy beyond
LATENCY_BATCHES = (1, 64)


@dataclass
class LeaderRow:
    name: str
    kind: str  # member | dropped member | equal weights | ensemble
    backbone: str
    params: int
    ms_batch1: float  # milliseconds per image, batch 1
    ms_batch64: float  # milliseconds per image, batch 64
    select: dict[str, float]  # accuracy, log_loss, ece on the selection rows (oof / val; the ensemble: cross-validated)
    holdout: dict[str, float] | None
    weight: float | None


@dataclass
class Subset:
    members: tuple[str, ...]
    latency_ms: float  # sum of the members' ms per image at batch 64
    params: int
    accuracy: float  # equal-weight average on the selection rows
    log_loss: float
    holdout_accuracy: float | None = None
    holdout_log_loss: float | None = None


# ---------------------------------------------------------------------------------------
# Pareto front of member subsets.


def pareto_front(costs: Sequence[float], scores: Sequence[float], tiebreak: Sequence[float] | None = None) -> list[int]:
    """Indices of the points no other point beats: none costs less or the same and scores higher
    (``tiebreak``, higher is better, orders equal scores). Sorted by cost."""
    costs, scores = np.asarray(costs, dtype=float), np.asarray(scores, dtype=float)
    if costs.shape != scores.shape:
        raise ValueError(f"costs and scores: expected the same length, got {costs.shape} and {scores.shape}")
    tb = np.zeros_like(scores) if tiebreak is None else np.asarray(tiebreak, dtype=float)
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -scores[i], -tb[i]))
    front, best = [], None
    for i in order:
        key = (scores[i], tb[i])
        if best is None or key > best:
            front.append(i)
            best = key
    return front


def candidate_subsets(m: int, score: Callable[[tuple[int, ...]], tuple[float, float]],
                      max_exhaustive: int = MAX_EXHAUSTIVE) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``m`` members up to ``max_exhaustive``; beyond, each member alone
    and the greedy forward selection (add the member that raises ``score`` most) at every size."""
    if m <= max_exhaustive:
        return [c for k in range(1, m + 1) for c in itertools.combinations(range(m), k)]
    out = [(j,) for j in range(m)]
    picked: tuple[int, ...] = ()
    for _ in range(m):
        rest = [j for j in range(m) if j not in picked]
        picked = tuple(sorted(picked + (max(rest, key=lambda j: score(tuple(sorted(picked + (j,))))),)))
        if picked not in out:
            out.append(picked)
    return out


def pick_under_budget(subsets: Sequence[Subset], max_latency: float) -> Subset | None:
    """The best subset (selection accuracy, then log loss, then lower latency) within ``max_latency`` ms per image."""
    fits = [s for s in subsets if s.latency_ms <= max_latency]
    return max(fits, key=lambda s: (s.accuracy, -s.log_loss, -s.latency_ms)) if fits else None


def _equal_weight_scores(probs: np.ndarray, labels: np.ndarray, subset: tuple[int, ...]) -> tuple[float, float]:
    mean = probs[list(subset)].mean(axis=0)
    return accuracy(mean, labels), log_loss(mean, labels)


def subset_table(names: list[str], latency: list[float], params: list[int], select_probs: np.ndarray, labels: np.ndarray,
                 holdout_probs: np.ndarray | None = None, holdout_labels: np.ndarray | None = None) -> list[Subset]:
    """Every candidate subset with its latency and equal-weight scores (selection rows; holdout beside)."""
    def score(s):
        acc, loss = _equal_weight_scores(select_probs, labels, s)
        return acc, -loss

    out = []
    for s in candidate_subsets(len(names), score):
        acc, loss = _equal_weight_scores(select_probs, labels, s)
        h_acc = h_loss = None
        if holdout_probs is not None:
            h_acc, h_loss = _equal_weight_scores(holdout_probs, holdout_labels, s)
        out.append(Subset(tuple(names[j] for j in s), float(sum(latency[j] for j in s)), int(sum(params[j] for j in s)),
                          acc, loss, h_acc, h_loss))
    return out


# ---------------------------------------------------------------------------------------
# Latency.


def measure_latency(run: str | os.PathLike, *, batch_sizes: Sequence[int] = LATENCY_BATCHES, repeats: int = 5,
                    device: str | None = None, threads: int | None = None, backend: str = "torch") -> dict[str, Any]:
    """Parameters and milliseconds per image of one prediction pass of the run (a cross-fit: one fold model, or
    its shared backbone and K heads; ``passes`` says how many passes a prediction takes) on random input of its
    input size: one warm-up pass, then the median of ``repeats``. ``backend`` (``LATENCY_BACKENDS``): ``torch`` runs
    it under ``torch.inference_mode``; ``onnx`` exports the pass (``zoo.pipeline.export``) and runs the graph with
    onnxruntime on the CPU, with the same threads."""
    import torch

    from finetune.hardware import resolve_hardware
    from finetune.inference import load_pass_model
    from zoo.cpu import apply_budget, cpu_budget

    if repeats < 1:
        raise UserInputError(f"--latency-repeats must be at least 1, got {repeats}")
    if backend not in LATENCY_BACKENDS:
        raise UserInputError(f"--latency-backend must be one of {', '.join(LATENCY_BACKENDS)}, got {backend!r}")
    if backend == "onnx":
        device = "cpu"  # onnxruntime's CPU provider: the graph runs there
    hardware = resolve_hardware(device, None, None)
    budget = cpu_budget(threads, 0, hardware.device.type)
    apply_budget(budget)
    model, config, passes = load_pass_model(run, hardware.device)
    if hardware.channels_last:
        model.to(memory_format=torch.channels_last)
    size = [int(v) for v in config["data_config"]["input_size"]]
    out: dict[str, Any] = {"params": int(sum(p.numel() for p in model.parameters())), "device": str(hardware.device),
                           "threads": budget.threads, "input_size": size, "repeats": repeats, "passes": passes,
                           "backend": backend}
    if backend == "onnx":
        for batch, seconds in onnx_latency(model, size, batch_sizes, repeats, budget.threads).items():
            out[f"ms_per_image_batch{batch}"] = 1000.0 * seconds / batch
        return out

    def sync():
        if hardware.device.type == "cuda":
            torch.cuda.synchronize(hardware.device)

    for batch in batch_sizes:
        x = torch.randn(batch, *size, device=hardware.device)
        if hardware.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        times = []
        with torch.inference_mode(), hardware.autocast():
            model(x)
            sync()
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                sync()
                times.append(time.perf_counter() - start)
        out[f"ms_per_image_batch{batch}"] = 1000.0 * statistics.median(times) / batch
    return out


def onnx_latency(model, size: Sequence[int], batch_sizes: Sequence[int], repeats: int, threads: int) -> dict[int, float]:
    """Median seconds per batch of ``model`` exported to ONNX and run with onnxruntime (one warm-up run first)."""
    import tempfile

    from zoo.onnx_predict import import_onnxruntime
    from zoo.pipeline.export import export_module

    ort = import_onnxruntime()
    with tempfile.TemporaryDirectory(prefix="zoo-latency-") as folder:
        path = Path(folder) / "pass.onnx"
        export_module(model.cpu().float(), [size], ["image"], path, output="logits")
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = {}
    for batch in batch_sizes:
        x = {"image": np.random.default_rng(0).random((batch, *size), dtype=np.float32)}
        session.run(None, x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, x)
            times.append(time.perf_counter() - start)
        out[batch] = statistics.median(times)
    return out


def cached_latencies(path: Path, names: Sequence[str], runs: Sequence[RunDir], repeats: int, device: str | None,
                     threads: int | None, log: Callable[[str], None], backend: str = "torch") -> list[dict[str, Any]]:
    """Each member's latency, measured once per model file, device and thread count (kept in ``path``, a zoo run's
    ``latency.json``: re-running a finished zoo does not time it again; a retrained member is timed again)."""
    cache = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    measured = []
    for name, run in zip(names, runs):
        entry = cache.get(name)
        model = (run.fold_runs() or [run])[0].model
        stamp = f"{model.stat().st_mtime_ns}:{model.stat().st_size}"
        fresh = entry is None or entry.get("model") != stamp or entry.get("repeats") != repeats or "passes" not in entry \
            or (device and entry.get("device") != device) or (threads and entry.get("threads") != threads) \
            or entry.get("backend", "torch") != backend
        if fresh:
            entry = {**measure_latency(run.root, repeats=repeats, device=device, threads=threads, backend=backend), "model": stamp}
            cache[name] = entry
            atomic.write_json(path, cache)
            log(f"  {name}: {entry['params'] / 1e6:.2f} M parameters, {entry['ms_per_image_batch1']:.2f} ms/image at batch 1, "
                f"{entry['ms_per_image_batch64']:.2f} at batch 64 ({entry['device']}, {entry['threads']} thread(s), {backend})")
        measured.append(entry)
    return measured


def _fmt(v, digits=4) -> str:
    return "" if v is None or (isinstance(v, float) and not np.isfinite(v)) else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def format_leaderboard(rows: Sequence[LeaderRow], select_split: str) -> str:
    from ensemble.report import format_table

    s = select_split
    headers = ["", "kind", "params (M)", "ms/img b1", "ms/img b64", f"{s} acc", f"{s} log loss", f"{s} ECE",
               "holdout acc", "holdout log loss", "holdout ECE", "weight"]
    body = [[r.name, r.kind, r.params / 1e6, r.ms_batch1, r.ms_batch64, r.select.get("accuracy"), r.select.get("log_loss"),
             r.select.get("ece"), *((r.holdout or {}).get(k) for k in ("accuracy", "log_loss", "ece")), r.weight]
            for r in rows]
    return format_table(headers, body)


def format_front(front: Sequence[Subset], select_split: str, pick: Subset | None = None) -> str:
    from ensemble.report import format_table

    body = [[" + ".join(s.members) + (" *" if pick is not None and s == pick else ""), s.latency_ms, s.params / 1e6,
             s.accuracy, s.log_loss, s.holdout_accuracy, s.holdout_log_loss] for s in front]
    return format_table(["subset (equal weights)", "ms/img b64", "params (M)", f"{select_split} acc",
                         f"{select_split} log loss", "holdout acc", "holdout log loss"], body)


class Leaderboard(list):
    """The rows of ``leaderboard.csv`` as dicts of numbers (None where a score is missing), best known first:
    ``pandas.DataFrame(result.leaderboard)`` or ``result.leaderboard.to_pandas()`` makes a table of them."""

    def to_pandas(self):
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Leaderboard.to_pandas() needs pandas: pip install pandas (the rows are plain dicts "
                              "without it)") from None
        return pd.DataFrame(list(self))


def leaderboard_records(rows: Sequence[LeaderRow], select_split: str) -> Leaderboard:
    """One dict per row, keyed by ``leaderboard.csv``'s columns (the one place they are named)."""
    s = select_split
    return Leaderboard(
        {"name": r.name, "kind": r.kind, "backbone": r.backbone, "params": r.params, "ms_per_image_batch1": r.ms_batch1,
         "ms_per_image_batch64": r.ms_batch64, **{f"{s}_{k}": r.select.get(k) for k in ("accuracy", "log_loss", "ece")},
         **{f"holdout_{k}": (r.holdout or {}).get(k) for k in ("accuracy", "log_loss", "ece")}, "weight": r.weight}
        for r in rows)


def write_leaderboard(path: Path, rows: Sequence[LeaderRow], select_split: str) -> Path:
    records = leaderboard_records(rows, select_split)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(records[0]))
    for record in records:
        writer.writerow([f"{v:.4g}" if k.startswith("ms_") else _fmt(v, 6) for k, v in record.items()])
    return atomic.write_text(path, buffer.getvalue())


def write_subsets(path: Path, subsets: Sequence[Subset], front: Sequence[Subset]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["members", "latency_ms", "params", "accuracy", "log_loss", "holdout_accuracy", "holdout_log_loss", "on_front"])
    for s in subsets:
        writer.writerow(["+".join(s.members), f"{s.latency_ms:.4g}", s.params, f"{s.accuracy:.6g}", f"{s.log_loss:.6g}",
                         _fmt(s.holdout_accuracy, 6), _fmt(s.holdout_log_loss, 6), int(s in front)])
    return atomic.write_text(path, buffer.getvalue())
