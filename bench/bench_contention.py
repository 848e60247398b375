#!/usr/bin/env python
"""zoo on a shared CPU: wall time with other work running, as a ratio of the time alone.

Each scenario runs real commands in fresh processes (``python -m zoo ...``) and times them:

* ``zoo demo`` alone, then again with one other CPU-bound process running (a Python
  busy loop): target ratio <= 1.3 (before the CPU budget, 2.2x on 2 cores);
* a small ``zoo finetune`` on generated images alone, then two of them started together:
  target ratio <= 2.2 for each (before the CPU budget, 10x for two demos on 2 cores).

Then, alone, the demo's ResNet member (``zoo finetune test_resnet`` on the demo's digits,
with its options) with all cores as torch threads and no loader worker, against one core
less and one worker: which split is faster for the demo on this machine (the budget
keeps decoding in the main process on 1-2 cores).

``--threads-as-before`` runs every scenario again as zoo ran before the budget: ``--threads
<cores>`` (torch's default, one thread per core) and, for finetune, ``--workers min(8,
cores)`` (the demo always ran with 0), for the before/after in one table. The
ratios mean something only when the machine is otherwise idle: the bench measures the
load first and says so in its header when it is not.

    python bench/bench_contention.py                                  # a few minutes on 2 cores
    python bench/bench_contention.py --threads-as-before             # and the old default, twice as long
    python bench/bench_contention.py --demo-epochs 1 --finetune-epochs 1 --images 8   # a smoke test, about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from zoo.cpu import measure_load, usable_cores  # noqa: E402

BUSY_LOOP = "while True: pass"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-epochs", type=int, default=2, help="zoo demo --epochs")
    p.add_argument("--finetune-model", default="resnet18", help="timm model of the finetune scenario (random init)")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--input-size", type=int, default=64, help="finetune --input-size")
    p.add_argument("--images", type=int, default=48, help="generated train images per class (3 classes; a third as many val)")
    p.add_argument("--threads-as-before", action="store_true",
                   help="also run every scenario with --threads <cores>: torch's default before the CPU budget")
    p.add_argument("--keep", metavar="DIR", default=None, help="write runs and logs here (default: a temporary folder)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the table's rows as JSON")
    args = p.parse_args(argv)
    for name in ("demo_epochs", "finetune_epochs", "images"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def make_images(root: Path, per_class: int, size: int = 72) -> Path:
    """train/ and val/ of 3 classes of coloured noise (a class is a colour), as PNG files: the tests'
    ``make_image_folder`` (tests/conftest.py, which needs pytest installed)."""
    from tests.conftest import make_image_folder

    return make_image_folder(root, classes=("red", "green", "blue"), per_class=(per_class, max(2, per_class // 3), 0),
                             size=(size, size))


@dataclass
class Timed:
    seconds: float
    budget: str  # the first "cpu budget:" line the command printed
    log: Path


def start(args: list[str], log: Path) -> tuple[subprocess.Popen, float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the budget decides, as for a user
    env["PYTHONPATH"] = str(REPO)
    with log.open("w") as handle:  # the child keeps its own copy
        proc = subprocess.Popen([sys.executable, "-m", "zoo", *args], stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return proc, time.perf_counter()


def finish(proc: subprocess.Popen, seconds: float, log: Path) -> Timed:
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"bench_contention: `{' '.join(proc.args[2:])}` exited with {proc.returncode}; see {log}:\n{text[-2000:]}")
    budget = next((line.strip() for line in text.splitlines() if line.strip().startswith("cpu budget:")), "-")
    return Timed(seconds, budget, log)


def run_together(commands: list[list[str]], logs: list[Path]) -> list[Timed]:
    """Start the commands at the same moment; each one's wall time ends when it exits (polled every 50 ms)."""
    started = [start(c, log) for c, log in zip(commands, logs)]
    ended: dict[int, float] = {}
    while len(ended) < len(started):
        for i, (proc, _) in enumerate(started):
            if i not in ended and proc.poll() is not None:
                ended[i] = time.perf_counter()
        time.sleep(0.05)
    return [finish(proc, ended[i] - t0, log) for i, ((proc, t0), log) in enumerate(zip(started, logs))]


