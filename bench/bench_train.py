#!/usr/bin/env python
"""Training throughput: ``zoo finetune``'s training step against a plain PyTorch loop.

For each model, in one process and on the same pre-generated batches (already on the
device), it times

* zoo: what ``finetune.train.finetune`` builds for its step, with every default of
  ``FinetuneConfig`` (``create_backbone``, ``stage_groups``, the default frozen groups,
  per-group learning rates, AdamW, the cosine schedule, label smoothing,
  ``resolve_hardware``: bf16/fp16 mixed precision and channels-last on CUDA, fp32 on
  the CPU), running ``Trainer.train_epoch``;
* plain: the textbook loop over a copy of the same model (same initial weights, the
  same parameters frozen with ``requires_grad=False``): ``torch.optim.AdamW`` over the
  trainable parameters, ``nn.CrossEntropyLoss(label_smoothing=...)``,
  ``zero_grad(set_to_none=True)``, forward, backward, step; on CUDA with zoo's autocast
  dtype and channels-last, so the ratio compares like with like;
* on CUDA also plain fp32 (no autocast, no channels-last): what you get without zoo.

``--precisions`` times one row per setting instead, each zoo against the plain loop at
that same setting (``SETTINGS``): ``fp32``; ``amp`` (bf16 autocast where the device
supports it, else fp16 with a grad scaler; bf16 autocast on the CPU); ``amp+cl`` (and
channels-last); ``amp+cl+compile`` (and ``torch.compile`` of both models, compiled during
the warmup steps). On CUDA each run's peak memory is measured too:
``torch.cuda.max_memory_allocated`` during the run, less what was allocated when it
started (both models, their optimizer state and the batches stay resident), i.e. what
the step itself needs; on the CPU that column is "-".

zoo and plain runs alternate (``--repeats``), each run timed from a device
synchronisation to the next, and the medians are compared: the ratio zoo/plain must not
be below 1 on the CPU (within noise). On a shared CPU the wall-clock ratio is noisy; the
"by cpu time" column is the same ratio from each run's process CPU seconds, which time
slices lost to other processes do not inflate, and the default thread count leaves out
the cores other processes keep busy. Each run's minor page faults go to the log and the
JSON: with glibc's default malloc a CPU training step can re-fault hundreds of MB of
activations per step, by an amount that depends on the process's allocation history;
``--keep-heap`` turns that off for both paths.

    python bench/bench_train.py                      # CPU: resnet18, tf_efficientnet_lite0, vit_tiny at 128 px
    python bench/bench_train.py --test-models        # timm's tiny test_* models, seconds
    python bench/bench_train.py --device cuda        # 224 px, bf16 mixed + channels-last
    python bench/bench_train.py --device cuda --precisions fp32 amp amp+cl amp+cl+compile
    python bench/bench_train.py --test-models --precisions fp32 amp   # CPU: fp32 and bf16 autocast rows
    python bench/bench_train.py --json results.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from finetune.config import FinetuneConfig  # noqa: E402
from finetune.engine import Hardware, Trainer, keep_cpu_heap, resolve_hardware, seed_everything  # noqa: E402
from finetune.freeze import set_train_mode  # noqa: E402
from finetune.optim import create_schedule, prepare_training  # noqa: E402
from zoo.backbones import create_backbone, needs_img_size  # noqa: E402
from zoo.cpu import cpu_budget  # noqa: E402
from zoo.errors import UserInputError  # noqa: E402

DEFAULT_MODELS = ("resnet18", "tf_efficientnet_lite0", "vit_tiny_patch16_224")
# --precisions: name -> (mixed precision, channels-last, torch.compile), for zoo and the plain loop alike.
SETTINGS = {"fp32": (False, False, False), "amp": (True, False, False), "amp+cl": (True, True, False),
            "amp+cl+compile": (True, True, True)}
TEST_MODELS = ("test_resnet", "test_efficientnet", "test_vit")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help=f"timm model names, random init (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--test-models", action="store_true", help=f"use timm's tiny {', '.join(TEST_MODELS)} (a quick run)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--input-size", type=int, default=None, help="image side (default: 224 on CUDA, 128 on the CPU)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 50 on CUDA, 8 on the CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per path before timing")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per path, zoo and plain alternating; medians are compared (default: 3 on CUDA, 4 on the CPU)")
    p.add_argument("--distinct-batches", type=int, default=4, help="distinct random batches, cycled through the steps")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own; on the CPU the free cores as `zoo finetune` measures "
                        "them, zoo.cpu.cpu_budget, as oversubscribed threads make timings meaningless)")
    p.add_argument("--plain-frozen-bn-eval", action="store_true",
                   help="also keep the plain loop's frozen BatchNorm layers in eval mode, as zoo does (then only the loop "
                        "itself differs; by default the plain loop trains them, so it computes batch statistics there)")
    p.add_argument("--default-heap", dest="keep_heap", action="store_false",
                   help="leave glibc's allocator at its defaults (by default, as `zoo finetune` on the CPU, the heap is "
                        "never trimmed nor large blocks mmapped: keep_cpu_heap; it applies to both paths, same process)")
    p.add_argument("--no-fp32-reference", action="store_true", help="on CUDA, skip the plain fp32 reference run")
    p.add_argument("--precisions", nargs="+", choices=list(SETTINGS), default=None, metavar="SETTING",
                   help=f"one row per setting ({', '.join(SETTINGS)}), zoo and plain both at it (default: what "
                        "`zoo finetune` picks on the device, plus a plain fp32 reference on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", default=None, help="write the results (and every timed run) as JSON")
    args = p.parse_args(argv)
    if args.test_models and args.models:
        p.error("--test-models and --models are exclusive")
    args.models = list(TEST_MODELS if args.test_models else args.models or DEFAULT_MODELS)
    for name, value, least in (("--batch-size", args.batch_size, 1), ("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                               ("--repeats", args.repeats, 1), ("--distinct-batches", args.distinct_batches, 1),
                               ("--num-classes", args.num_classes, 2), ("--input-size", args.input_size, 16),
                               ("--threads", args.threads, 1)):
        if value is not None and value < least:
            p.error(f"{name} must be at least {least}, got {value}")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batches(n: int, batch_size: int, input_size: int, num_classes: int, device: torch.device, seed: int):
    """``n`` distinct (images, labels, indices) batches: normalised-looking noise and random labels on
    ``device``, dataset indices on the CPU (as finetune's loaders yield them)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        images = torch.randn(batch_size, 3, input_size, input_size, generator=g)
        labels = torch.randint(0, num_classes, (batch_size,), generator=g)
        out.append((images.to(device), labels.to(device), torch.arange(i * batch_size, (i + 1) * batch_size)))
    return out


def cycle(batches, n: int):
    return [batches[i % len(batches)] for i in range(n)]


# ---------------------------------------------------------------------------- zoo's step


@dataclass
class ZooRun:
    trainer: Trainer
    model: nn.Module
    frozen_names: set[str]
    describe: str

    def epoch(self, batches) -> None:
        # (images, labels, dataset indices), as finetune's loaders yield them.
        self.trainer.train_epoch(batches)


def build_zoo(name: str, cfg: FinetuneConfig, hardware: Hardware, num_classes: int, steps_per_epoch: int,
              model_kwargs: dict) -> tuple[ZooRun, nn.Module]:
    """What ``finetune.train.finetune`` builds for its step (no data, EMA, mixup or compile: off by default).

    Also returns an untouched copy of the freshly created model (same initial weights) for the plain loop.
    """
    seed_everything(cfg.seed)
    model = create_backbone(name, num_classes, pretrained=False, **{**cfg.create_kwargs(), **model_kwargs})
    pristine = copy.deepcopy(model)
    setup = prepare_training(model, cfg, hardware, cfg.lr)
    groups, frozen, frozen_norms, optimizer = setup.groups, setup.frozen, setup.frozen_norms, setup.optimizer
    scheduler = create_schedule(optimizer, cfg.schedule, lr=cfg.lr, epochs=cfg.epochs, updates_per_epoch=steps_per_epoch,
                                warmup_epochs=cfg.warmup_epochs, min_lr_ratio=cfg.min_lr_ratio, restarts=cfg.restarts)
    train_model = torch.compile(model) if cfg.compile else model
    trainer = Trainer(train_model, optimizer, scheduler, hardware, num_classes, label_smoothing=cfg.label_smoothing,
                      class_weights=None, mixup=None, accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad, ema=None)
    set_train_mode(model, frozen_norms)
    frozen_names = {n for g in groups[:frozen] for n in g.param_names}
    describe = f"{len(groups)} groups, {frozen} frozen, {len(optimizer.param_groups)} param groups"
    return ZooRun(trainer, model, frozen_names, describe), pristine


# ---------------------------------------------------------------------------- the plain loop


@dataclass
class PlainRun:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self):
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def epoch(self, batches) -> None:
        model, opt, criterion = self.model, self.optimizer, self.criterion
        for images, labels, _ in batches:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext():
                logits = model(images)
                loss = criterion(logits, labels)
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()


