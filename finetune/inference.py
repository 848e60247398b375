"""Inference with a finished run: its best weights, its data config, optional
test-time augmentation, written as a prediction file.

A cross-fit predicts with the mean probability of its K fold models. When the fold models
differ only in their linear head (a linear-probe cross-fit: one frozen backbone, K fitted
heads), checked tensor by tensor, it runs the backbone once and the K heads on its
features (``FoldHeads``): the same numbers for a K-th of the cost.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from finetune import loaders
from finetune.engine import predict_logits, resolve_hardware
from finetune.probe import PooledFeatures, linear_head
from zoo.backbones import architecture_kwargs, load_run_model
from zoo.cpu import apply_budget, cpu_budget
from zoo.data import read_prediction_images
from zoo.errors import UserInputError
from zoo.predictions import Predictions, mean_log_probability
from zoo.progress import progress
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


# `zoo predict --split run-val`: the run's own validation images, wherever they came from (val/, or split from train/).
RUN_VAL = "run-val"

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
    model = load_run_model(config["backbone"], len(config["classes"]), run_dir.model, **architecture_kwargs(config))
    return model.to(device or "cpu").eval(), config


def _image_sources(config: dict, root: Path, workers: int) -> loaders.ImageSources | None:
    """The decoded-image cache a run trained with (its ``--cache`` option), or None: decode each image from its file.

    A cross-fit's holdout predictions then decode each image once for all its fold models."""
    options = config.get("options") or {}
    if not options.get("cache") or "data_config" not in config:
        return None
    return loaders.image_sources(options["cache"], root, config["data_config"], options["crop_scale"], workers=workers)


def fold_mean_log_probability(logits: torch.Tensor) -> torch.Tensor:
    """The log of the mean probability over dim 1 of ``logits`` [B, K, C] (K fold models), clipped at 1e-30 as
    ``zoo.predictions.mean_log_probability`` combines K separate passes."""
    mean = logits.float().log_softmax(-1).logsumexp(1) - math.log(logits.shape[1])
    return mean.clamp_min(math.log(1e-30))


class FoldMean(torch.nn.Module):
    """K fold models in one module: the log of their mean probability (what ``zoo export`` writes for a cross-fit
    whose fold models do not share their backbone)."""

    def __init__(self, models: list[torch.nn.Module]):
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return fold_mean_log_probability(torch.stack([model(images) for model in self.models], 1))


