"""Launchers: ``zoo run``'s training jobs as separate processes, N at a time here or as one Slurm job array.

A job (``zoo.pipeline.job``) is what ``zoo finetune ... --folds K --fold I --out OUT/members/NAME`` trains: one
fold of a cross-fitted member, a single-split member, or a linear probe (all its folds at once: a probe takes
seconds). Its process calls ``finetune.member.train_member`` on the member's config (``zoo.pipeline.job.run_job``),
so a job trains exactly what the same member trains in ``zoo run``'s own process: same folds, seeds and files. Folds of one member run side
by side because a ``--fold I`` process holds only ``RUN/fold-I`` (``zoo.rundir.hold_folder``); the launching
process writes the cross-fit's ``config.json`` and ``folds.json`` first (``finetune.kfold.start_cross_fit``) and
assembles its out-of-fold file when a fold job has not.

- ``local``: a standard-library pool of N threads, each running one job's process at a time (submitit's
  ``LocalExecutor`` has no concurrency cap, a short default timeout and gives every job the same GPUs). With
  GPUs each job sees its own ``--gpus-per-job`` of them (``CUDA_VISIBLE_DEVICES``); on the CPU the cores are
  split between the N jobs (``zoo.cpu.cpu_budget`` with a world of N), unless ``--threads``/``--workers`` say.
- ``slurm``: one job array through submitit (``pip install 'zoo-ensemble[slurm]'``). A job the cluster
  pre-empts or runs out of time is signalled USR2 by Slurm (submitit asks for it); submitit requeues it
  (``scontrol requeue``) and it continues from zoo's resume state (``last.pt``). A plain SIGTERM (``scancel``,
  a kill) is zoo's own: the fold saves its mid-epoch state and stops; the next ``zoo run`` resubmits it.

Each job gets the run's deadline (``--time-limit``) and MLflow parent run in the environment
(``zoo.pipeline.job.DEADLINE_ENV``, ``MLFLOW_PARENT_ENV``). Its output goes to ``OUT/logs/<job>.log`` (Slurm: submitit's files under
``OUT/logs/slurm``, named in the failure line). No click here; torch and submitit are imported only where used.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from queue import Queue
from typing import Any, Callable, Sequence

from zoo import atomic
from zoo.errors import Interrupted, UserInputError
from zoo.pipeline.job import DEADLINE_ENV, FINISHED, MLFLOW_PARENT_ENV, TIME_LIMIT_EXIT, Job

LAUNCHERS = {
    "sequential": "each member in this process, one after another (the default)",
    "local": "jobs as separate processes on this machine, --jobs at a time (--gpus-per-job GPUs each)",
    "slurm": "jobs as one Slurm job array through submitit (pip install 'zoo-ensemble[slurm]')",
}
SLURM_ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
                "REQUEUE_FED", "PREEMPTED")
SLURM_MISSING = "--launcher slurm needs submitit: pip install 'zoo-ensemble[slurm]'"


@dataclass(frozen=True)
class LaunchOptions:
    """How ``zoo run`` trains its members: ``launcher`` (a key of :data:`LAUNCHERS`); ``jobs``: how many run at once
    (local: processes; Slurm: the array's parallelism, 0 = no cap); ``gpus_per_job`` (None: 1 where GPUs are, else 0);
    Slurm's ``partition``, ``cpus_per_job``, ``time_min`` (per job; a job that reaches it is requeued and continues)
    and ``slurm_extra`` (any other sbatch option, ``{"account": "x"}`` -> ``--account=x``); ``wait``: False returns
    once the array is submitted (a later ``zoo run`` with the same arguments picks up what finished)."""

    launcher: str = "sequential"
    jobs: int = 1
    gpus_per_job: int | None = None
    partition: str | None = None
    cpus_per_job: int | None = None
    time_min: int = 240
    slurm_extra: dict[str, str] = field(default_factory=dict)
    wait: bool = True
    poll_seconds: float = 10.0  # how often the launching process looks at Slurm jobs

    def validate(self) -> "LaunchOptions":
        if self.launcher not in LAUNCHERS:
            raise UserInputError(f"--launcher: expected one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if self.jobs < (0 if self.launcher == "slurm" else 1):
            raise UserInputError(f"--jobs must be at least 1, got {self.jobs}")
        for name, value in (("--gpus-per-job", self.gpus_per_job), ("--cpus-per-job", self.cpus_per_job),
                            ("--time-min", self.time_min)):
            if value is not None and value < (0 if name == "--gpus-per-job" else 1):
                raise UserInputError(f"{name} must be at least {0 if name == '--gpus-per-job' else 1}, got {value}")
        slurm_only = {"--partition": self.partition, "--cpus-per-job": self.cpus_per_job, "--slurm-extra": self.slurm_extra,
                      "--no-wait": not self.wait}
        if self.launcher != "slurm" and any(slurm_only.values()):
            raise UserInputError(f"{', '.join(k for k, v in slurm_only.items() if v)}: only with --launcher slurm")
        if self.launcher == "sequential" and (self.jobs != 1 or self.gpus_per_job is not None):
            raise UserInputError("--jobs and --gpus-per-job need --launcher local or slurm (the sequential run trains one "
                                 "member at a time in this process)")
        return self


def parse_slurm_extra(items: Sequence[str]) -> dict[str, str]:
    """``--slurm-extra KEY=VALUE`` (repeatable) -> sbatch options, e.g. ``account=lab`` -> ``#SBATCH --account=lab``."""
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserInputError(f"--slurm-extra {item!r}: expected KEY=VALUE (an sbatch option without its --, "
                                 "e.g. account=mylab or constraint=a100)")
        extra[key.strip().lstrip("-")] = value.strip()
    return extra


@dataclass
class JobOutcome:
    job: Job
    status: str  # finished | time-limit | failed | queued (submitted or still running, --no-wait)
    detail: str = ""  # why it failed
    log: str = ""  # the file to read

    def line(self) -> str:
        """The one line the launching process prints for a job that failed."""
        return f"  {self.job.describe()}: failed ({self.detail}); log: {self.log}"


# ---------------------------------------------------------------------------------------
# In the launching process.


def launch(jobs: Sequence[Job], options: LaunchOptions, logs: Path, *, device: str | None = None,
           deadline: float | None = None, mlflow_parent: str | None = None,
           log: Callable[[str], None] = print) -> list[JobOutcome]:
    """Run ``jobs`` with ``options.launcher``; one outcome per job, in the order given. ``logs``: ``OUT/logs``;
    ``device``: the run's --device (``cpu``: no GPUs for the jobs); ``deadline``: wall-clock seconds since the epoch."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {DEADLINE_ENV: repr(deadline) if deadline is not None else "", MLFLOW_PARENT_ENV: mlflow_parent or ""}
    if options.launcher == "local":
        return _launch_local(list(jobs), options, logs, device, env, log)
    if options.launcher == "slurm":
        return _launch_slurm(list(jobs), options, logs, env, log)
    raise ValueError(f"launch: launcher must be local or slurm, got {options.launcher!r}")


def _progress(done: int, total: int, outcome: JobOutcome, seconds: float | None, log) -> None:
    if outcome.status == "failed":
        log(outcome.line())
        return
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    what = {"finished": "finished", "time-limit": "stopped by the time limit", "queued": "queued"}[outcome.status]
    log(f"  [{done}/{total}] {outcome.job.describe()}: {what}{took} (log: {outcome.log})")


def _last_error(path: Path) -> str:
    """The last line of a job's log that says what went wrong (a traceback's last line, zoo's ``error:`` line)."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line.startswith("error:") or "Error" in line.split(":")[0]),
                lines[-1] if lines else "")


