#!/usr/bin/env python
"""zoo run's training stage, sequential vs ``--launcher local --jobs N``: wall time and their ratio, in one run.

For 2 and then 4 cross-fitted members (``--folds 2``: 4 and 8 jobs), ``zoo run`` trains the same zoo on the
same generated images twice, into fresh folders: once with the sequential launcher (every fold in this
process, one after another) and once with ``--launcher local --jobs N`` (each fold its own process, N at a
time). Every job uses one torch thread and no loader worker in both, so the files are the same and only the
scheduling differs. The training stage is timed from zoo run's own ``[1/6]`` line to its ``[2/6]`` line.

Each job must take at least a minute for the ratio to mean anything: a job's process pays ~6 s of imports
(torch, timm) before its first step, which the sequential run pays once. The table prints ``uptime`` before
and after each pair, since other work on the machine (another engineer's benchmark, say) takes cores from
both sides alike only when it runs throughout.

    python bench/bench_launch.py                          # CPU: about 15 minutes on 2 idle cores
    python bench/bench_launch.py --members 2 --epochs 2   # a smoke test
    python bench/bench_launch.py --gpu                    # one job per GPU (--gpus-per-job 1, --jobs = GPUs)

``--gpu`` runs the same comparison with ``--device cuda``: ``--jobs`` the number of visible GPUs, one GPU each
(``CUDA_VISIBLE_DEVICES`` per job), the CPU split between the jobs by zoo's budget. It needs at least 2 GPUs.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import make_image_folder  # noqa: E402
from zoo.cpu import usable_cores  # noqa: E402
from zoo.pipeline.launch import LaunchOptions, visible_gpus  # noqa: E402
from zoo.pipeline.run import run_zoo  # noqa: E402
from zoo.pipeline.zoo_file import MemberSpec  # noqa: E402

BACKBONES = ["resnet18", "efficientnet_b0", "mobilenetv3_large_100", "resnet10t"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, nargs="+", default=[2, 4], help="zoo sizes to time (at most 4)")
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2, help="--launcher local --jobs (CPU)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per fold (the default makes each job take about a minute "
                   "on one idle core of this project's machine)")
    p.add_argument("--images", type=int, default=48, help="generated train images per class (3 classes)")
    p.add_argument("--input-size", type=int, default=96)
    p.add_argument("--gpu", action="store_true", help="the GPU variant: --device cuda, one GPU per job")
    p.add_argument("--keep", metavar="DIR", default=None, help="write the runs here (default: a temporary folder)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the table's rows as JSON")
    args = p.parse_args(argv)
    if any(m < 2 or m > len(BACKBONES) for m in args.members):
        p.error(f"--members: each between 2 and {len(BACKBONES)}")
    return args


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def training_seconds(data: Path, out: Path, members: list[MemberSpec], options: dict, folds: int,
                     launch: LaunchOptions) -> tuple[float, list[str]]:
    """Wall time of zoo run's training stage ([1/6] to [2/6]) and what the run printed."""
    marks: dict[str, float] = {}
    lines: list[str] = []

    def log(message: str) -> None:
        lines.append(message)
        for stage in ("[1/6]", "[2/6]"):
            if message.startswith(stage):
                marks[stage] = time.perf_counter()

    run_zoo(data, out, members, given=options, folds=folds, cv=2, latency_repeats=1, log=log, launch=launch)
    return marks["[2/6]"] - marks["[1/6]"], lines


def main(argv=None) -> int:
    args = parse_args(argv)
    gpus = visible_gpus(None) if args.gpu else []
    if args.gpu and len(gpus) < 2:
        print(f"--gpu needs at least 2 GPUs to run jobs side by side; this machine shows {len(gpus)}: not run here")
        return 1
    jobs = len(gpus) if args.gpu else args.jobs
    options = dict(pretrained=False, epochs=args.epochs, batch_size=16, input_size=args.input_size, patience=0,
                   auto_augment="none", workers=0 if not args.gpu else None, threads=1 if not args.gpu else None,
                   device="cuda" if args.gpu else "cpu")
    options = {k: v for k, v in options.items() if v is not None}
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench_launch_"))
    data = make_image_folder(root / "data", per_class=(args.images, max(2, args.images // 4), 0), size=(128, 160))
    print(f"zoo run's training stage: sequential vs --launcher local --jobs {jobs}"
          + (f" --gpus-per-job 1 (GPUs {', '.join(gpus)})" if args.gpu else " (one torch thread, no loader worker per job)")
          + f"; --folds {args.folds}, {args.epochs} epochs, {3 * args.images} train images of {args.input_size} px", flush=True)
    rows = []
    for count in args.members:
        members = [MemberSpec(f"m{i}-{b}", b) for i, b in enumerate(BACKBONES[:count])]
        load_before = uptime()
        seq, _ = training_seconds(data, root / f"seq-{count}", members, options, args.folds, LaunchOptions())
        par, lines = training_seconds(data, root / f"par-{count}", members, options, args.folds,
                                      LaunchOptions("local", jobs=jobs, gpus_per_job=1 if args.gpu else None))
        job_seconds = sorted(int(s) for line in lines for s in re.findall(r"finished in (\d+) s", line))
        rows.append({"members": count, "jobs": count * args.folds, "sequential_s": round(seq, 1), "parallel_s": round(par, 1),
                     "ratio": round(seq / par, 2), "job_s_min": job_seconds[0] if job_seconds else None,
                     "job_s_max": job_seconds[-1] if job_seconds else None, "load_before": load_before, "load_after": uptime()})
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"| members | jobs | sequential (s) | --jobs {jobs} (s) | speed-up | one job (s) | uptime before / after |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['members']} | {r['jobs']} | {r['sequential_s']} | {r['parallel_s']} | {r['ratio']}x | "
              f"{r['job_s_min']}-{r['job_s_max']} | {r['load_before'].split('load average:')[-1].strip()} / "
              f"{r['load_after'].split('load average:')[-1].strip()} |")
    print(f"uptime load averages (1, 5, 15 min) before / after each pair; {len(usable_cores())} usable cores. Other work on "
          "the machine (on this project's shared 2-core machine, another engineer's 1-thread benchmark) takes cores from "
          "both sides: with one core taken, two jobs share the other and the speed-up tends to 1x.")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
