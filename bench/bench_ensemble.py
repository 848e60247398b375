"""Benchmark of the ensemble weight searches (``zoo ensemble fit``) on synthetic members.

For each size (members x samples x classes) it times each method's fit on the members'
temperature-scaled log-probabilities, reports the in-sample log loss and accuracy of
the blend it returns, times a reference greedy selection written the plain way
(AutoGluon's EnsembleSelection: for every candidate build the full [N, C] blend and
score it, one candidate at a time) on the same inputs, checks that both select the same
members, and prints the time ratio. It also times the whole ``fit_ensemble`` pipeline
(member temperatures, weights, final temperature, baselines, with and without 5-fold
cross-validation). Stacking (logistic regression on M x C features) is compared with
slsqp through the whole pipeline at its own, smaller size.

It also runs the whole default ``zoo ensemble fit`` (member temperatures, weights, final
temperature, 5-fold CV) as the command line does, in a fresh process, on prediction files
written to disk, and reports its wall time and peak memory (``ru_maxrss`` of that process)
against the size of the predictions (``--cli-size``).

    python bench/bench_ensemble.py                        # the sizes of the issue, ~4 min on 2 cores
    python bench/bench_ensemble.py --methods none --stacking-size none    # the whole command only
    python bench/bench_ensemble.py --sizes 8x2000x10 --stacking-size 4x1000x5 --cv 2    # seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensemble.calibration import apply_temperature  # noqa: E402
from ensemble.fit import fit_ensemble, fit_temperatures, stack_log_probs  # noqa: E402
from ensemble.metrics import EPS, score_table_from_log_probs  # noqa: E402
from ensemble.synthetic import synthetic_members  # noqa: E402
from ensemble.weights import make_search  # noqa: E402
from zoo import atomic  # noqa: E402

GREEDY_STEPS = 100


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        m, n, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--sizes: expected MEMBERSxSAMPLESxCLASSES like 20x50000x100, got {text!r}") from None
    return m, n, c


def make_members(m: int, n: int, c: int, seed: int = 0):
    # Members of different strength, confidence and mutual correlation, like a real zoo.
    return synthetic_members(m, n, c, signal=np.linspace(1.5, 3.0, m), shared=np.linspace(0.3, 0.7, m),
                             scale=np.linspace(0.7, 2.0, m), seed=seed)


def reference_greedy(probs: np.ndarray, labels: np.ndarray, steps: int) -> tuple[np.ndarray, list[int]]:
    """Caruana selection as AutoGluon's EnsembleSelection writes it: every step, for every
    candidate, the full blend ``s/(s+1) * ensemble + p_j/(s+1)`` and its log loss; with
    replacement; the best step kept. Returns the weights and the member picked at each step."""
    m, n, _ = probs.shape
    rows = np.arange(n)
    ensemble = np.zeros(probs.shape[1:], dtype=probs.dtype)
    counts = np.zeros(m)
    history, scores, picks = [], [], []
    for s in range(steps):
        weighted = ensemble * probs.dtype.type(s / (s + 1))
        losses = np.empty(m)
        for j in range(m):
            blend = weighted + probs[j] * probs.dtype.type(1 / (s + 1))
            losses[j] = -np.mean(np.log(np.clip(blend[rows, labels].astype(np.float64), EPS, 1.0)))
        best = int(np.argmin(losses))
        picks.append(best)
        ensemble = weighted + probs[best] * probs.dtype.type(1 / (s + 1))
        counts[best] += 1
        history.append(counts.copy())
        scores.append(losses[best])
    best_step = int(np.argmin(scores))
    return history[best_step] / history[best_step].sum(), picks


CPU = {}  # the CPU seconds of the last ``timed`` call (all threads): next to wall time, it shows a busy machine


def _first_pick(search, log_probs, labels) -> list[int]:
    """With n_init=1 the path starts from the best single member (the reference's first pick)."""
    return [int(np.argmin([search_loss(lp, labels) for lp in log_probs]))]


def search_loss(log_probs, labels) -> float:
    return -float(np.mean(np.clip(log_probs[np.arange(len(labels)), labels].astype(np.float64), np.log(EPS), 0.0)))


def timed(fn):
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    CPU["last"] = time.process_time() - cpu
    return out, time.perf_counter() - start


def bench_size(m: int, n: int, c: int, cv: int, methods: list[str], rows: list[dict], ratios: list[str]) -> None:
    members, t_gen = timed(lambda: make_members(m, n, c))
    log_probs, t_stack = timed(lambda: stack_log_probs(members))
    labels = members[0].labels
    temps, t_temp = timed(lambda: fit_temperatures(log_probs, labels))
    cal = np.stack([apply_temperature(lp, t) for lp, t in zip(log_probs, temps)])
    print(f"# {m} x {n} x {c}: generate {t_gen:.1f} s, log-softmax {t_stack:.1f} s, "
          f"{m} member temperatures {t_temp:.1f} s", flush=True)

    def add(method, seconds, lp, note=""):
        scores = score_table_from_log_probs(lp, labels, ("log_loss", "accuracy"))
        rows.append(dict(method=method, members=m, samples=n, classes=c, seconds=seconds, cpu=CPU["last"], **scores, note=note))
        print(f"  {method:<26} {seconds:7.2f} s  log loss {scores['log_loss']:.4f}  accuracy {scores['accuracy']:.4f}  {note}", flush=True)

    searches = {
        "slsqp": dict(method="slsqp"),
        "greedy": dict(method="greedy", n_iter=GREEDY_STEPS - 1, n_init=1),
        "greedy(accuracy)": dict(method="greedy", metric="accuracy", n_iter=GREEDY_STEPS - 1, n_init=1),
        "random": dict(method="random", n_iter=1000),
        "slsqp(geometric)": dict(method="slsqp", combine="geometric"),
    }
    greedy_weights, greedy_seconds, greedy_picks = None, None, None
    for name in methods:
        if name not in searches:
            continue
        kwargs = dict(searches[name])
        search = make_search(kwargs.pop("method"), **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, seconds = timed(lambda: search.fit(cal, labels))
        lp = search.predict_log_proba(cal)
        note = ""
        if name.startswith("greedy"):
            note = f"{GREEDY_STEPS} steps, best prefix {search.best_step_ + 1}"
        elif name == "random":
            note = f"{search.n_evaluated_} blends"
        note = (note + f"; {np.count_nonzero(search.weights_)} nonzero weights").lstrip("; ")
        add(name, seconds, lp, note)
        if name == "greedy":
            greedy_weights, greedy_seconds = search.weights_, seconds
            greedy_picks = _first_pick(search, cal, labels) + list(search.selected_)

    if greedy_weights is not None and "reference" in methods:
        probs = np.exp(cal)
        (ref_weights, ref_picks), seconds = timed(lambda: reference_greedy(probs, labels, GREEDY_STEPS))
        from ensemble.combine import combine

        same = ref_picks == greedy_picks
        # The best-prefix cut compares scores that differ in the 6th digit late in the path:
        # float32 blends (the reference) and float64 sums (ours) may cut it a step apart.
        cut = "same weights" if np.allclose(ref_weights, greedy_weights) else f"weights differ by {np.abs(ref_weights - greedy_weights).max():.1e} (best-prefix cut, float32 rounding)"
        add("greedy reference (plain)", seconds, combine(cal, ref_weights),
            f"same {GREEDY_STEPS} picks as ours: {'yes' if same else 'NO'}; {cut}")
        ratios.append(f"{m} x {n} x {c}: reference greedy {seconds:.2f} s / ours {greedy_seconds:.2f} s = "
                      f"{seconds / greedy_seconds:.0f}x faster (same picks: {'yes' if same else 'NO'})")

    if "pipeline" in methods:
        for method in ("slsqp", "greedy"):
            for folds in ((0, cv) if cv else (0,)):
                if method == "greedy" and folds:
                    continue
                ens, seconds = timed(lambda: fit_ensemble(members, method=method, cv=folds))
                s = ens.scores["cv" if folds else "in_sample"]["ensemble"]
                rows.append(dict(method=f"fit_ensemble {method} cv={folds}", members=m, samples=n, classes=c,
                                 seconds=seconds, cpu=CPU["last"], log_loss=s["log_loss"], accuracy=s["accuracy"],
                                 note="whole pipeline: temperatures, weights, final T, baselines" + (", scores held-out" if folds else "")))
                print(f"  fit_ensemble {method} cv={folds:<2}     {seconds:7.2f} s  log loss {s['log_loss']:.4f}  "
                      f"accuracy {s['accuracy']:.4f}", flush=True)
    del members, log_probs, cal


def bench_stacking(m: int, n: int, c: int, cv: int, rows: list[dict]) -> None:
    """Stacking against slsqp, both through the whole pipeline, scored on held-out folds."""
    members = make_members(m, n, c, seed=1)
    folds = cv or 0
    for method in ("stacking", "slsqp"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ens, seconds = timed(lambda: fit_ensemble(members, method=method, cv=folds))
        s = ens.scores["cv" if folds else "in_sample"]["ensemble"]
        note = f"{m * c} features; " if method == "stacking" else ""
        rows.append(dict(method=f"fit_ensemble {method} cv={folds}", members=m, samples=n, classes=c, seconds=seconds,
                         cpu=CPU["last"], log_loss=s["log_loss"], accuracy=s["accuracy"],
                         note=note + ("whole pipeline, scores held-out" if folds else "whole pipeline, in-sample")))
        print(f"# {method} at {m} x {n} x {c}, cv={folds}: {seconds:.2f} s, log loss {s['log_loss']:.4f}", flush=True)


def bench_cli(m: int, n: int, c: int, rows: list[dict]) -> None:
    """The whole default ``zoo ensemble fit``, as a user runs it: prediction files on disk, a
    fresh process; wall seconds and that process's peak resident memory."""
    import resource
    import subprocess
    import tempfile

    from ensemble.synthetic import write_synthetic_runs

    with tempfile.TemporaryDirectory() as tmp:
        members = make_members(m, n, c)
        runs = [str(r) for r in write_synthetic_runs(Path(tmp) / "runs", members)]
        size = sum(p.logits.nbytes for p in members)
        del members
        # The files were just written: flush them now, or the kernel's write-back of the
        # bench's own 400 MB lands inside the timed command (measured: +3 s).
        os.sync()
        command = [sys.executable, "-m", "zoo", "ensemble", "fit", *runs, "--out", str(Path(tmp) / "ens.json")]
        start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        seconds = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise SystemExit(f"zoo ensemble fit failed:\n{done.stderr}")
        import json

        ens = json.loads((Path(tmp) / "ens.json").read_text())
    peak = usage.ru_maxrss * 1024  # kilobytes on Linux
    cpu = (usage.ru_utime + usage.ru_stime) - (before.ru_utime + before.ru_stime)
    s = ens["scores"]["cv"]["ensemble"]
    note = (f"whole default command, fresh process: peak memory {peak / 2**20:.0f} MiB = {peak / size:.2f}x the "
            f"predictions ({size / 2**20:.0f} MiB float32); {len(ens['members'])} members kept; scores held-out")
    rows.append(dict(method="zoo ensemble fit (default)", members=m, samples=n, classes=c, seconds=seconds, cpu=cpu,
                     log_loss=s["log_loss"], accuracy=s["accuracy"], note=note))
    print(f"# zoo ensemble fit at {m} x {n} x {c}: {seconds:.2f} s wall, {cpu:.2f} s cpu; {note}", flush=True)


def print_table(rows: list[dict], ratios: list[str]) -> None:
    headers = ["method", "members", "samples", "classes", "fit s", "cpu s", "log loss", "accuracy", "note"]
    cells = [[r["method"], str(r["members"]), str(r["samples"]), str(r["classes"]), f"{r['seconds']:.2f}", f"{r['cpu']:.2f}",
              f"{r['log_loss']:.4f}", f"{r['accuracy']:.4f}", r["note"]] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    print()
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.rjust(w) if 0 < i < 8 else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) + " |")
    print()
    print("fit s: wall-clock seconds; cpu s: CPU seconds of all threads (well below fit s: other work shared the cores)")
    for line in ratios:
        print(line)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20x50000x100,10x10000x1000", help="comma-separated MEMBERSxSAMPLESxCLASSES")
    parser.add_argument("--methods", default="slsqp,greedy,greedy(accuracy),random,reference,pipeline",
                        help="comma-separated ('none' for none): slsqp, greedy, greedy(accuracy), random, slsqp(geometric), reference, pipeline")
    parser.add_argument("--stacking-size", default="10x5000x10", help="size for the stacking row ('none' to skip)")
    parser.add_argument("--cv", type=int, default=5, help="folds for the cross-validated pipeline row (0: skip it)")
    parser.add_argument("--cli-size", default="20x50000x100", help="size for the whole-command row ('none' to skip)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    print(f"numpy {np.__version__}, {os.cpu_count()} CPU(s)", flush=True)
    methods = [m.strip() for m in args.methods.split(",")]
    rows: list[dict] = []
    ratios: list[str] = []
    if args.cli_size != "none":
        bench_cli(*parse_size(args.cli_size), rows)
    if methods != ["none"]:
        for size in args.sizes.split(","):
            bench_size(*parse_size(size), args.cv, methods, rows, ratios)
    if args.stacking_size != "none":
        bench_stacking(*parse_size(args.stacking_size), args.cv, rows)
    print_table(rows, ratios)
    if args.json:
        atomic.write_json(args.json, {"rows": rows, "ratios": ratios})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