def visible_gpus(device: str | None) -> list[str]:
    """The GPUs jobs may be given: ``CUDA_VISIBLE_DEVICES`` where set, else every one torch sees; none on the CPU."""
    if device == "cpu":
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def gpu_slots(gpus: list[str], jobs: int, per_job: int | None) -> list[str | None]:
    """One ``CUDA_VISIBLE_DEVICES`` value per concurrent job (None: leave the jobs on the CPU)."""
    per_job = (1 if gpus else 0) if per_job is None else per_job
    if per_job == 0:
        return [None] * jobs
    if jobs * per_job > len(gpus):
        raise UserInputError(f"--jobs {jobs} --gpus-per-job {per_job} needs {jobs * per_job} GPUs; this machine shows "
                             f"{len(gpus)} ({', '.join(gpus) or 'none'}); lower --jobs or --gpus-per-job")
    return [",".join(gpus[i * per_job:(i + 1) * per_job]) for i in range(jobs)]


def check_resources(options: LaunchOptions, device: str | None) -> list[str | None]:
    """The local launcher's GPU slots (``CUDA_VISIBLE_DEVICES`` per concurrent job), refused in one line when
    ``--jobs`` x ``--gpus-per-job`` exceed this machine's GPUs; none for Slurm, whose nodes have their own."""
    if options.launcher != "local":
        return []
    return gpu_slots(visible_gpus(device), options.jobs, options.gpus_per_job)


