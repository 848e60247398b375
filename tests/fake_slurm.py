"""A fake Slurm for tests: ``sbatch``, ``srun``, ``sacct`` and ``scontrol``, the commands submitit's SlurmExecutor calls.

``python fake_slurm.py sbatch SCRIPT`` records the script's ``#SBATCH`` options and starts a detached runner that
runs each array task's script locally (``--array=0-N%P``: P at a time) with the ``SLURM_*`` variables a task
sees, then prints ``Submitted batch job ID`` as sbatch does. ``srun`` runs the command with its ``--output`` /
``--error`` files; ``sacct -o JobID,State,NodeList --parsable2 -j ID`` reports the tasks' states; ``scontrol
requeue ID_TASK`` marks a task to run again once its current try ends (the runner does so, as Slurm would).

Pre-emption: with ``FAKE_SLURM_PREEMPT=ID_TASK`` and ``FAKE_SLURM_PREEMPT_WHEN=FILE``, the runner sends that task
SIGUSR2 on its first try once FILE exists (what Slurm sends before a time limit or a pre-emption, as submitit
asks with ``--signal=USR2@90``). Everything is recorded under ``FAKE_SLURM_DIR``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SLURM_DIR", "/tmp/fake_slurm"))
COMMANDS = ("sbatch", "srun", "sacct", "scontrol")


def install(bin_dir: Path, state_dir: Path) -> dict[str, str]:
    """Write the four executables into ``bin_dir``; the environment variables that put them first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" {name} "$@"\n')
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FAKE_SLURM_DIR": str(state_dir)}


def sbatch_options(script: str) -> dict[str, str]:
    options = {}
    for match in re.finditer(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, flags=re.M):
        options[match.group(1)] = (match.group(2) or "").strip("'\"")
    return options


def _sbatch(args: list[str]) -> int:
    script_path = Path(args[-1])
    STATE.mkdir(parents=True, exist_ok=True)
    job_id = str(1000 + len(list(STATE.glob("sbatch-*.json"))))
    text = script_path.read_text()
    (STATE / f"sbatch-{job_id}.json").write_text(json.dumps({"job_id": job_id, "options": sbatch_options(text),
                                                             "script": text}))
    with (STATE / f"runner-{job_id}.log").open("w") as log:
        subprocess.Popen([sys.executable, __file__, "_run", job_id, str(script_path)], stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True, env=os.environ.copy())
    print(f"Submitted batch job {job_id}")
    return 0


def _set_state(key: str, state: str) -> None:
    (STATE / f"state-{key}").write_text(state)


def _run(job_id: str, script_path: str) -> int:
    text = Path(script_path).read_text()
    options = sbatch_options(text)
    folder = Path(options["output"]).parent
    array = re.fullmatch(r"0-(\d+)%(\d+)", options.get("array", ""))
    tasks = list(range(int(array.group(1)) + 1)) if array else [None]
    keys = [f"{job_id}_{t}" if t is not None else job_id for t in tasks]
    for key in keys:
        _set_state(key, "PENDING")
    slots = threading.Semaphore(int(array.group(2)) if array else 1)

    def task(index: int | None, key: str) -> None:
        with slots:
            pickle = folder / f"{key}_submitted.pkl"
            for _ in range(600):  # submitit moves the job's pickle into place once sbatch has answered
                if pickle.exists():
                    break
                time.sleep(0.1)
            attempt = 0
            while True:
                _set_state(key, "RUNNING")
                env = {**os.environ, "SLURM_JOB_ID": str(int(job_id) + 100 + (index or 0)), "SLURM_NTASKS": "1",
                       "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_JOB_NODELIST": "localhost", "SLURM_RESTART_COUNT": str(attempt), "FAKE_SLURM_KEY": key}
                if index is not None:
                    env.update(SLURM_ARRAY_JOB_ID=job_id, SLURM_ARRAY_TASK_ID=str(index))
                process = subprocess.Popen(["bash", script_path], env=env)
                if attempt == 0 and os.environ.get("FAKE_SLURM_PREEMPT") == key:
                    _preempt_when_ready(process, key)
                status = process.wait()
                requeue = STATE / f"requeue-{key}"
                if requeue.exists():
                    requeue.unlink()
                    _set_state(key, "REQUEUED")
                    attempt += 1
                    continue
                _set_state(key, "COMPLETED" if status == 0 else "FAILED")
                return

    threads = [threading.Thread(target=task, args=(t, k)) for t, k in zip(tasks, keys)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 0


def _preempt_when_ready(process: subprocess.Popen, key: str) -> None:
    when = Path(os.environ["FAKE_SLURM_PREEMPT_WHEN"])
    pid_file = STATE / f"pid-{key}"
    while process.poll() is None:
        if when.exists() and pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGUSR2)
            (STATE / f"preempted-{key}").write_text(str(time.time()))
            return
        time.sleep(0.02)


def _srun(args: list[str]) -> int:
    files, i = {}, 0
    while i < len(args) and args[i].startswith("-"):
        name = args[i].lstrip("-")
        if "=" in name:
            name, value = name.split("=", 1)
            files[name] = value
        elif name in ("output", "error"):
            files[name] = args[i + 1]
            i += 1
        i += 1
    command = args[i:]
    key = os.environ.get("FAKE_SLURM_KEY", "")
    fill = {"%A": os.environ.get("SLURM_ARRAY_JOB_ID", ""), "%a": os.environ.get("SLURM_ARRAY_TASK_ID", ""),
            "%j": os.environ.get("SLURM_JOB_ID", ""), "%t": "0"}
    for stream, name in ((1, "output"), (2, "error")):
        if name in files:
            path = files[name]
            for pattern, value in fill.items():
                path = path.replace(pattern, value)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, stream)
    (STATE / f"pid-{key}").write_text(str(os.getpid()))  # exec keeps the pid: the runner signals the task itself
    os.execvp(command[0], command)
    return 1


def _sacct(args: list[str]) -> int:
    ids = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    print("JobID|State|NodeList")
    for state in sorted(STATE.glob("state-*")):
        key = state.name.removeprefix("state-")
        if key.split("_")[0] in ids:
            print(f"{key}|{state.read_text()}|localhost")
    return 0


def _scontrol(args: list[str]) -> int:
    with (STATE / "scontrol.log").open("a") as log:
        log.write(" ".join(args) + "\n")
    if args[:1] == ["requeue"]:
        (STATE / f"requeue-{args[1]}").write_text("")
    return 0


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    sys.exit({"sbatch": _sbatch, "srun": _srun, "sacct": _sacct, "scontrol": _scontrol}[command](rest)
             if command != "_run" else _run(*rest))
