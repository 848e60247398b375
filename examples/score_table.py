"""Print test scores of runs and their ensemble: python examples/score_table.py RUN... --ensemble PREDFILE.

Each RUN must hold predictions/test.safetensors (from `zoo predict`); the table gives
each member's test accuracy and log loss, the equal-weight average, the fitted ensemble,
and each run's mean seconds per epoch from metrics.csv.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from zoo.demo import score_rows, score_table
from zoo.predictions import align_predictions, read_predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--ensemble", type=Path, required=True)
    args = parser.parse_args()
    members = align_predictions([read_predictions(run / "predictions" / "test.safetensors") for run in args.runs]
                                + [read_predictions(args.ensemble)])
    *test, combined = members
    notes = []
    for run in args.runs:
        rows = list(csv.DictReader(open(run / "metrics.csv")))
        notes.append(f"{np.mean([float(r['seconds']) for r in rows]):.1f} s/epoch (train), {len(rows)} epochs")
    rows = score_rows([run.name for run in args.runs], notes, test, combined)
    print(f"test set: {len(combined.ids)} images\n{score_table(rows)}")


if __name__ == "__main__":
    main()
