"""Progress of the steps that take more than a few seconds, in one helper: ``progress``.

On a terminal it is a tqdm bar on stderr that disappears when the step ends. Anywhere
else (a log file, a pipe, a scheduler's output) a bar would be a stream of carriage
returns, so it is one plain line each time another tenth of the step is done::

    epoch 3/10: 40% (12/30 batches, loss 0.6931, 8.1 img/s)

Nothing is shown for a step that ends within ``DELAY_SECONDS``, so quick steps on small
data stay quiet. ``progress=False`` (the library functions' argument) or ``ZOO_PROGRESS=0``
in the environment turns it off; under torchrun only rank 0 shows it.

Log lines written with :func:`write` while a bar is open go above the bar instead of
through it. The Python API (``zoo.run`` ...) shows ``tqdm.auto`` bars instead, a widget in
Jupyter, wherever its output goes (:func:`bars`). No torch here: the ensemble commands use it too.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator, TextIO

ENV = "ZOO_PROGRESS"
DELAY_SECONDS = 1.0  # nothing is shown for a step that ends sooner
_open_bars = 0  # tqdm bars open on a terminal now: log lines must go through tqdm.write
_style = "terminal"  # terminal: a bar on a terminal, else lines | auto: tqdm.auto bars | off (see ``bars``)


@contextlib.contextmanager
def bars(enabled: bool = True) -> Iterator[None]:
    """Inside: progress as ``tqdm.auto`` bars (a notebook widget in Jupyter, a text bar elsewhere), or none at
    all with ``enabled=False``. What the Python API's ``progress`` argument sets."""
    global _style
    previous, _style = _style, ("auto" if enabled else "off")
    try:
        yield
    finally:
        _style = previous


def progress_enabled(enabled: bool | None = None) -> bool:
    """Whether progress is shown: not when ``enabled`` is False, ``ZOO_PROGRESS=0`` or on a torchrun rank other than 0."""
    if enabled is False or _style == "off" or os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return os.environ.get("RANK", "0") == "0"


class Progress:
    """``update(n)`` advances the count, ``set(done)`` sets it; ``note`` is shown after the count
    (``"loss 0.6931, 8.1 img/s"``). A context manager; ``close()`` ends it. A disabled one does nothing."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", enabled: bool = True, stream: TextIO | None = None,
                 log: Callable[[str], None] | None = None, delay: float | None = None):
        self.total, self.desc, self.unit, self.done = max(int(total), 0), desc, unit, 0
        self.enabled = enabled and self.total > 0
        self._stream = stream if stream is not None else sys.stderr
        self._log = log
        self._delay = DELAY_SECONDS if delay is None else delay
        self._start = time.monotonic()
        self._tenths = 0  # tenths of the step already reported as a line
        self._bar = None
        if self.enabled and log is None and (_style == "auto" or _isatty(self._stream)):
            global _open_bars
            if _style == "auto":
                from tqdm.auto import tqdm
            else:
                from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, file=self._stream, dynamic_ncols=True,
                             delay=self._delay)
            _open_bars += 1

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, note: str | None = None) -> None:
        self.set(self.done + n, note)

    def set(self, done: int, note: str | None = None) -> None:
        if not self.enabled:
            return
        self.done = min(int(done), self.total)
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(self.done - self._bar.n)
            return
        tenths = self.done * 10 // self.total
        if tenths > self._tenths and time.monotonic() - self._start >= self._delay:
            self._tenths = tenths
            line = f"{self.desc}: {100 * self.done // self.total}% ({self.done}/{self.total} {self.unit}{f', {note}' if note else ''})"
            if self._log is not None:
                self._log(line)
            else:
                print(line, file=self._stream, flush=True)

    def close(self) -> None:
        global _open_bars
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            _open_bars -= 1
        self.enabled = False


def progress(total: int, desc: str, *, unit: str = "it", enabled: bool | None = None,
             log: Callable[[str], None] | None = None, delay: float | None = None) -> Progress:
    """A :class:`Progress` of ``total`` steps named ``desc``, on stderr (a bar on a terminal, else a
    line per tenth), or off (see :func:`progress_enabled`). ``log``: send the lines there instead
    (never a bar). ``delay``: seconds before anything is shown (default ``DELAY_SECONDS``)."""
    return Progress(total, desc, unit=unit, enabled=progress_enabled(enabled), log=log, delay=delay)


def write(message: str) -> None:
    """Print a log line to stderr, above any progress bar that is open on the terminal."""
    if _open_bars:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
        sys.stderr.flush()
    else:
        print(message, file=sys.stderr, flush=True)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


__all__ = ["progress", "Progress", "progress_enabled", "write", "bars", "ENV", "DELAY_SECONDS"]