def build_plain(pristine: nn.Module, frozen_names: set[str], cfg: FinetuneConfig, device: torch.device,
                amp_dtype: torch.dtype | None, channels_last: bool, frozen_bn_eval: bool = False,
                compile: bool = False) -> PlainRun:
    model = copy.deepcopy(pristine).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen_names)
    model.train()
    if frozen_bn_eval:
        for m in model.modules():
            own = list(m.parameters(recurse=False))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and own and not any(p.requires_grad for p in own):
                m.eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    return PlainRun(torch.compile(model) if compile else model, opt, criterion, device, amp_dtype, channels_last)


# ---------------------------------------------------------------------------- timing


def minor_faults() -> int:
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(run, batches, device: torch.device) -> tuple[float, float, int, float | None]:
    """Wall-clock seconds, process CPU seconds, minor page faults and (CUDA) peak MiB of one run over ``batches``.

    The peak is ``torch.cuda.max_memory_allocated`` during the run less what was allocated at its start."""
    sync(device)
    resident = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    start, start_cpu, start_faults = time.perf_counter(), time.process_time(), minor_faults()
    run.epoch(batches)
    sync(device)
    wall, cpu, faults = time.perf_counter() - start, time.process_time() - start_cpu, minor_faults() - start_faults
    peak = (torch.cuda.max_memory_allocated(device) - resident) / 2 ** 20 if resident is not None else None
    return wall, cpu, faults, peak