def _cpu_share(job: Job, jobs: int, on_gpu: bool) -> Job:
    """Split this machine's cores between ``jobs`` processes: each job's threads and loader workers, unless given."""
    from zoo.cpu import cpu_budget

    config = job.config
    if config.get("threads") is not None and config.get("workers") is not None:
        return job
    budget = cpu_budget(config.get("threads"), config.get("workers"), "cuda" if on_gpu else "cpu", world_size=jobs)
    return replace(job, config={**config, "threads": budget.threads, "workers": budget.workers})


def _launch_local(jobs: list[Job], options: LaunchOptions, logs: Path, device: str | None, env: dict[str, str],
                  log) -> list[JobOutcome]:
    slots: Queue = Queue()
    gpu_values = check_resources(options, device)
    for value in gpu_values:
        slots.put(value)
    jobs = [_cpu_share(job, options.jobs, gpu_values[0] is not None) for job in jobs]
    running: dict[str, subprocess.Popen] = {}
    lock, stopping = threading.Lock(), threading.Event()

    def run_one(job: Job) -> tuple[JobOutcome, float]:
        gpus = slots.get()
        try:
            spec, log_path = logs / f"{job.name}.json", Path(job.log)
            atomic.write_json(spec, asdict(job))
            job_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
            if gpus is not None:
                job_env["CUDA_VISIBLE_DEVICES"] = gpus
            start = time.perf_counter()
            with log_path.open("a", encoding="utf-8") as out, lock:
                if stopping.is_set():
                    return JobOutcome(job, "failed", "not started: zoo run was stopped", str(log_path)), 0.0
                process = subprocess.Popen([sys.executable, "-m", "zoo.pipeline.job", str(spec)], stdout=out,
                                           stderr=subprocess.STDOUT, env=job_env)
                running[job.name] = process
            status = process.wait()
            with lock:
                running.pop(job.name, None)
            return _local_outcome(job, status, log_path), time.perf_counter() - start
        finally:
            slots.put(gpus)

    outcomes: dict[str, JobOutcome] = {}
    pool = ThreadPoolExecutor(max_workers=options.jobs, thread_name_prefix="zoo-job")
    try:
        with _sigterm_raises():
            futures = {pool.submit(run_one, job): job for job in jobs}
            for done, future in enumerate(as_completed(futures), start=1):
                outcome, seconds = future.result()
                outcomes[outcome.job.name] = outcome
                _progress(done, len(jobs), outcome, seconds, log)
    except BaseException as e:
        # Ctrl-C, SIGTERM, a bug: no new job starts, and each running one gets SIGTERM, on which zoo saves its
        # resume state (a terminal's Ctrl-C reaches them by itself; this covers a kill of this process).
        stopping.set()
        with lock:
            for process in running.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
        pool.shutdown(wait=True, cancel_futures=True)
        if isinstance(e, (KeyboardInterrupt, _Terminated)):
            name = "SIGINT" if isinstance(e, KeyboardInterrupt) else "SIGTERM"
            raise Interrupted(128 + int(signal.Signals[name]), f"{name}: zoo run stopped; its running jobs saved their "
                              "resume state. Run the same command again to continue") from None
        raise
    pool.shutdown(wait=True)
    return [outcomes[job.name] for job in jobs]


class _Terminated(Exception):
    pass


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM to the launching process as an exception (Ctrl-C already is one), so its jobs are stopped cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _local_outcome(job: Job, status: int, log_path: Path) -> JobOutcome:
    if status == 0 and job.done_file.is_file():
        return JobOutcome(job, "finished", log=str(log_path))
    if status == TIME_LIMIT_EXIT:
        return JobOutcome(job, "time-limit", log=str(log_path))
    why = (f"killed by {signal.Signals(-status).name}" if status < 0 and -status in signal.valid_signals() else
           f"exit {status}" if status else "ended without its result.json")
    error = _last_error(log_path)
    return JobOutcome(job, "failed", f"{why}: {error}" if error and status >= 0 else why, str(log_path))


# ---------------------------------------------------------------------------------------
# Slurm, through submitit.


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserInputError(SLURM_MISSING) from None
    return submitit


