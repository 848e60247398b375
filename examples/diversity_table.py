"""The tables of docs/diversity.md ("Where diversity comes from"), from what ``examples/diversity.sh`` wrote into OUT.

    python examples/diversity_table.py OUT

Members: out-of-fold and holdout scores from each cross-fit's ``result.json``, wall time from
``OUT/times.tsv`` (the snapshots share their one run's time). Ensembles: the holdout tables
``zoo ensemble score`` saved, each ensemble's cost being the summed wall time of the runs fitted
into it. The best single model is the member with the lowest out-of-fold log loss: chosen, like the
weights, without looking at the holdout. Beside each ensemble: a paired bootstrap of the holdout
images (10,000 resamples) of its log loss minus that of its own best member (by out-of-fold log loss),
with a 95% interval.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from zoo.predictions import align_predictions, read_predictions

MEMBERS = {  # name in the tables: (run directory under OUT, the timed run it came from, how it was made)
    "ft0": ("ft0", "ft0", "lite0 fine-tuned: 5 folds x 6 epochs, fresh head, best epoch per fold"),
    "lp0": ("lp0", "lp0", "lite0 linear probe: features once, 5 logistic regressions"),
    "lpft0": ("lpft0", "lpft0", "lite0 LP-FT: each fold fine-tuned from its probe's head, scaled"),
    "lpft0-2ep": ("lpft0-2ep", "lpft0-2ep", "lite0 LP-FT, 2 epochs (1 warmup, 1 cosine)"),
    "snapshot-1": ("snap0/snapshot-1", "snap0", "lite0 snapshot 1 of 3 (5 folds x 7 epochs, 3 cosine cycles)"),
    "snapshot-2": ("snap0/snapshot-2", "snap0", "lite0 snapshot 2 of 3"),
    "snapshot-3": ("snap0/snapshot-3", "snap0", "lite0 snapshot 3 of 3"),
    "lp1": ("lp1", "lp1", "lite1 linear probe"),
    "lp2": ("lp2", "lp2", "lite2 linear probe"),
    "lp1-v4": ("lp1-v4", "lp1-v4", "lite1 linear probe, center crops + 4 augmented views per train image"),
    "lp2-v4": ("lp2-v4", "lp2-v4", "lite2 linear probe, center crops + 4 augmented views"),
    "lpft2-2ep": ("lpft2-2ep", "lpft2-2ep", "lite2 LP-FT, 2 epochs"),
}
ENSEMBLES = {"lite0": "the lite0 kinds (ft0, lp0, lpft0, lpft0-2ep, 3 snapshots)", "probes12": "lp1 + lp2",
             "views": "lp1-v4 + lp2-v4", "probes": "the five probes", "all": "all twelve"}


def main(out: Path) -> None:
    times = dict(line.split("\t") for line in (out / "times.tsv").read_text().split("\n") if line.strip())
    times = {name: float(seconds) for name, seconds in times.items()}
    print("| member | how | out-of-fold acc / log loss | holdout acc / log loss | wall time |")
    print("|---|---|---|---|---|")
    oof_loss, holdout_loss = {}, {}
    for name, (path, timed, how) in MEMBERS.items():
        scores = json.loads((out / path / "result.json").read_text())["scores"]
        oof_loss[name], holdout_loss[name] = scores["oof"]["log_loss"], scores["holdout"]["log_loss"]
        cell = lambda s: f"{s['accuracy']:.3f} / {s['log_loss']:.4f}"  # noqa: E731
        shared = " (the run)" if timed != path else ""
        print(f"| {name} | {how} | {cell(scores['oof'])} | {cell(scores['holdout'])} | {times[timed]:.0f} s{shared} |")
    soup = json.loads((out / "soup0" / "result.json").read_text())
    print(f"| soup0 | ft0's 5 fold models, uniform soup, BatchNorm averaged: one model | - | "
          f"{soup['val_accuracy']:.3f} / {soup['val_loss']:.4f} | {times['soup0']:.0f} s after ft0 |")

    best = min(oof_loss, key=oof_loss.get)
    best_time = times[MEMBERS[best][1]]
    holdout = {m: read_predictions(out / path / "predictions" / "val.safetensors") for m, (path, _, _) in MEMBERS.items()}
    print(f"\nbest single model (lowest out-of-fold log loss): {best}, {best_time:.0f} s\n")
    print("| ensemble | members fitted | weights | holdout acc / log loss | equal weights | its best member by "
          "out-of-fold log loss: holdout | ensemble - that member, holdout log loss (95% bootstrap) | cost (wall time) | "
          "x that member's time |")
    print("|---|---|---|---|---|---|---|---|---|")
    ensembles = {}  # name: (holdout log loss, cost, holdout predictions)
    for name, what in ENSEMBLES.items():
        rows = {row["name"]: row for row in csv.DictReader((out / f"holdout-{name}.csv").open())}
        fitted = json.loads((out / f"ensemble-{name}.json").read_text())
        weights = ", ".join(f"{m['name']} {m['weight']:.2f}" for m in fitted["members"])
        inside = [m for m in rows if m in MEMBERS]
        cost = sum(times[run] for run in {MEMBERS[m][1] for m in inside})
        top = min(inside, key=oof_loss.get)
        top_time = times[MEMBERS[top][1]]
        ens, equal = rows["ensemble"], rows["equal weights"]
        predictions = read_predictions(out / f"holdout-{name}.safetensors")
        print(f"| {name} | {what} | {weights} | {float(ens['accuracy']):.3f} / {float(ens['log_loss']):.4f} | "
              f"{float(equal['accuracy']):.3f} / {float(equal['log_loss']):.4f} | "
              f"{top} {float(rows[top]['accuracy']):.3f} / {float(rows[top]['log_loss']):.4f} | "
              f"{paired_bootstrap(predictions, holdout[top])} | "
              f"{cost:.0f} s | {cost / top_time:.2f} |")
        ensembles[name] = (float(ens["log_loss"]), cost, predictions)

    # The goal, against the best single model by out-of-fold log loss (chosen without the holdout, as the weights
    # are), and against the hardest bar: the member best on the holdout itself (chosen on it, so flattering to it).
    hardest = min(holdout_loss, key=holdout_loss.get)
    for label, single in (("the best single model by out-of-fold log loss", best),
                          ("the hardest bar, the best member on the holdout itself", hardest)):
        loss, seconds = holdout_loss[single], times[MEMBERS[single][1]]
        met = [f"{name} ({e_loss:.4f}, {e_cost / seconds:.2f}x; "
               f"{paired_bootstrap(predictions, holdout[single])})"
               for name, (e_loss, e_cost, predictions) in ensembles.items() if e_loss < loss and e_cost < 2 * seconds]
        print(f"\ngoal against {label}, {single} (holdout log loss {loss:.4f}, {seconds:.0f} s): an ensemble below it "
              f"for less than twice its time: " + (f"met by {'; '.join(met)}" if met else "not met"))

    for kind, title in (("prob_corr", "probability correlation"), ("correct_corr", "correlation of correctness (1: wrong on the same images)")):
        rows = list(csv.reader((out / "correlation" / f"matrix_{kind}.csv").open()))
        print(f"\nout-of-fold {title}:\n")
        print("| | " + " | ".join(rows[0][1:]) + " |")
        print("|---" * len(rows[0]) + "|")
        for row in rows[1:]:
            print(f"| {row[0]} | " + " | ".join(f"{float(v):.2f}" for v in row[1:]) + " |")


def paired_bootstrap(ensemble, single, resamples: int = 10_000, seed: int = 0) -> str:
    """Mean per-image log loss of ``ensemble`` minus ``single`` on the same images, with a bootstrap 95% interval."""
    ensemble, single = align_predictions([ensemble, single])  # same ids, classes and labels, or a clear error
    rows = np.arange(len(single.labels))
    difference = single.log_probabilities()[rows, single.labels] - ensemble.log_probabilities()[rows, single.labels]
    draws = np.random.default_rng(seed).integers(0, len(difference), (resamples, len(difference)))
    means = difference[draws].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return f"{difference.mean():+.4f} [{low:+.4f}, {high:+.4f}]; lower in {np.mean(means < 0):.0%} of resamples"

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/diversity_table.py OUT (the folder examples/diversity.sh wrote)")
    main(Path(sys.argv[1]))