class BusyProcess:
    """One other CPU-bound process (a Python busy loop) while the block runs."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
        time.sleep(1.0)  # running before zoo measures the machine
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def scenarios(args, work: Path, data: Path, threads: list[str], workers: list[str], label: str) -> list[dict]:
    """The rows of one setting of --threads: demo alone and loaded, finetune alone and two together."""
    tag = "".join(c if c.isalnum() else "-" for c in label)
    rows = []

    def demo(name: str) -> list[str]:
        return ["demo", "--out", str(work / f"demo-{tag}-{name}"), "--epochs", str(args.demo_epochs), *threads]

    def finetune(name: str) -> list[str]:
        return ["finetune", args.finetune_model, "--no-pretrained", "--data", str(data), "--out", str(work / f"ft-{tag}-{name}"),
                "--epochs", str(args.finetune_epochs), "--input-size", str(args.input_size), "--batch-size", "16",
                "--patience", "0", *threads, *workers]

    alone = run_together([demo("alone")], [work / f"demo-{tag}-alone.log"])[0]
    with BusyProcess():
        loaded = run_together([demo("loaded")], [work / f"demo-{tag}-loaded.log"])[0]
    rows.append(row(label, "zoo demo", "alone", alone, alone, None))
    rows.append(row(label, "zoo demo", "+1 busy process", loaded, alone, 1.3))

    ft_alone = run_together([finetune("alone")], [work / f"ft-{tag}-alone.log"])[0]
    pair = run_together([finetune("pair-a"), finetune("pair-b")], [work / f"ft-{tag}-pair-a.log", work / f"ft-{tag}-pair-b.log"])
    rows.append(row(label, "zoo finetune", "alone", ft_alone, ft_alone, None))
    for which, timed in zip("ab", pair):
        rows.append(row(label, "zoo finetune", f"two together ({which})", timed, ft_alone, 2.2))
    return rows


def decode_split(args, work: Path, cores: int) -> list[dict]:
    """The demo's ResNet member alone: decoding in the main process, against in one loader worker."""
    from zoo.pipeline.demo import DEMO_OPTIONS, build_digits_dataset

    digits = work / "digits"
    if not digits.exists():
        build_digits_dataset(digits)
    flags = []
    for name, value in {**DEMO_OPTIONS, "epochs": args.demo_epochs}.items():
        if name in ("workers", "pretrained"):
            continue
        flags += [f"--{name.replace('_', '-')}", str(value)]
    splits = [(cores, 0), (cores - 1, 1)] if cores > 1 else [(1, 0), (1, 1)]
    timed = []
    for threads, workers in splits:
        tag = f"digits-{threads}t-{workers}w"
        timed.append(run_together([["finetune", "test_resnet", "--no-pretrained", "--data", str(digits), "--out", str(work / tag),
                                    "--threads", str(threads), "--workers", str(workers), *flags]], [work / f"{tag}.log"])[0])
    return [row(f"{t} thread{'s' * (t != 1)} + {w} worker{'s' * (w != 1)}", "demo's resnet", "alone", x, timed[0], None)
            for (t, w), x in zip(splits, timed)]


def row(setting: str, command: str, scenario: str, timed: Timed, alone: Timed, target: float | None) -> dict:
    ratio = timed.seconds / alone.seconds
    return {"threads": setting, "command": command, "scenario": scenario, "seconds": round(timed.seconds, 1),
            "ratio": round(ratio, 2), "target": target, "meets": None if target is None else ratio <= target,
            "budget": timed.budget, "log": str(timed.log)}


def format_table(rows: list[dict]) -> str:
    head = ("threads", "command", "scenario", "seconds", "x alone", "target", "cpu budget (first line printed)")
    body = [(r["threads"], r["command"], r["scenario"], f"{r['seconds']:.1f}", f"{r['ratio']:.2f}",
             "-" if r["target"] is None else f"<= {r['target']} {'ok' if r['meets'] else 'MISSED'}",
             r["budget"].removeprefix("cpu budget: ")) for r in rows]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    numeric = {3, 4}

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def main(argv=None) -> int:
    args = parse_args(argv)
    cores = len(usable_cores())
    load = measure_load(interval=1.0)
    idle = "idle" if load.busy < 0.5 else f"NOT idle: {load.busy:.1f} of {load.cores} cores busy; the ratios mean little"
    print(f"bench_contention: {cores} cores, machine {idle}; demo --epochs {args.demo_epochs}; finetune "
          f"{args.finetune_model} --input-size {args.input_size}, {args.images}x3 train images, --epochs {args.finetune_epochs}",
          flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_contention-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = make_images(work / "images", args.images)
        before = (f"as before (--threads {cores})", ["--threads", str(cores)], ["--workers", str(min(8, cores))])
        settings = [("budget", [], [])] + ([before] if args.threads_as_before else [])
        rows = []
        for label, threads, workers in settings:
            rows += scenarios(args, work, data, threads, workers, label)
            print(f"  ({label}: done after {time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        rows += decode_split(args, work, cores)
        print(format_table(rows), flush=True)
    print(f"({time.perf_counter() - started:.0f} s. x alone: the scenario's wall time over the same command alone, "
          "measured in this run; 'two together' are two identical finetunes started at the same moment)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "load_before": load.busy, "rows": rows}, indent=2) + "\n")
    missed = [r for r in rows if r["threads"] == "budget" and r["meets"] is False]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