class FoldHeads(torch.nn.Module):
    """One backbone and the fold models' linear heads: the log of the fold models' mean probability.

    ``model`` is a fold model (its own head unused); ``weight`` [K, C, D] and ``bias`` [K, C] are the K fold
    models' classifiers, applied to what the classifier sees (``forward_head(..., pre_logits=True)``).
    """

    def __init__(self, model: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.features = PooledFeatures(model)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def fold_logits(self, images: torch.Tensor) -> torch.Tensor:
        """[B, K, C]: the backbone once, each fold model's head on its features."""
        return torch.einsum("bd,kcd->bkc", self.features(images).float(), self.weight.float()) + self.bias.float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return fold_mean_log_probability(self.fold_logits(images))


def shared_backbone(model_runs: list[RunDir], device: torch.device | None = None) -> tuple[FoldHeads, dict] | None:
    """``FoldHeads`` for fold models that differ only in their classifier (checked on every other tensor, and on
    the backbone, classes and data config); None when they differ anywhere else, or for a single model."""
    if len(model_runs) < 2:
        return None
    from safetensors.torch import load_file

    configs = [r.read_config() for r in model_runs]
    if any(c.get(k) != configs[0].get(k) for c in configs[1:] for k in ("backbone", "classes", "data_config")) or \
            any(architecture_kwargs(c) != architecture_kwargs(configs[0]) for c in configs[1:]):
        return None
    first = load_file(str(model_runs[0].model))
    own: list[dict[str, torch.Tensor]] = [{}]  # each fold model's tensors that differ from the first one's
    for model_run in model_runs[1:]:  # each file read once
        state = load_file(str(model_run.model))
        if state.keys() != first.keys():
            return None
        own.append({k: state[k] for k in first if not torch.equal(state[k], first[k])})
        if len(set().union(*own)) > 2:  # more than one weight and one bias: fine-tuned backbones (the usual case, found fast)
            return None
    model, config = load_run(model_runs[0].root, device)
    head = linear_head(model)
    if head is None:
        return None
    prefix = next(name for name, module in model.named_modules() if module is head)
    keys = (f"{prefix}.weight", f"{prefix}.bias")
    if not set().union(*own) <= set(keys):
        return None
    weight, bias = (torch.stack([tensors.get(key, first[key]) for tensors in own]) for key in keys)
    return FoldHeads(model, weight, bias).to(device or "cpu").eval(), config


def load_pass_model(run: str | os.PathLike, device: torch.device | None = None) -> tuple[torch.nn.Module, dict, int]:
    """The model of one prediction pass of a run, in eval mode, its config, and how many passes a prediction
    takes: a run's model (1); a cross-fit's ``FoldHeads`` when its fold models share their backbone (1), else its
    first fold model (K, one per fold model). What the leaderboard times."""
    run_dir = RunDir(run)
    model_runs = run_dir.fold_runs() or [run_dir]
    shared = shared_backbone(model_runs, device)
    if shared is not None:
        return shared[0], shared[1], 1
    return *load_run(model_runs[0].root, device), len(model_runs)


def _predict(model: torch.nn.Module, model_config: dict, root: Path, samples, hardware, views, batch_size: int,
             workers: int, share: int, desc: str, show: bool | None) -> tuple[np.ndarray, np.ndarray]:
    if hardware.channels_last:
        model.to(memory_format=torch.channels_last)
    sources = _image_sources(model_config, root, share)
    loader = loaders.eval_loader(samples, loaders.eval_transform(model_config["data_config"]), batch_size=batch_size,
                                 workers=workers, pin_memory=hardware.device.type == "cuda",
                                 images=sources.eval(samples) if sources is not None else None)
    with progress(len(loader), desc, unit="batches", enabled=show) as bar:
        return predict_logits(model, loader, hardware, views, progress=bar)


def _check_images(model_runs: list[RunDir], root: Path, samples, workers: int, show: bool | None):
    """The readable samples and (id, why) of the others; through the run's cache when it has one (decoded once there)."""
    sources = _image_sources(model_runs[0].read_config(), root, workers)
    with progress(len(samples), "checking images", unit="images", enabled=show) as bar:
        return loaders.check_through(sources, samples, workers=workers, progress=lambda done, _: bar.set(done))


def _own_validation(model_runs: list[RunDir], samples, data) -> list[list]:
    """Each model run's validation images (its splits.json), found among ``samples``."""
    by_id = {s.id: s for s in samples}
    parts = []
    for model_run in model_runs:
        ids = json.loads(model_run.splits.read_text(encoding="utf-8"))["val"]
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise UserInputError(f"{data}: {len(missing)} of the {len(ids)} validation images of {model_run.root} "
                                 f"({model_run.splits.name}) are not readable in it, e.g. {missing[0]}; with --split "
                                 f"{RUN_VAL} pass the --data the run was trained on")
        parts.append([by_id[i] for i in ids])
    return parts


def predict_run(run: str | os.PathLike, data: str | os.PathLike, split: str = "test", tta: int = 1,
                batch_size: int = 64, device: str | None = None, workers: int | None = None,
                log: Callable[[str], None] | None = None, allow_outside_root: bool = False,
                threads: int | None = None, progress: bool | None = None) -> Predictions:
    """Predict ``split`` of ``data`` (or every image, ``split='all'``) with a run's best model.

    ``split='run-val'`` predicts the run's own validation images (``splits.json``; a
    cross-fit: each fold model its held-out fold, the out-of-fold rows), so that an
    ensemble's temperatures can be fitted on predictions made with the same ``tta``
    as the ones they will be applied to.

    A cross-fitted run (``zoo finetune --folds K``) predicts with each of its K fold
    models (each with its ``tta`` views first) and averages their probabilities.
    CSV paths must stay under the CSV's folder unless ``allow_outside_root``. ``threads`` and
    ``workers`` override the measured CPU budget (``zoo.cpu.cpu_budget``). ``progress``: False hides the
    progress of the image check and of each model's predictions (``zoo.progress``)."""
    views = tta_views(tta)
    hardware = resolve_hardware(device, None, None)
    budget = cpu_budget(threads, workers, hardware.device.type)
    apply_budget(budget)
    if log is not None:
        log(budget.describe())
    run_dir = RunDir(run)
    config = run_dir.read_config()
    model_runs = run_dir.fold_runs() or [run_dir]
    own_val = split == RUN_VAL
    root, samples = read_prediction_images(data, config["classes"], "all" if own_val else split,
                                           allow_outside_root=allow_outside_root)
    good, bad = _check_images(model_runs, root, samples, budget.share, progress)
    if bad and log is not None:
        shown = "".join(f"\n  {sample_id}: {why}" for sample_id, why in bad[:20])
        log(f"warning: skipped {len(bad)} unreadable image(s) of {len(samples)}; {len(good)} predicted:{shown}"
            + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""))
    if not good:
        raise UserInputError(f"{data}: no readable images to predict")
    if own_val:  # each model predicts the images it picked its epoch on: a cross-fit's fold models give out-of-fold rows
        parts = _own_validation(model_runs, good, data)
        outputs = [_predict(*load_run(r.root, hardware.device), root, part, hardware, views, batch_size, budget.workers,
                            budget.share, _desc(r.root.name, model_runs.index(r), len(model_runs)), progress)
                   for r, part in zip(model_runs, parts)]
        logits, labels = (np.concatenate([o[i] for o in outputs]) for i in (0, 1))
        good = [s for part in parts for s in part]
        split = "oof" if len(model_runs) > 1 else "val"
    else:  # every model predicts every image; a cross-fit averages its fold models' probabilities
        shared = shared_backbone(model_runs, hardware.device)
        if shared is not None:
            if log is not None:
                log(f"{run_dir.root}: its {len(model_runs)} fold models share their backbone: one pass and {len(model_runs)} heads")
            passes = [(lambda: shared, f"{len(model_runs)} fold heads")]
        else:  # one model at a time: K fold models need not fit in memory together
            passes = [(lambda r=r: load_run(r.root, hardware.device), r.root.name) for r in model_runs]
        outputs = [_predict(*load(), root, good, hardware, views, batch_size, budget.workers, budget.share,
                            _desc(name, i, len(passes)), progress) for i, (load, name) in enumerate(passes)]
        labels = outputs[0][1]
        logits = outputs[0][0] if len(outputs) == 1 else mean_log_probability([o[0] for o in outputs])
    return Predictions(logits=logits, labels=labels, ids=[s.id for s in good], classes=config["classes"],
                       backbone=config["backbone"], run=str(Path(run).resolve()), split=split, tta=tta)


def _desc(name: str, index: int, count: int) -> str:
    return f"predicting with {name}" + (f" ({index + 1}/{count})" if count > 1 else "")
