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
    if not run_dir.model.is_file():
        raise UserInputError(f"{run_dir.model}: missing; the run has no finished epoch yet (resume it with zoo finetune --resume --out {run})")
    # Architecture arguments only (drop path is a training-time setting).
    kwargs = {k: v for k, v in config.get("model_kwargs", {}).items() if k != "drop_path_rate"}
    model = load_run_model(config["backbone"], len(config["classes"]), run_dir.model, **kwargs)
    return model.to(device or "cpu").eval(), config


def predict_run(run: str | os.PathLike, data: str | os.PathLike, split: str = "test", tta: int = 1,
                batch_size: int = 64, device: str | None = None, workers: int | None = None,
                log: Callable[[str], None] | None = None, allow_outside_root: bool = False) -> Predictions:
    """Predict ``split`` of ``data`` (or every image, ``split='all'``) with a run's best model.

    CSV paths must stay under the CSV's folder unless ``allow_outside_root``."""
    views = tta_views(tta)
    hardware = resolve_hardware(device, None, None)
    model, config = load_run(run, hardware.device)
    if hardware.channels_last:
        model.to(memory_format=torch.channels_last)
    root, samples = read_prediction_images(data, config["classes"], split, allow_outside_root=allow_outside_root)
    good, bad = check_images(samples, workers=loaders.default_workers(workers))
    if bad and log is not None:
        log(f"warning: skipped {len(bad)} unreadable image(s), e.g. {bad[0][0]}: {bad[0][1]}")
    if not good:
        raise UserInputError(f"{data}: no readable images to predict")
    loader = loaders.eval_loader(good, loaders.eval_transform(config["data_config"]), batch_size=batch_size,
                                 workers=loaders.default_workers(workers), pin_memory=hardware.device.type == "cuda")
    logits, labels = predict_logits(model, loader, hardware, views)
    return Predictions(logits=logits, labels=labels, ids=[s.id for s in good], classes=config["classes"],
                       backbone=config["backbone"], run=str(Path(run).resolve()), split=split, tta=tta)