def precision_label(hw: Hardware, compile: bool = False) -> str:
    amp = {None: "fp32", torch.bfloat16: "bf16 mixed", torch.float16: "fp16 mixed + scaler"}[hw.amp_dtype]
    return amp + (" + CL" if hw.channels_last else "") + (" + compile" if compile else "")


def bench_model(name: str, args, hardware: Hardware, log, compile: bool = False, reference: bool = True) -> list[dict]:
    """Rows of zoo against the plain loop at ``hardware``'s precision (and ``compile``); with ``reference``, on CUDA,
    also against plain fp32."""
    cfg = FinetuneConfig(backbone=name, compile=compile)
    device, bs = hardware.device, args.batch_size
    zoo_run, pristine = build_zoo(name, cfg, hardware, args.num_classes, args.steps, ({"img_size": args.input_size} if needs_img_size(name) else {}))
    bn_eval = args.plain_frozen_bn_eval
    runs = {"zoo": zoo_run,
            "plain": build_plain(pristine, zoo_run.frozen_names, cfg, device, hardware.amp_dtype, hardware.channels_last, bn_eval,
                                 compile)}
    if reference and device.type == "cuda" and not args.no_fp32_reference and (hardware.amp_dtype is not None or hardware.channels_last):
        runs["plain fp32"] = build_plain(pristine, zoo_run.frozen_names, cfg, device, None, False, bn_eval)
    del pristine
    distinct = make_batches(args.distinct_batches, bs, args.input_size, args.num_classes, device, args.seed)
    warm, timed_batches = cycle(distinct, args.warmup), cycle(distinct, args.steps)
    log(f"{name}: {zoo_run.describe}; {hardware.describe()}{', torch.compile' if compile else ''}")

    for key, run in runs.items():
        if warm:
            timed(run, warm, device)
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    cpu_seconds: dict[str, list[float]] = {k: [] for k in runs}
    faults: dict[str, list[int]] = {k: [] for k in runs}
    peaks: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))  # alternate, so drift in load hits both
        for key in order:
            wall, cpu, flt, peak = timed(runs[key], timed_batches, device)
            seconds[key].append(wall)
            cpu_seconds[key].append(cpu)
            faults[key].append(flt)
            if peak is not None:
                peaks[key].append(peak)
        log(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{k} {bs * args.steps / seconds[k][-1]:.1f} img/s ({faults[k][-1] // args.steps} page faults/step)" for k in runs))

    ips = {k: [bs * args.steps / s for s in v] for k, v in seconds.items()}
    med = {k: statistics.median(v) for k, v in ips.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu_seconds.items()}
    base = {"model": name, "device": str(device), "batch": bs, "input": args.input_size, "steps": args.steps,
            "repeats": args.repeats, "threads": torch.get_num_threads(), "plain_frozen_bn_eval": bn_eval,
            "keep_heap": args.keep_heap}

    def row(precision: str, other: str) -> dict:
        paired = [z / p for z, p in zip(ips["zoo"], ips[other])]
        return {**base, "precision": precision, "zoo_img_s": med["zoo"], "plain_img_s": med[other],
                "ratio": med["zoo"] / med[other], "paired_ratio_min": min(paired), "paired_ratio_max": max(paired),
                # CPU seconds per run: on a shared CPU, time slices lost to other processes do not count.
                "cpu_time_ratio": med_cpu[other] / med_cpu["zoo"] if device.type == "cpu" else None,
                "zoo_runs_img_s": ips["zoo"], "plain_runs_img_s": ips[other],
                "zoo_runs_cpu_s": cpu_seconds["zoo"], "plain_runs_cpu_s": cpu_seconds[other],
                "zoo_runs_page_faults": faults["zoo"], "plain_runs_page_faults": faults[other],
                # MiB above what was resident when each run started, the largest over the runs (CUDA only).
                "zoo_peak_mib": max(peaks["zoo"]) if peaks["zoo"] else None,
                "plain_peak_mib": max(peaks[other]) if peaks[other] else None}

    rows = [row(precision_label(hardware, compile), "plain")]
    if "plain fp32" in runs:
        rows.append(row(f"zoo {precision_label(hardware, compile)} vs plain fp32", "plain fp32"))
    del runs, zoo_run, distinct, warm, timed_batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("model", "device", "precision", "batch", "input", "zoo img/s", "plain img/s", "zoo/plain", "paired min..max",
            "by cpu time", "zoo peak MiB", "plain peak MiB")

    def mib(value) -> str:
        return "-" if value is None else f"{value:.0f}"

    body = [(r["model"], r["device"], r["precision"], str(r["batch"]), str(r["input"]), f"{r['zoo_img_s']:.1f}",
             f"{r['plain_img_s']:.1f}", f"{r['ratio']:.3f}", f"{r['paired_ratio_min']:.3f}..{r['paired_ratio_max']:.3f}",
             "-" if r["cpu_time_ratio"] is None else f"{r['cpu_time_ratio']:.3f}", mib(r["zoo_peak_mib"]),
             mib(r["plain_peak_mib"]))
            for r in rows]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    numeric = set(range(3, len(head)))

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def main(argv=None) -> int:
    args = parse_args(argv)
    hardware = resolve_hardware(args.device, None, None)  # what `zoo finetune` resolves with no --amp/--channels-last
    on_gpu = hardware.device.type == "cuda"
    if args.keep_heap and hardware.device.type == "cpu" and not keep_cpu_heap():
        print("bench_train: --keep-heap needs glibc on Linux; running with the allocator's defaults", file=sys.stderr)
        args.keep_heap = False
    # No loader here (batches are pre-generated): on the CPU every core of the budget is a torch thread.
    threads = args.threads or (torch.get_num_threads() if on_gpu else cpu_budget(requested_workers=0).threads)
    torch.set_num_threads(threads)
    args.input_size = args.input_size or (224 if on_gpu else 128)
    args.steps = args.steps or (50 if on_gpu else 8)
    args.repeats = args.repeats or (3 if on_gpu else 4)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    where = torch.cuda.get_device_name(hardware.device) if on_gpu else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    log(f"bench_train: torch {torch.__version__}, timm {timm.__version__}, {where}; batch {args.batch_size}, "
        f"input {args.input_size}, {args.warmup} warmup + {args.repeats} x {args.steps} timed steps per path")
    started = time.perf_counter()
    rows = []
    for name in args.models:
        if args.precisions is None:
            rows += bench_model(name, args, hardware, log)
            continue
        for setting in args.precisions:
            amp, channels_last, compile = SETTINGS[setting]
            rows += bench_model(name, args, resolve_hardware(args.device, amp, channels_last), log, compile, reference=False)
    table = format_table(rows)
    print(table, flush=True)
    log(f"({time.perf_counter() - started:.0f}s. img/s: median over {args.repeats} alternating runs of {args.steps} steps; "
        "zoo/plain: ratio of the medians; paired min..max: ratios of runs taken back to back; by cpu time: the same "
        "ratio from the process CPU seconds of each run (CPU only), which time slices lost to other processes "
        "do not inflate); peak MiB: CUDA memory the step allocated above what was resident at the start of the run, "
        "the largest over the runs (CUDA only)")
    if args.json:
        result = {"argv": sys.argv[1:], "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
                  "device": where, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                  "hardware": hardware.describe(), "warmup": args.warmup, "results": rows}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserInputError as e:  # an unknown model, --device cuda without CUDA
        print(f"bench_train: {e}", file=sys.stderr)
        sys.exit(2)
