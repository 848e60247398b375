"""The table of docs/distill.md ("Ship one model"), from what ``examples/distill_hymenoptera.sh`` wrote into OUT.

    python examples/distill_table.py OUT

Holdout (val/) accuracy and log loss of each member, the teacher ensemble, the label-trained lite0 (lpft0-2ep) and
the distilled lite0 students; latency: milliseconds per image of a whole prediction (a cross-fit whose fold models
do not share their backbone: K passes) at batch 1 and 64, on this machine's CPU with one thread, through
``zoo.pipeline.leaderboard.measure_latency``; training time: each step's wall time (OUT/times.tsv), the students
also with their teacher's. Beside each: the paired bootstrap (10,000 resamples of the holdout images) of its log
loss minus lpft0-2ep's, with a 95% interval (``examples/diversity_table.paired_bootstrap``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diversity_table import paired_bootstrap  # noqa: E402

from zoo.pipeline.leaderboard import measure_latency  # noqa: E402
from zoo.predictions import log_loss_and_accuracy, read_predictions  # noqa: E402

ROWS = {  # name: (holdout prediction file under OUT, runs timed for latency, steps of times.tsv, how it was made)
    "lp1-v4": ("lp1-v4/predictions/val.safetensors", ["lp1-v4"], ["lp1-v4"], "member: lite1 linear probe, 5 folds"),
    "lp2-v4": ("lp2-v4/predictions/val.safetensors", ["lp2-v4"], ["lp2-v4"], "member: lite2 linear probe, 5 folds"),
    "teacher": ("holdout-teacher.safetensors", ["lp1-v4", "lp2-v4"], ["lp1-v4", "lp2-v4"], "lp1-v4 + lp2-v4, weights out of fold"),
    "lpft0-2ep": ("lpft0-2ep/predictions/val.safetensors", ["lpft0-2ep"], ["lpft0-2ep"], "lite0 LP-FT on labels, 5 folds x 2 epochs"),
    "student-oof": ("student-oof/predictions/val.safetensors", ["student-oof"], ["student-oof"],
                    "lite0 distilled, out-of-fold teacher"),
    "student-all": ("student-all/predictions/val.safetensors", ["student-all"], ["student-all"], "lite0 distilled, all-fold teacher"),
    # Controls (run by hand beside the script, reusing student-oof's cached teacher targets): the same schedule on
    # the same views with the hard labels alone (--alpha 1), and the out-of-fold student trained twice as long.
    "student-hard": ("student-hard/predictions/val.safetensors", ["student-hard"], ["student-hard"],
                     "control: the same lite0 run on labels alone (--alpha 1)"),
    "student-oof-long": ("student-oof-long/predictions/val.safetensors", ["student-oof-long"], ["student-oof-long"],
                         "lite0 distilled, out-of-fold teacher, longer"),
    "student-oof-mix": ("student-oof-mix/predictions/val.safetensors", ["student-oof-mix"], ["student-oof-mix"],
                        "lite0 distilled, out-of-fold teacher, mixed views (function matching)"),
    "student-chosen": ("student-chosen/predictions/val.safetensors", ["student-chosen"], ["student-chosen"],
                       "lite0 distilled, out-of-fold teacher, recipe chosen on 20% of train/"),
}


def main(out: Path) -> None:
    times = {}
    for line in (out / "times.tsv").read_text().splitlines():
        if line.strip():
            name, seconds = line.split("\t")
            times[name] = float(seconds)  # a step run again (after an interruption) keeps its last time
    teacher_time = times["lp1-v4"] + times["lp2-v4"]
    baseline = read_predictions(out / ROWS["lpft0-2ep"][0])
    print("| model | how | holdout acc | holdout log loss | ms/image (batch 1 / 64, 1 thread) | training time | "
          "log loss - lpft0-2ep (95% bootstrap) |")
    print("|---|---|---|---|---|---|---|")
    for name, (path, timed, steps, how) in ROWS.items():
        if not (out / path).is_file():
            continue
        preds = read_predictions(out / path)
        loss, acc = log_loss_and_accuracy(preds.logits, preds.labels)
        lat = [measure_latency(out / run, repeats=5, threads=1) for run in timed]
        ms = [sum(e[f"ms_per_image_batch{b}"] * e["passes"] for e in lat) for b in (1, 64)]
        seconds = sum(times[s] for s in steps)
        config = json.loads((out / name / "config.json").read_text()) if name.startswith("student") else {}
        if config:
            d = config["distill"]
            mixed = f", mixed by Beta({d['view_mixup']:g}, {d['view_mixup']:g})" if d.get("view_mixup") else ""
            how += (f" ({config['options']['epochs']} epochs, {d['views']} views{mixed}, alpha {d['alpha']:g}, "
                    f"T {d['temperature']:g})")
            spent = f"{seconds:.0f} s (+ teacher {teacher_time:.0f} s)"
        else:
            spent = f"{seconds:.0f} s"
        vs = "-" if name == "lpft0-2ep" else paired_bootstrap(preds, baseline)
        print(f"| {name} | {how} | {acc:.3f} | {loss:.4f} | {ms[0]:.1f} / {ms[1]:.1f} | {spent} | {vs} |")


def choose(out: Path, candidates: list[str]) -> str:
    """The candidate (OUT/select-I, trained with --val-from-train) whose last epoch has the lowest validation log loss:
    the validation split is 20% of train/, so the choice never sees val/."""
    def last_val_loss(i: str) -> float:
        rows = (out / f"select-{i}" / "metrics.csv").read_text().splitlines()
        return float(dict(zip(rows[0].split(","), rows[-1].split(",")))["val_loss"])

    losses = {i: last_val_loss(i) for i in candidates}
    print("  ".join(f"select-{i}: {v:.4f}" for i, v in losses.items()), file=sys.stderr)
    return min(losses, key=losses.get)


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--choose":
        print(choose(Path(sys.argv[2]), sys.argv[3:]))
    elif len(sys.argv) == 2:
        main(Path(sys.argv[1]))
    else:
        sys.exit("usage: python examples/distill_table.py OUT (the folder examples/distill_hymenoptera.sh wrote)\n"
                 "       python examples/distill_table.py --choose OUT I... (the candidate select-I to train on all of train/)")
