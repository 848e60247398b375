"""``zoo demo``: the whole pipeline on built-in data, in a few minutes on a CPU.

It renders scikit-learn's handwritten digits (1,797 8x8 scans, 10 classes) as RGB
images in an image folder with train/val/test splits, fine-tunes three architecturally
different small timm backbones (a ResNet, an EfficientNet, a ViT) through the same
``finetune`` call that ``zoo finetune`` makes, measures their correlation, fits the
ensemble on validation predictions, predicts the untouched test split and writes a
markdown report. The backbones start from random weights (no download needed), so
nothing is frozen and every stage trains at the head's rate.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from zoo import atomic
from zoo.errors import UserInputError

# (member name, timm backbone, options that differ from DEMO_OPTIONS)
DEMO_MEMBERS: tuple[tuple[str, str, dict], ...] = (
    ("resnet", "test_resnet", {}),
    ("efficientnet", "test_efficientnet", {}),
    ("vit", "test_vit", {"lr": 3e-3}),
)
# From random weights on 32x32 digits: no frozen stages, no layer decay, no flips.
DEMO_OPTIONS = dict(pretrained=False, freeze=0, layer_decay=1.0, lr=2e-3, epochs=8, batch_size=32, input_size=32,
                    auto_augment="none", hflip=0.0, crop_scale=0.7, warmup_epochs=0.5, patience=0, workers=0)


def build_digits_dataset(root: Path, size: int = 32, seed: int = 0) -> dict[str, int]:
    """Write the digits as ``root/{train,val,test}/<digit>/<index>.png`` (56/19/25%, stratified)."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train, test = train_test_split(index, test_size=0.25, stratify=digits.target, random_state=seed)
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


def _scores(log_probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from ensemble.metrics import score_table_from_log_probs

    return score_table_from_log_probs(log_probs, labels)


def run_demo(out: str | os.PathLike, *, epochs: int | None = None, threads: int | None = None,
             log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo into ``out`` (a new folder) and return its summary table.

    ``threads``: torch CPU threads (default: each step measures the free cores, ``zoo.cpu``)."""
    from ensemble.diversity import correlate, write_correlation
    from ensemble.file import write_ensemble
    from ensemble.fit import fit_ensemble
    from ensemble.predict import predict_ensemble
    from zoo.predictions import write_output
    from ensemble.report import format_correlation, format_fit_report
    from finetune.config import FinetuneConfig
    from finetune.inference import predict_run
    from finetune.train import finetune
    from zoo.predictions import load_predictions, write_predictions

    start = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserInputError(f"{out}: already exists and is not empty; choose another --out or remove it")
    data = out / "data"
    counts = build_digits_dataset(data)
    log(f"[1/5] digits dataset: {counts['train']} train, {counts['val']} val, {counts['test']} test images in {data}")

    runs = []
    for step, (name, backbone, overrides) in enumerate(DEMO_MEMBERS, start=1):
        options = {**DEMO_OPTIONS, **overrides, **({"epochs": epochs} if epochs else {}), "threads": threads}
        run = out / "runs" / name
        log(f"[2/5] fine-tuning {backbone} ({step}/{len(DEMO_MEMBERS)}), {options['epochs']} epochs -> {run}")
        finetune(FinetuneConfig(backbone=backbone, data=str(data), out=str(run), **options),
                 log=lambda m: log("      " + m) if m.startswith(("epoch", "cpu budget")) or " -> " in m else None)
        runs.append(run)

    log("[3/5] correlation of validation predictions")
    val = [load_predictions(run, "val") for run in runs]
    correlation = correlate(val, k=len(runs))
    write_correlation(correlation, out / "correlation")

    log("[4/5] fitting ensemble weights on validation predictions (slsqp, 5-fold cross-validated)")
    ensemble = fit_ensemble(val, method="slsqp", cv=5)
    write_ensemble(out / "ensemble.json", ensemble)

    log("[5/5] predicting the untouched test split")
    test = []
    for run in runs:
        preds = predict_run(run, data, split="test", threads=threads)
        write_predictions(run / "predictions" / "test.safetensors", preds)
        test.append(preds)
    combined = predict_ensemble(ensemble, predictions=test)
    write_output(out / "test_predictions.csv", combined)
    labels = test[0].labels

    rows = score_rows([name for name, _, _ in DEMO_MEMBERS], [backbone for _, backbone, _ in DEMO_MEMBERS], test, combined,
                      ensemble_note="slsqp: " + ", ".join(f"{m.name} {m.weight:.2f}" for m in ensemble.members))
    table = score_table(rows)
    matrix = format_correlation(correlation, "prob_corr")
    seconds = time.perf_counter() - start
    summary = (f"Test split ({len(labels)} images never used for training or fitting):\n{table}\n\n"
               f"Correlation of validation predictions:\n{matrix}\n\nfinished in {seconds:.0f} s; everything is in {out}")
    report = _write_report(out, table, matrix, format_fit_report(ensemble), runs, seconds)
    return DemoResult(out, summary, report, seconds)


def score_rows(names, notes, members, combined, ensemble_note: str = "") -> list[tuple[str, str, dict]]:
    """Scores on labelled rows: each member, the equal-weight average, the fitted ensemble."""
    labels = members[0].labels
    rows = [(name, note, _scores(p.log_probabilities(), labels)) for name, note, p in zip(names, notes, members)]
    equal = np.log(np.mean([p.probabilities() for p in members], axis=0))
    rows.append(("equal-weight average", "", _scores(equal, labels)))
    rows.append(("fitted ensemble", ensemble_note, _scores(combined.log_probabilities(), labels)))
    return rows


def score_table(rows) -> str:
    header = f"  {'model':<22} {'test accuracy':>13} {'test log loss':>13}  notes"
    lines = [header, "  " + "-" * (len(header) + 20)]
    for name, note, s in rows:
        lines.append(f"  {name:<22} {s['accuracy']:>13.4f} {s['log_loss']:>13.4f}  {note}")
    return "\n".join(lines)


def _write_report(out: Path, table: str, matrix: str, fit_report: str, runs: list[Path], seconds: float) -> Path:
    curves = "\n".join(f"### {run.name}\n\n![{run.name} training curves](runs/{run.name}/metrics.png)\n" for run in runs)
    text = f"""# zoo demo report

Three small timm backbones fine-tuned on scikit-learn's digits (rendered as 32x32 RGB
images), their correlation, and a weighted ensemble fitted on validation predictions,
scored on a test split nothing was fitted on. Run time: {seconds:.0f} s.

## Test scores

```
{table}
```

## Correlation of validation predictions

```
{matrix}
```

![correlation heatmap](correlation/heatmap.png)

## Ensemble fit (validation)

```
{fit_report}
```

## Training curves

{curves}
"""
    return atomic.write_text(out / "report.md", text)
