#!/usr/bin/env python
"""Data pipeline throughput: decode + augment images per second, against the training step.

For each dataset and each loader worker count it times full passes of ``zoo finetune``'s
train loader (its train transform: random resized crop, flip, RandAugment, normalise, at
the model's input size) over

* decode: every image decoded each epoch (the loader without ``--cache``),
* ram: ``--cache ram``, pixels decoded and resized once, kept in this process,
* dir: ``--cache DIR``, the same pixels memory-mapped from a file;

and, in the same process, the training step it has to feed: forward + backward + AdamW
of ``--model`` (random init) at batch ``--batch-size`` on the CPU. The table gives each
source's images per second, its ratio to decoding at the same worker count, and its ratio
to the training step (>= 3: the loader keeps up with room to spare). The one-off cost of
filling the cache is printed beside it.

Datasets: the JPEGs of ants and bees (``/work/shared/datasets/hymenoptera`` or
``--hymenoptera DIR``; about 500x375, skipped with a message when absent) and generated
128-px thumbnails (``--thumbnails N``, flowers-like: smooth colour fields, JPEG).

    python bench/bench_data.py                       # both datasets, workers 0 1 2
    python bench/bench_data.py --workers 0 --passes 1 --thumbnails 64   # quick
    python bench/bench_data.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

from finetune import loaders  # noqa: E402
from finetune.config import FinetuneConfig  # noqa: E402
from zoo import cache as image_cache  # noqa: E402
from zoo.backbones import data_config  # noqa: E402
from zoo.cpu import cpu_budget  # noqa: E402
from zoo.data import read_listing  # noqa: E402

HYMENOPTERA = Path("/work/shared/datasets/hymenoptera")
SOURCES = ("decode", "ram", "dir")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hymenoptera", type=Path, default=HYMENOPTERA, help=f"ants and bees image folder (default: {HYMENOPTERA})")
    p.add_argument("--thumbnails", type=int, default=256, help="generated 128-px images (0: none)")
    p.add_argument("--model", default="tf_efficientnet_lite0", help="timm model of the training step and of the data config")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to time")
    p.add_argument("--passes", type=int, default=2, help="timed passes over the dataset per source and worker count (median)")
    p.add_argument("--train-steps", type=int, default=4, help="timed training steps (after 1 untimed)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the training step (default: the free cores, zoo.cpu.cpu_budget)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    for name, value, least in (("--batch-size", args.batch_size, 1), ("--passes", args.passes, 1),
                               ("--train-steps", args.train_steps, 1), ("--thumbnails", args.thumbnails, 0)):
        if value < least:
            p.error(f"{name} must be at least {least}, got {value}")
    if any(w < 0 for w in args.workers):
        p.error(f"--workers must be 0 or more, got {args.workers}")
    return args


def make_thumbnails(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` 128-px JPEGs in two classes: smooth colour fields with a blob, like downsized flower photos."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / "train" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (128, int(rng.integers(96, 171))) if i % 3 else (int(rng.integers(128, 171)), 128)
        small = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        image.save(folder / f"{i:04d}.jpg", quality=90)
    return root


def time_loader(samples, train_tf, images, batch_size: int, workers: int, passes: int) -> list[float]:
    """Images per second of each full pass of the train loader."""
    rates = []
    for p in range(passes):
        loader = loaders.train_loader(samples, train_tf, batch_size=batch_size, workers=workers,
                                      generator=torch.Generator().manual_seed(p), num_classes=2, balanced=False,
                                      drop_last=False, pin_memory=False, images=images)
        start, n = time.perf_counter(), 0
        for batch in loader:
            n += batch[0].shape[0]
        rates.append(n / (time.perf_counter() - start))
    return rates


def time_train_step(model_name: str, input_size: int, batch_size: int, steps: int) -> float:
    """Images per second of forward + backward + AdamW step, random init, on the CPU."""
    model = timm.create_model(model_name, pretrained=False, num_classes=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, input_size, input_size)
    y = torch.randint(0, 2, (batch_size,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()  # untimed: allocations, kernel choice
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - start)


def bench_dataset(name: str, root: Path, dcfg: dict, args, train_rate: float, cache_dir: Path, log) -> list[dict]:
    samples = read_listing(root).split("train")
    cfg = FinetuneConfig(backbone=args.model)  # the default recipe: augmentation and crop scale as `zoo finetune` runs
    train_tf = loaders.train_transform(dcfg, auto_augment=cfg.auto_augment, crop_scale=cfg.crop_scale, hflip=cfg.hflip)
    sizes = [s.path.stat().st_size for s in samples[:50]]
    log(f"{name}: {len(samples)} train images from {root} (mean {statistics.mean(sizes) / 1024:.0f} KiB)")
    readers, fill_notes = {}, {}
    for source in SOURCES:
        sources = loaders.image_sources(None if source == "decode" else "ram" if source == "ram" else str(cache_dir), root,
                                        dcfg, cfg.crop_scale, workers=1)
        start = time.perf_counter()
        readers[source] = sources.train(samples)
        if source != "decode":
            store = sources.store
            fill_notes[source] = (time.perf_counter() - start, store.nbytes())
            log(f"  fill --cache {source}: {time.perf_counter() - start:.1f}s for {len(samples)} images (train cap "
                f"{sources.train_cap.size}px, eval cap {sources.eval_cap.size}px), {store.nbytes() / 2**20:.1f} MiB")
    rows = []
    for workers in args.workers:
        rates = {s: statistics.median(time_loader(samples, train_tf, readers[s], args.batch_size, workers, args.passes))
                 for s in SOURCES}
        for s in SOURCES:
            rows.append({"dataset": name, "images": len(samples), "source": s, "workers": workers, "img_s": rates[s],
                         "vs_decode": rates[s] / rates["decode"], "vs_train_step": rates[s] / train_rate,
                         "fill_s": fill_notes.get(s, (None, None))[0], "cache_bytes": fill_notes.get(s, (None, None))[1]})
        log(f"  workers {workers}: " + ", ".join(f"{s} {rates[s]:.0f} img/s" for s in SOURCES))
    return rows


def format_table(rows: list[dict], train_rate: float, model: str, batch: int) -> str:
    head = ("dataset", "images", "source", "workers", "img/s", "x decode", "x train step")
    body = [(r["dataset"], str(r["images"]), r["source"], str(r["workers"]), f"{r['img_s']:.0f}", f"{r['vs_decode']:.2f}",
             f"{r['vs_train_step']:.2f}") for r in rows]
    body.append((f"train step: {model}", f"b{batch}", "fwd+bwd", "-", f"{train_rate:.1f}", "-", "1.00"))
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]

    def line(cells):
        return "  ".join(c.ljust(w) if i in (0, 2) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def main(argv=None) -> int:
    args = parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    budget = cpu_budget(args.threads, 0, "cpu")
    model = timm.create_model(args.model, pretrained=False, num_classes=2)
    dcfg = data_config(model, {})
    del model
    input_size = dcfg["input_size"][-1]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    log(f"bench_data: torch {torch.__version__}, timm {timm.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load:.2f} before start; {budget.describe()}")

    # The training step first, with the budget's threads; the loaders then run on one torch thread per process.
    torch.set_num_threads(budget.threads)
    train_rate = time_train_step(args.model, input_size, args.batch_size, args.train_steps)
    log(f"train step: {args.model} at {input_size}px, batch {args.batch_size}, {budget.threads} thread(s): {train_rate:.1f} img/s")
    torch.set_num_threads(1)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data.") as tmp:
        tmp = Path(tmp)
        if (args.hymenoptera / "train").is_dir():
            rows += bench_dataset("hymenoptera", args.hymenoptera, dcfg, args, train_rate, tmp / "cache", log)
        else:
            log(f"hymenoptera: {args.hymenoptera}/train not found; skipped (pass --hymenoptera DIR)")
        if args.thumbnails:
            root = make_thumbnails(tmp / "thumbnails", args.thumbnails)
            rows += bench_dataset("thumbnails-128", root, dcfg, args, train_rate, tmp / "cache", log)
        image_cache._RAM_STORES.clear()
    print(format_table(rows, train_rate, args.model, args.batch_size), flush=True)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    log(f"(img/s: median of {args.passes} full passes of the train loader, batch {args.batch_size}, {input_size}px, "
        f"{FinetuneConfig().auto_augment}; x decode: against decoding every epoch at the same worker count; x train step: "
        f"against the training step above, measured in this run. Load average {load:.2f} before, {load_after:.2f} after.)")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "cpu_count": os.cpu_count(), "load_before": load,
                                               "load_after": load_after, "train_step_img_s": train_rate,
                                               "model": args.model, "input_size": input_size, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
