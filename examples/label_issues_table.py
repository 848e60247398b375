"""The table of docs/label_issues.md: a zoo run against the same zoo run with --exclude, on the untouched holdout.

    python examples/label_issues_table.py BASE EXCLUDED      (two `zoo run --out` folders)

For each run: the fitted ensemble and the best single member (lowest out-of-fold log loss, chosen
without the holdout, as the weights are) on the holdout, then a paired bootstrap over the holdout
images (10,000 resamples) of the excluded run's log loss minus the base run's.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from ensemble.predict import predict_ensemble
from examples.diversity_table import paired_bootstrap
from zoo.pipeline.layout import ZooRunDir
from zoo.predictions import load_predictions


def holdout_predictions(out: Path) -> dict:
    """The run's best member by out-of-fold log loss and the fitted ensemble: name -> holdout predictions."""
    layout = ZooRunDir(out)
    with layout.leaderboard.open() as f:
        members = [r for r in csv.DictReader(f) if r["kind"] in ("member", "dropped member")]
    best = min(members, key=lambda r: float(r["oof_log_loss"]))["name"]
    ensemble = json.loads(layout.ensemble.read_text())
    kept = [load_predictions(layout.member(m["name"]).root, "val") for m in ensemble["members"]]
    return {"pool": len(load_predictions(layout.member(best).root, "oof").ids), "best": best,
            "best member": load_predictions(layout.member(best).root, "val"),
            "fitted ensemble": predict_ensemble(layout.ensemble, kept, split="val")}


def scores(preds) -> str:
    rows = range(len(preds.labels))
    log_loss = -preds.log_probabilities()[rows, preds.labels].mean()
    return f"{(preds.probabilities().argmax(axis=1) == preds.labels).mean():.3f} / {log_loss:.4f}"


def main(base: Path, excluded: Path) -> None:
    runs = {"without exclusion": holdout_predictions(base), "with exclusion": holdout_predictions(excluded)}
    print("| model | " + " | ".join(f"{k} ({v['pool']} train images): holdout acc / log loss" for k, v in runs.items())
          + " | with - without, holdout log loss (95% bootstrap) |")
    print("|---|---|---|---|")
    before, after = runs.values()
    for model in ("fitted ensemble", "best member"):
        names = [f" ({r['best']})" if model == "best member" else "" for r in (before, after)]
        print(f"| {model} | {scores(before[model])}{names[0]} | {scores(after[model])}{names[1]} | "
              f"{paired_bootstrap(after[model], before[model])} |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python examples/label_issues_table.py BASE EXCLUDED (two `zoo run --out` folders)")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
