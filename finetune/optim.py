"""Differential learning rates, the optimizer and the schedule.

Each stage group trains at ``lr * layer_decay ** depth * backbone_lr_mult`` where depth
counts groups down from the head (head: ``lr``). The factor is stored as each param
group's ``lr_scale`` and its ``lr`` is set to that rate at once; the schedule is always
one of timm's schedulers, which multiply their value by ``lr_scale`` at every update
(with a torch scheduler or none, ``lr_scale`` would be silently ignored).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler.scheduler import Scheduler

from finetune.freeze import freeze_stages, frozen_group_count
from finetune.schedules import SCHEDULE_REGISTRY
from zoo.backbones import StageGroup, stage_groups


@dataclass(frozen=True)
class GroupRate:
    group: StageGroup
    lr_scale: float


def group_lr_scales(groups: list[StageGroup], layer_decay: float, backbone_lr_mult: float) -> list[GroupRate]:
    last = len(groups) - 1
    return [GroupRate(g, 1.0 if g.is_head else (layer_decay ** (last - g.index)) * backbone_lr_mult) for g in groups]


def _no_weight_decay(model: torch.nn.Module) -> set[str]:
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    return skip


def param_groups(model: torch.nn.Module, rates: list[GroupRate], lr: float, weight_decay: float) -> list[dict]:
    """Two optimizer param groups per stage group (with and without weight decay).

    Norm weights, biases and 1-D parameters (and the model's ``no_weight_decay``
    names such as ViT's position embedding) get no weight decay.
    """
    params = dict(model.named_parameters())
    skip = _no_weight_decay(model)
    out = []
    for rate in rates:
        decay, no_decay = [], []
        for name in rate.group.param_names:
            p = params[name]
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
        for suffix, plist, wd in (("", decay, weight_decay), ("/no_decay", no_decay, 0.0)):
            if plist:
                out.append({"params": plist, "weight_decay": wd, "lr": lr * rate.lr_scale,
                            "lr_scale": rate.lr_scale, "group_name": rate.group.name + suffix,
                            "stage_index": rate.group.index})
    return out


def create_optimizer(model: torch.nn.Module, rates: list[GroupRate], name: str, lr: float,
                     weight_decay: float) -> torch.optim.Optimizer:
    groups = param_groups(model, rates, lr, weight_decay)
    kwargs = {"momentum": 0.9, "nesterov": True} if name == "sgd" else {}
    # timm's factory takes ready param groups; weight decay per group is already set.
    return create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=weight_decay, **kwargs)


def create_schedule(optimizer: torch.optim.Optimizer, name: str, *, lr: float, epochs: int,
                    updates_per_epoch: int, warmup_epochs: float, min_lr_ratio: float,
                    restarts: int) -> Scheduler:
    """The timm scheduler registered as ``name`` (``finetune.schedules``), stepped per update
    (``step_update``), warmup before the peak.

    timm's schedulers derive every group's rate from its initial ``lr`` and then
    multiply by ``lr_scale``, so each group's initial ``lr`` is first set to the base
    rate (the scheduler applies the scale itself).
    """
    if name not in SCHEDULE_REGISTRY:
        raise ValueError(f"schedule must be one of {list(SCHEDULE_REGISTRY)}, got {name!r}")
    for group in optimizer.param_groups:
        group["lr"] = lr
        group.pop("initial_lr", None)
    warmup_t = int(round(warmup_epochs * updates_per_epoch))
    after_warmup = max(1, epochs * updates_per_epoch - warmup_t)
    warmup = dict(warmup_t=warmup_t, warmup_lr_init=lr * 1e-3, warmup_prefix=True, t_in_epochs=False)
    # One update after the warmup: timm warns the decay does nothing, which is true and says nothing actionable;
    # FinetuneConfig.warnings() says it in zoo's words when the warmup is the whole run.
    with _without_timm_log("will have no effect"):
        return SCHEDULE_REGISTRY[name].factory(optimizer, warmup, lr=lr, updates=after_warmup, min_lr_ratio=min_lr_ratio,
                                               restarts=restarts)


@contextlib.contextmanager
def _without_timm_log(text: str):
    """Drop the log records of timm's schedulers that contain ``text`` while the block runs."""
    # A logger's filters see only the records logged on it, not its children's: name the modules that log it.
    loggers = [logging.getLogger(f"timm.scheduler.{module}") for module in ("cosine_lr", "poly_lr")]

    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    for logger in loggers:
        logger.addFilter(keep)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(keep)


def current_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Learning rate of each stage group (its weight-decay param group); 0 for a frozen group, which
    the scheduler still steps but which does not train."""
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        trains = any(p.requires_grad for p in group["params"])
        name = group["group_name"].removesuffix("/no_decay")
        rates[name] = max(rates.get(name, 0.0), group["lr"] if trains else 0.0)
    return rates


@dataclass
class TrainingSetup:
    """A model made ready to train: its stage groups, the frozen ones, their rates, the optimizer."""

    groups: list[StageGroup]
    frozen: int
    frozen_norms: list[torch.nn.Module]
    rates: list[GroupRate]
    optimizer: torch.optim.Optimizer
    warnings: list[str]  # for the caller to log


def prepare_training(model: torch.nn.Module, cfg, hardware, lr: float) -> TrainingSetup:
    """Move ``model`` to the device (channels-last where asked), freeze its first groups as
    ``cfg`` says for epoch 0, and build the optimizer with the per-group rates.

    The one recipe that ``finetune``, ``lr_find`` and the training benchmark share.
    """
    groups = stage_groups(model)
    model.to(hardware.device)
    if hardware.channels_last:
        model.to(memory_format=torch.channels_last)
    frozen = frozen_group_count(cfg.freeze, cfg.unfreeze_at, 0, len(groups))
    frozen_norms = freeze_stages(model, groups, frozen)
    rates = group_lr_scales(groups, cfg.layer_decay, cfg.backbone_lr_mult)
    optimizer = create_optimizer(model, rates, cfg.optimizer, lr, cfg.weight_decay)
    warnings = []
    if frozen and not cfg.pretrained:
        warnings.append(f"--freeze {cfg.freeze} with --no-pretrained: the first {frozen} stage group(s) keep their random "
                        "initial weights for the whole run; use --freeze 0 to train a randomly initialised model")
    return TrainingSetup(groups, frozen, frozen_norms, rates, optimizer, warnings)
