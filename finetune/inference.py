"""Inference with a finished run: its best weights, its data config, optional
test-time augmentation, written as a prediction file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from finetune import loaders
from finetune.engine import predict_logits, resolve_hardware
from zoo.backbones import load_run_model
from zoo.cpu import apply_budget, cpu_budget
from zoo.data import check_images, read_prediction_images
from zoo.errors import UserInputError
from zoo.predictions import Predictions
from zoo.rundir import RunDir


def _zoom(scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def view(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        z = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        top, left = (z.shape[-2] - h) // 2, (z.shape[-1] - w) // 2
        return z[..., top:top + h, left:left + w]
    return view


def _hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


# Test-time augmentation views, in the order --tta N takes them.
TTA_VIEWS: tuple[tuple[str, Callable], ...] = (
    ("identity", lambda x: x),
    ("hflip", _hflip),
    ("zoom1.15", _zoom(1.15)),
    ("hflip+zoom1.15", lambda x: _zoom(1.15)(_hflip(x))),
    ("zoom1.3", _zoom(1.3)),
    ("hflip+zoom1.3", lambda x: _zoom(1.3)(_hflip(x))),
)


def tta_views(n: int) -> tuple[Callable, ...]:
    if not 1 <= n <= len(TTA_VIEWS):
        raise UserInputError(f"--tta must be between 1 and {len(TTA_VIEWS)} views ({', '.join(v for v, _ in TTA_VIEWS)}), got {n}")
    return tuple(view for _, view in TTA_VIEWS[:n])


def load_run(run: str | os.PathLike, device: torch.device | None = None) -> tuple[torch.nn.Module, dict]:
    """A run's best model (in eval mode) and its config."""
    run_dir = RunDir(run)
    config = run_dir.read_config()
    if run_dir.is_cross_fit():
        raise UserInputError(f"{run_dir.root}: a cross-fitted run has one model per fold ({run_dir.root}/fold-1 ...); "
                             "load one of them, or predict with `zoo predict`, which averages them")
    if not run_dir.model.is_file():
        raise UserInputError(f"{run_dir.model}: missing; the run has no finished epoch yet (resume it with zoo finetune --resume --out {run})")
    # Architecture arguments only (drop path is a training-time setting).
    kwargs = {k: v for k, v in config.get("model_kwargs", {}).items() if k != "drop_path_rate"}
    model = load_run_model(config["backbone"], len(config["classes"]), run_dir.model, **kwargs)
    return model.to(device or "cpu").eval(), config


def predict_run(run: str | os.PathLike, data: str | os.PathLike, split: str = "test", tta: int = 1,
                batch_size: int = 64, device: str | None = None, workers: int | None = None,
                log: Callable[[str], None] | None = None, allow_outside_root: bool = False,
                threads: int | None = None) -> Predictions:
    """Predict ``split`` of ``data`` (or every image, ``split='all'``) with a run's best model.

    A cross-fitted run (``zoo finetune --folds K``) predicts with each of its K fold
    models (each with its ``tta`` views first) and averages their probabilities.
    CSV paths must stay under the CSV's folder unless ``allow_outside_root``. ``threads`` and
    ``workers`` override the measured CPU budget (``zoo.cpu.cpu_budget``)."""
    views = tta_views(tta)
    hardware = resolve_hardware(device, None, None)
    budget = cpu_budget(threads, workers, hardware.device.type)
    apply_budget(budget)
    if log is not None:
        log(budget.describe())
    run_dir = RunDir(run)
    config = run_dir.read_config()
    model_runs = run_dir.fold_runs() or [run_dir]
    root, samples = read_prediction_images(data, config["classes"], split, allow_outside_root=allow_outside_root)
    good, bad = check_images(samples, workers=budget.share)
    if bad and log is not None:
        shown = "".join(f"\n  {sample_id}: {why}" for sample_id, why in bad[:20])
        log(f"warning: skipped {len(bad)} unreadable image(s) of {len(samples)}; {len(good)} predicted:{shown}"
            + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""))
    if not good:
        raise UserInputError(f"{data}: no readable images to predict")
    probabilities, logits, labels = None, None, None
    for model_run in model_runs:
        model, model_config = load_run(model_run.root, hardware.device)
        if hardware.channels_last:
            model.to(memory_format=torch.channels_last)
        loader = loaders.eval_loader(good, loaders.eval_transform(model_config["data_config"]), batch_size=batch_size,
                                     workers=budget.workers, pin_memory=hardware.device.type == "cuda")
        logits, labels = predict_logits(model, loader, hardware, views)
        if len(model_runs) > 1:
            p = torch.softmax(torch.from_numpy(logits).double(), dim=1)
            probabilities = p if probabilities is None else probabilities + p
    if len(model_runs) > 1:  # the fold models' mean probability
        logits = torch.log((probabilities / len(model_runs)).clamp_min(1e-30)).float().numpy()
    return Predictions(logits=logits, labels=labels, ids=[s.id for s in good], classes=config["classes"],
                       backbone=config["backbone"], run=str(Path(run).resolve()), split=split, tta=tta)
