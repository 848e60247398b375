"""A time budget for training: ``zoo run --time-limit 2h`` and a zoo file member's ``time_limit``.

The budget covers training only (the ensemble stages after it take seconds to minutes). A
member's first epoch measures how long its epochs take; an epoch that would not end within
what is left is not started, and a cross-fit starts a fold only when one epoch of it and of
each fold after it still fits, since a cross-fit counts only once all its folds are done.
The clock is an argument, so tests move time forward instead of waiting.
"""

from __future__ import annotations

import math
import re
import time
from typing import Callable

from zoo.errors import UserInputError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str | float | int, where: str = "--time-limit") -> float:
    """Seconds from ``"2h"``, ``"90m"``, ``"1h30m"``, ``"45s"`` or a plain number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        parts = re.fullmatch(r"(?:\d+(?:\.\d+)?[smhd])+", text) and re.findall(r"(\d+(?:\.\d+)?)([smhd])", text)
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif parts:
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
        else:
            raise UserInputError(f"{where}: expected a duration such as 2h, 90m, 1h30m or 3600 (seconds), got {value!r}")
    if not seconds > 0 or math.isinf(seconds):
        raise UserInputError(f"{where}: expected a positive duration, got {value!r}")
    return seconds


class TimeBudget:
    """The seconds left for training until ``end`` on ``clock``, and the epoch length measured so far.

    One budget per member: its first epoch's length (``epoch_seconds``) estimates every later
    epoch of it, the epochs of its other folds included. ``later_epochs`` is how many epochs must
    still fit after the current one (a cross-fit: one for each fold still to start).
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic, *, end: float | None = None):
        self.clock = clock
        self.end = clock() + seconds if end is None else end
        self.epoch_seconds: float | None = None
        self.later_epochs = 0

    def remaining(self) -> float:
        return self.end - self.clock()

    def member(self, seconds: float | None = None) -> "TimeBudget":
        """A fresh budget for one member (its own epoch estimate) that ends with this one, or sooner with its own limit."""
        end = self.end if seconds is None else min(self.end, self.clock() + seconds)
        return TimeBudget(0, self.clock, end=end)

    def measured(self, seconds: float) -> None:
        if self.epoch_seconds is None:
            self.epoch_seconds = seconds

    def fits_epoch(self) -> bool:
        """Whether another epoch (and one for each of ``later_epochs``) ends within the budget; before any
        epoch was measured, whether any time is left."""
        if self.epoch_seconds is None:
            return self.remaining() > 0
        return self.remaining() >= self.epoch_seconds * (1 + self.later_epochs)

    def describe(self) -> str:
        estimate = f"; an epoch takes about {self.epoch_seconds:.0f} s" if self.epoch_seconds is not None else ""
        return f"{max(self.remaining(), 0):.0f} s left{estimate}"


def member_budget(run_budget: TimeBudget | None, member_seconds: float | None,
                  clock: Callable[[], float] = time.monotonic) -> TimeBudget | None:
    """A member's budget: the run's (what is left of it), cut to the member's own limit; None without either."""
    if run_budget is not None:
        return run_budget.member(member_seconds)
    return TimeBudget(member_seconds, clock) if member_seconds is not None else None


def format_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g}h"
    return f"{seconds / 60:g}m" if seconds >= 60 else f"{seconds:g}s"


__all__ = ["TimeBudget", "parse_duration", "member_budget", "format_duration"]
