"""The CPU budget of a process that runs torch: how many cores it may use, and their split.

torch starts one busy-waiting OpenMP thread per core, whatever else runs on the machine.
When another process holds a core, each parallel op waits for the thread it lost, and a
run takes several times as long (on a 2-core machine: 2.2x with one other busy process,
10x for two zoo runs side by side). :func:`cpu_budget` decides, once per command (and
per fold of a cross-fit), the cores this process may keep busy:

* the cores it may run on (CPU affinity, and a cgroup CPU quota where one is set),
* less the cores other processes keep busy, measured over a short window of /proc/stat,
* shared with the other zoo processes deciding at the same moment (two runs started
  together would otherwise each see an idle machine) and, under torchrun, with the
  other processes of the job on this machine,

at least 1; and splits it between torch's intra-op threads and DataLoader workers.
:func:`apply_budget` sets torch's thread counts. No torch import at module level: the
ensemble side and the CLI import this without torch's start-up cost.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

from zoo.errors import UserInputError

MAX_WORKERS = 8  # more loader processes rarely speed a step up, and each holds a copy of the dataset's transforms
MEASURE_SECONDS = 0.25  # long enough for /proc/stat's 100 Hz ticks to resolve a quarter of a core
STARTING_WINDOW_SECONDS = 3.0  # a peer that chose its budget this recently may not show in /proc/stat yet


@dataclass(frozen=True)
class MachineLoad:
    """What :func:`measure_load` sees (tests construct it to fake a machine)."""

    cores: int  # cores this process may run on
    busy: float  # of those, cores that other processes kept busy during the measurement
    starting: int = 0  # other zoo processes that chose their budget within the last few seconds


@dataclass(frozen=True)
class CpuBudget:
    threads: int  # torch intra-op threads
    workers: int  # DataLoader worker processes (0: images are decoded in the main process)
    cores: int  # cores this process may run on
    busy: int  # of those, cores other processes kept busy when measured
    processes: int  # processes sharing the free cores: this one, torchrun siblings, zoo runs starting together
    share: int  # cores this process may keep busy: (cores - busy) / processes, at least 1
    device_type: str  # cpu, cuda, mps: off the CPU, loader workers get the cores
    threads_given: bool  # threads as requested (--threads), not from the share
    workers_given: bool  # workers as requested (--workers), not from the share

    def describe(self) -> str:
        """One line for the run's settings, e.g. "cpu budget: 1 of 2 cores free (1 busy elsewhere): 1 torch thread, 0 loader workers"."""
        free = self.cores - self.busy
        shared = f", {self.share} for each of {self.processes} processes" if self.processes > 1 else ""
        where = "" if self.device_type == "cpu" else f" (on {self.device_type}: loader workers get the cores)"
        threads = _plural(self.threads, "torch thread") + (" (as given)" if self.threads_given else "")
        workers = _plural(self.workers, "loader worker") + (" (as given)" if self.workers_given else "")
        return f"cpu budget: {free} of {self.cores} cores free ({self.busy} busy elsewhere){shared}: {threads}, {workers}{where}"

    def to_dict(self) -> dict:
        return asdict(self)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def cpu_budget(requested_threads: int | None = None, requested_workers: int | None = None, device_type: str = "cpu",
               world_size: int | None = None, measure: Callable[[], MachineLoad] | None = None,
               environ: Mapping[str, str] | None = None) -> CpuBudget:
    """The cores this process may keep busy and their split into torch threads and loader workers.

    ``requested_threads`` (``--threads``; else ``OMP_NUM_THREADS`` where set, as torch
    itself honours it) and ``requested_workers`` (``--workers``) win over the measured
    split; on the CPU the other part fills what is left of the share. ``world_size``:
    processes of this job on this machine (default: torchrun's ``LOCAL_WORLD_SIZE``, else
    ``WORLD_SIZE``, else 1). ``measure``: returns the :class:`MachineLoad` (default
    :func:`measure_load`); ``environ``: default ``os.environ``. Tests pass fakes of both.
    """
    environ = os.environ if environ is None else environ
    threads_from = "--threads"
    if requested_threads is None and environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        requested_threads, threads_from = int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    if requested_threads is not None and requested_threads < 1:
        raise UserInputError(f"{threads_from} must be at least 1, got {requested_threads}")
    if requested_workers is not None and requested_workers < 0:
        raise UserInputError(f"--workers must be 0 or more, got {requested_workers}")
    world = world_size if world_size is not None else processes_on_this_machine(environ)
    if world < 1:
        raise ValueError(f"world_size must be at least 1, got {world}")
    load = (measure or measure_load)()
    busy = min(load.cores, max(0, math.floor(load.busy + 0.5)))
    processes = max(world, 1 + load.starting)
    share = max(1, (load.cores - busy) // processes)
    threads, workers = _split(share, device_type, requested_threads, requested_workers)
    return CpuBudget(threads=threads, workers=workers, cores=load.cores, busy=busy, processes=processes, share=share,
                     device_type=device_type, threads_given=requested_threads is not None,
                     workers_given=requested_workers is not None)


def _split(share: int, device_type: str, threads: int | None, workers: int | None) -> tuple[int, int]:
    """(torch threads, loader workers) for ``share`` cores; a requested value is kept as given."""
    if device_type == "cpu":
        # The model's forward and backward dominate a CPU step: decoding and augmenting a batch takes
        # a fraction of it, so a quarter of the cores keeps up; with 1 or 2 cores a worker process
        # would take a core from the model, so decoding stays in the main process.
        auto_workers = 0 if share <= 2 else min(MAX_WORKERS, share // 4)
        if threads is None and workers is None:
            return share - auto_workers, auto_workers
        if workers is None:
            return threads, min(auto_workers, max(0, share - threads))
        return (threads if threads is not None else max(1, share - workers)), workers
    # On a GPU the model runs there; the CPU's work is decoding images, so the workers get the cores
    # and the main process keeps one to launch kernels.
    if workers is None:
        workers = min(MAX_WORKERS, max(1, share - (threads or 1)))
    return (threads if threads is not None else max(1, share - workers)), workers


def apply_budget(budget: CpuBudget) -> None:
    """Set torch's intra-op threads (and its inter-op pool, where it can still be set) to the budget."""
    import torch

    torch.set_num_threads(budget.threads)
    try:
        torch.set_num_interop_threads(budget.threads)
    except RuntimeError as e:
        # torch allows this once per process, before any inter-op work: a second run in the same
        # process (a cross-fit's next fold, a test session) keeps the first setting.
        if "cannot set number of interop threads" not in str(e):
            raise


def processes_on_this_machine(environ: Mapping[str, str] | None = None) -> int:
    """torchrun's processes on this machine (LOCAL_WORLD_SIZE, else WORLD_SIZE), 1 outside torchrun."""
    environ = os.environ if environ is None else environ
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        value = environ.get(name, "")
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


# ---------------------------------------------------------------------------- measuring the machine


def measure_load(interval: float = MEASURE_SECONDS, registry: Path | None = None) -> MachineLoad:
    """The cores this process may use, how busy other processes keep them, and zoo runs starting now.

    Sleeps ``interval`` seconds between two reads of /proc/stat (the cores' busy ticks, this
    process's own CPU time taken out). Before sleeping, it notes this process in
    ``registry`` (a folder of one empty file per process, by pid); after, it counts the
    other live processes noted there within the last few seconds: runs started together
    measure each other idle, so they must share the free cores explicitly.
    """
    cores = usable_cores()
    registry = registry or _default_registry()
    _note_starting(registry)
    before, own_before = _busy_ticks(cores), time.process_time()
    time.sleep(interval)
    after, own_after = _busy_ticks(cores), time.process_time()
    busy = 0.0
    if before is not None and after is not None and after[1] > before[1]:
        hz = os.sysconf("SC_CLK_TCK")
        wall = (after[1] - before[1]) / (hz * len(cores))  # the seconds the ticks span
        busy = max(0.0, (after[0] - before[0]) / hz - (own_after - own_before)) / wall
    return MachineLoad(cores=_quota_cores(len(cores)), busy=busy, starting=_others_starting(registry))


def usable_cores() -> set[int]:
    """The CPUs this process may run on (its affinity; all CPUs where affinity is not available)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return set(range(os.cpu_count() or 1))


def _quota_cores(affinity: int) -> int:
    """``affinity``, or fewer where a cgroup v2 CPU quota (containers, Slurm) allows fewer."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return affinity
    if quota == "max":
        return affinity
    return max(1, min(affinity, math.ceil(int(quota) / int(period))))


def _busy_ticks(cores: set[int]) -> tuple[int, int] | None:
    """(busy ticks, all ticks) summed over ``cores`` from /proc/stat; None where it cannot be read."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores):
            continue
        ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]  # idle and iowait are free time
    return (busy, total) if total else None


def _default_registry() -> Path:
    return Path(tempfile.gettempdir()) / f"zoo-cpu-budget-{os.getuid() if hasattr(os, 'getuid') else 0}"


def _note_starting(registry: Path) -> None:
    try:
        registry.mkdir(exist_ok=True)
        (registry / str(os.getpid())).touch()
    except OSError:  # a read-only temp folder: runs started together then each see an idle machine
        pass


def _others_starting(registry: Path) -> int:
    now, count = time.time(), 0
    try:
        entries = list(registry.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            recent = now - entry.stat().st_mtime < STARTING_WINDOW_SECONDS
        except OSError:  # removed by another process meanwhile
            continue
        if not _alive(int(entry.name)):
            entry.unlink(missing_ok=True)
        elif recent:
            count += 1
    return count


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
