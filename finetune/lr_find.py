"""The learning-rate range test (Smith 2017; fastai's ``lr_find``).

The head's rate sweeps exponentially from ``start_lr`` to ``end_lr`` over ``steps``
updates, every other group keeping its ``lr_scale`` (frozen stages and layer decay as
in the real run). The loss is smoothed (debiased exponential average), the sweep stops
when it diverges, and the suggestion is fastai's "valley": the middle of the longest
descending stretch of the curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune import loaders
from finetune.config import FinetuneConfig
from finetune.engine import Trainer, resolve_hardware, seed_everything, stderr_log
from finetune.freeze import set_train_mode
from finetune.optim import prepare_training
from zoo import atomic
from zoo.backbones import check_input_size, create_backbone, data_config
from zoo.cpu import apply_budget, cpu_budget
from zoo.data import check_images, read_dataset
from zoo.errors import UserInputError
from zoo.rundir import check_out_file
from zoo.progress import progress as progress_bar


@dataclass
class LrFindResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    valley: float
    steepest: float
    minimum_over_10: float

    @property
    def suggestion(self) -> float:
        return self.valley


def valley(lrs, losses) -> int:
    """Index of fastai's valley suggestion: inside the longest decreasing stretch, half-way through its middle third."""
    n = len(losses)
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end, max_start = i, i - lds[i]
    sections = (max_end - max_start) / 3
    return min(n - 1, max_start + int(sections) + int(sections / 2))


def analyse(lrs: list[float], losses: list[float], beta: float = 0.98) -> LrFindResult:
    smoothed, avg = [], 0.0
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        smoothed.append(avg / (1 - beta ** i))
    s = np.array(smoothed)
    grads = np.gradient(s, np.log10(np.array(lrs))) if len(s) > 2 else np.zeros_like(s)
    return LrFindResult(list(lrs), list(losses), smoothed, valley=lrs[valley(lrs, smoothed)],
                        steepest=lrs[int(np.argmin(grads))], minimum_over_10=lrs[int(np.argmin(s))] / 10)


def lr_find(cfg: FinetuneConfig, *, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
            plot: str | Path | None = None, log=stderr_log, progress: bool | None = None) -> LrFindResult:
    """Sweep the head's rate from ``start_lr`` to ``end_lr`` over ``steps`` updates and suggest one.
    ``progress``: False hides the progress of the image check and of the sweep (``zoo.progress``)."""
    if not 0 < start_lr < end_lr:
        raise UserInputError(f"--start-lr must be positive and below --end-lr, got {start_lr} and {end_lr}")
    cfg.validate()
    if plot is not None:
        check_out_file(plot)
    hardware = resolve_hardware(cfg.device, cfg.amp, cfg.channels_last)
    budget = cpu_budget(cfg.threads, cfg.workers, hardware.device.type)
    apply_budget(budget)
    log(budget.describe())
    dataset = read_dataset(cfg.data, val_fraction=cfg.val_fraction, val_from_train=cfg.val_from_train, seed=cfg.seed,
                           allow_outside_root=cfg.allow_outside_root)
    samples = dataset.split("train")
    with progress_bar(len(samples), "checking train images", unit="images", enabled=progress) as bar:
        train, bad = check_images(samples, workers=budget.share, progress=lambda done, _: bar.set(done))
    if bad:
        log(f"warning: skipped {len(bad)} unreadable image(s), e.g. {bad[0][0]}")
    generator = seed_everything(cfg.seed)
    model = create_backbone(cfg.backbone, len(dataset.classes), pretrained=cfg.pretrained, weights=cfg.weights,
                            **cfg.create_kwargs())
    setup = prepare_training(model, cfg, hardware, cfg.lr)
    for warning in setup.warnings:
        log(f"warning: {warning}")
    optimizer = setup.optimizer
    dcfg = data_config(model, cfg.data_overrides())
    check_input_size(model, cfg.backbone, dcfg)
    transform = loaders.train_transform(dcfg, auto_augment=cfg.auto_augment, crop_scale=cfg.crop_scale, hflip=cfg.hflip)
    loader = loaders.train_loader(train, transform, batch_size=cfg.batch_size, workers=budget.workers,
                                  generator=generator, num_classes=len(dataset.classes), balanced=False, drop_last=True,
                                  pin_memory=hardware.device.type == "cuda")
    # The training step of `zoo finetune` (grad scaler under fp16, clipping, the same loss); the sweep sets the rates.
    trainer = Trainer(model, optimizer, None, hardware, len(dataset.classes), label_smoothing=cfg.label_smoothing,
                      clip_grad=cfg.clip_grad)
    log(f"lr-find: {cfg.optimizer}, weight decay {cfg.weight_decay:g}, label smoothing {cfg.label_smoothing:g}, batch "
        f"{cfg.batch_size}, first {setup.frozen} stage group(s) frozen, layer decay {cfg.layer_decay:g}; {hardware.describe()}")
    set_train_mode(model, setup.frozen_norms)
    lrs, losses, best, avg = [], [], math.inf, 0.0
    ratio = (end_lr / start_lr) ** (1 / max(steps - 1, 1))
    step = 0
    sweep = progress_bar(steps, "lr-find", unit="steps", enabled=progress)
    while step < steps:
        for images, labels, _ in loader:
            lr = start_lr * ratio ** step
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            value = trainer.train_step(images, labels)
            lrs.append(lr)
            losses.append(value)
            step += 1
            avg = 0.98 * avg + 0.02 * value
            smooth = avg / (1 - 0.98 ** step)
            best = min(best, smooth)
            sweep.update(1, f"lr {lr:.2g}, loss {smooth:.4f}")
            if step >= steps or not math.isfinite(value) or (step > 10 and smooth > 4 * best):
                step = steps
                break
    sweep.close()
    if len(lrs) < 5:
        raise UserInputError(f"lr-find: only {len(lrs)} steps before the loss diverged; lower --start-lr")
    result = analyse(lrs, losses)
    if plot is not None:
        _plot(Path(plot), result, cfg.backbone)
    return result


def _plot(path: Path, result: LrFindResult, title: str) -> None:
    # A Figure without pyplot draws with Agg on its own: no global backend is switched under the caller.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, alpha=0.3, label="loss")
    ax.plot(result.lrs, result.smoothed, label="smoothed")
    for name, value, style in (("valley", result.valley, "r"), ("steepest", result.steepest, "g"), ("min/10", result.minimum_over_10, "b")):
        ax.axvline(value, color=style, linestyle="--", label=f"{name} {value:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("head learning rate")
    ax.set_ylabel("training loss")
    top = np.nanpercentile(result.smoothed, 95) if result.smoothed else 1
    ax.set_ylim(min(result.smoothed) * 0.9, max(top, result.smoothed[0]) * 1.1)
    ax.set_title(f"lr-find: {title}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
