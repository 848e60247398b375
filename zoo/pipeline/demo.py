"""``zoo demo``: ``zoo run`` on built-in data, in a few minutes on a CPU.

It renders scikit-learn's handwritten digits (1,797 8x8 scans, 10 classes) as RGB
images in an image folder with train/val/test splits, then runs ``zoo run`` on it
(``zoo.pipeline.run.run_zoo``) with three architecturally different small timm backbones
(a ResNet, an EfficientNet, a ViT): the same fine-tuning, correlation, ensemble fit,
holdout scores (``val/``, untouched: validation comes from ``train/``), ``test/``
predictions, latency leaderboard, Pareto front and ``report.html``. The backbones
start from random weights (no download needed), so nothing is frozen and every stage
trains at the head's rate. Re-running it into the same folder continues it.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from zoo.errors import UserInputError
from zoo.pipeline.layout import ZooRunDir

# (member name, timm backbone, options that differ from DEMO_OPTIONS)
DEMO_MEMBERS: tuple[tuple[str, str, dict], ...] = (
    ("resnet", "test_resnet", {}),
    ("efficientnet", "test_efficientnet", {}),
    ("vit", "test_vit", {"lr": 3e-3}),
)
# From random weights on 32x32 digits: no frozen stages, no layer decay, no flips.
DEMO_OPTIONS = dict(pretrained=False, freeze=0, layer_decay=1.0, lr=2e-3, epochs=8, batch_size=32, input_size=32,
                    auto_augment="none", hflip=0.0, crop_scale=0.7, warmup_epochs=0.5, patience=0, workers=0)


def build_digits_dataset(root: Path, size: int = 32, seed: int = 0, limit: int | None = None) -> dict[str, int]:
    """Write the digits as ``root/{train,val,test}/<digit>/<index>.png`` (56/19/25%, stratified); ``limit``: a
    stratified sample of that many of the 1,797 images (quick examples)."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    if limit is not None and limit < len(index):
        index, _ = train_test_split(index, train_size=limit, stratify=digits.target, random_state=seed)
    train, test = train_test_split(index, test_size=0.25, stratify=digits.target[index], random_state=seed)
    train, val = train_test_split(train, test_size=0.25, stratify=digits.target[train], random_state=seed)
    counts = {}
    for split, rows in (("train", train), ("val", val), ("test", test)):
        for i in rows:
            pixels = (digits.images[i] / 16.0 * 255).astype(np.uint8)
            image = Image.fromarray(pixels).resize((size, size), Image.BILINEAR).convert("RGB")
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:04d}.png")
        counts[split] = len(rows)
    return counts


@dataclass
class DemoResult:
    out: Path
    summary: str
    report: Path
    seconds: float


def _digits(data: Path, log) -> None:
    """The digits image folder in ``data``, built once (in a temporary folder, then renamed)."""
    if (data / "train").is_dir():
        log(f"[0/6] digits dataset: reusing {data}")
        return
    partial = data.with_name(data.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    counts = build_digits_dataset(partial)
    os.replace(partial, data)
    log(f"[0/6] digits dataset: {counts['train']} train, {counts['val']} val, {counts['test']} test images in {data}")


def run_demo(out: str | os.PathLike, *, epochs: int | None = None, threads: int | None = None,
             log: Callable[[str], None] = print, latency_repeats: int = 5) -> DemoResult:
    """``zoo run`` on the digits into ``out`` (new, or an earlier demo to continue); returns its summary.

    ``threads``: torch CPU threads (default: each step measures the free cores, ``zoo.cpu``)."""
    from zoo.pipeline.run import run_zoo
    from zoo.pipeline.zoo_file import MemberSpec

    start = time.perf_counter()
    out = Path(out)
    data = ZooRunDir(out).demo_data
    if out.exists() and any(out.iterdir()) and not (data / "train").is_dir() and not data.with_name("data.partial").exists():
        raise UserInputError(f"{out}: already exists and is not empty (and holds no zoo demo to continue); "
                             "choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    _digits(data, log)
    members = [MemberSpec(name, backbone, options=dict(overrides)) for name, backbone, overrides in DEMO_MEMBERS]
    given = {k: v for k, v in (("epochs", epochs), ("threads", threads)) if v is not None}
    result = run_zoo(data, out, members, shared=dict(DEMO_OPTIONS), given=given, cv=5, latency_repeats=latency_repeats,
                     title="zoo demo: three small backbones on scikit-learn's digits", log=log)
    if result.status != "finished":
        raise UserInputError(f"{out}: the demo stopped before its end; run it again to continue")
    return DemoResult(out, result.summary, result.report, time.perf_counter() - start)