def slurm_record(logs: Path) -> Path:
    """Which Slurm job id each job was last submitted as: a re-run does not resubmit jobs still queued or running."""
    return logs / "slurm_jobs.json"


def _launch_slurm(jobs: list[Job], options: LaunchOptions, logs: Path, env: dict[str, str], log) -> list[JobOutcome]:
    submitit = _submitit()
    from zoo.pipeline.slurm_job import SlurmTrainingJob

    folder = logs / "slurm"
    record_file = slurm_record(logs)
    record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
    active = _still_active(submitit, folder, {job.name: record[job.name] for job in jobs if job.name in record})
    if active:
        log(f"  still queued or running on Slurm, not resubmitted: {', '.join(f'{n} ({i})' for n, i in active.items())}")
    to_submit = [job for job in jobs if job.name not in active]
    handles: dict[str, Any] = {name: submitit.SlurmJob(folder=folder, job_id=job_id) for name, job_id in active.items()}
    if to_submit:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=20)
        executor.update_parameters(**slurm_parameters(options, env, len(to_submit)))
        with executor.batch():
            submitted = [executor.submit(SlurmTrainingJob(job)) for job in to_submit]
        handles.update({job.name: handle for job, handle in zip(to_submit, submitted)})
        first = submitted[0].job_id.split("_")[0]
        log(f"  submitted {len(to_submit)} job(s) to Slurm as job {first}"
            + (f" (array of {len(to_submit)})" if len(to_submit) > 1 else "") + f"; their output: {folder}")
    atomic.write_json(record_file, {**record, **{name: handle.job_id for name, handle in handles.items()}})
    if not options.wait:
        return [JobOutcome(job, "queued", log=str(handles[job.name].paths.stdout)) for job in jobs]
    outcomes: dict[str, JobOutcome] = {}
    while len(outcomes) < len(jobs):
        for job in jobs:
            if job.name not in outcomes and handles[job.name].done():
                outcomes[job.name] = _slurm_outcome(job, handles[job.name])
                _progress(len(outcomes), len(jobs), outcomes[job.name], None, log)
        if len(outcomes) < len(jobs):
            time.sleep(options.poll_seconds)
    return [outcomes[job.name] for job in jobs]


def slurm_parameters(options: LaunchOptions, env: dict[str, str], count: int) -> dict[str, Any]:
    """submitit's ``SlurmExecutor`` parameters of the array: resources per job, the job's environment (set in the
    sbatch script, so it holds on whichever node runs it) and the user's extra sbatch options."""
    gpus = options.gpus_per_job if options.gpus_per_job is not None else 0
    params: dict[str, Any] = {"job_name": "zoo-run", "time": options.time_min, "nodes": 1, "ntasks_per_node": 1,
                              "array_parallelism": options.jobs if options.jobs > 0 else count,
                              "setup": [f"export {name}={value}" for name, value in env.items() if value]}
    if options.partition:
        params["partition"] = options.partition
    if gpus:
        params["gpus_per_node"] = gpus
    if options.cpus_per_job:
        params["cpus_per_task"] = options.cpus_per_job
    if options.slurm_extra:
        params["additional_parameters"] = dict(options.slurm_extra)
    return params


def _still_active(submitit, folder: Path, known: dict[str, str]) -> dict[str, str]:
    """Of jobs submitted earlier, those Slurm (sacct) says are pending, running or requeued."""
    active = {}
    for name, job_id in known.items():
        handle = submitit.SlurmJob(folder=folder, job_id=job_id)
        if handle.paths.result_pickle.exists():
            continue
        if handle.get_info(mode="force").get("State", "").split(" ")[0] in SLURM_ACTIVE:
            active[name] = job_id
    return active


def _slurm_outcome(job: Job, handle) -> JobOutcome:
    stdout, stderr = str(handle.paths.stdout), str(handle.paths.stderr)
    try:
        stopped = handle.result()
    except Exception as e:  # submitit's FailedJobError / UncompletedJobError carry the job's error
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if "Error" in line.split(":")[0]), lines[-1] if lines else type(e).__name__)
        return JobOutcome(job, "failed", f"{error}", stderr)
    if stopped == "time-limit":
        return JobOutcome(job, "time-limit", log=stdout)
    if stopped in FINISHED and job.done_file.is_file():
        return JobOutcome(job, "finished", log=stdout)
    return JobOutcome(job, "failed", f"ended {stopped} without its result.json", stderr)
