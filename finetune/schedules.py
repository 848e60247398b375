"""Learning-rate schedules by name: one registry that ``--schedule``'s choices, its help and
``finetune.optim.create_schedule`` all read.

Torch-free at import (``finetune.config`` reads the names and help texts when the CLI starts):
each factory imports its timm scheduler when it is called. A factory gets the optimizer, timm's
warmup arguments (the same for every schedule, built by ``create_schedule``) and the run's
numbers, and returns a timm scheduler stepped per update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ScheduleInfo:
    name: str
    help: str  # the --schedule help text for this choice
    factory: Callable[..., Any]  # factory(optimizer, warmup, *, lr, updates, min_lr_ratio, restarts) -> timm Scheduler


SCHEDULE_REGISTRY: dict[str, ScheduleInfo] = {}


def register_schedule(name: str, help: str):
    """Decorator: add the factory below it to ``SCHEDULE_REGISTRY`` as ``name``."""

    def register(factory):
        if name in SCHEDULE_REGISTRY:
            raise ValueError(f"schedule {name!r} is registered twice")
        SCHEDULE_REGISTRY[name] = ScheduleInfo(name, help, factory)
        return factory

    return register


@register_schedule("cosine", "warmup then cosine decay (SGDR restarts with --restarts)")
def cosine(optimizer, warmup: dict, *, lr: float, updates: int, min_lr_ratio: float, restarts: int):
    """``updates`` after warmup split into ``restarts + 1`` equal cosine cycles, each from the peak to ``lr * min_lr_ratio``."""
    from timm.scheduler import CosineLRScheduler

    cycle = max(1, updates // (restarts + 1))
    return CosineLRScheduler(optimizer, t_initial=cycle, lr_min=lr * min_lr_ratio, cycle_mul=1.0,
                             cycle_decay=1.0, cycle_limit=restarts + 1, **warmup)


@register_schedule("constant", "warmup then a constant rate")
def constant(optimizer, warmup: dict, *, lr: float, updates: int, min_lr_ratio: float, restarts: int):
    from timm.scheduler import StepLRScheduler

    return StepLRScheduler(optimizer, decay_t=10 ** 12, decay_rate=1.0, **warmup)  # a decay step no run reaches
