"""The exceptions the command line turns into an exit: a one-line message, or a signal's status."""


class UserInputError(ValueError):
    """Bad input from the user: a file, a folder or an option.

    The message names the file or option, what was expected and what came, and the
    fix. The CLI prints it as one line, without a traceback.
    """


class HubUnreachable(UserInputError):
    """Pretrained weights could not be downloaded from the Hugging Face hub (offline, firewalled)."""


class Interrupted(Exception):
    """A signal (SIGINT, SIGTERM) stopped the work at a safe point, after its state was saved.

    An ordinary exception: library code never decides the process's exit. It carries the
    status a shell gives a process stopped by that signal (128 + signal number: 130 for
    SIGINT, 143 for SIGTERM); only the command line exits with it.
    """

    def __init__(self, exit_status: int, message: str = ""):
        super().__init__(message or f"interrupted (exit status {exit_status})")
        self.exit_status = exit_status


class JobsFailed(UserInputError):
    """Training jobs of ``zoo run --launcher local|slurm`` failed, so members are missing: printed as one line, like
    bad input, naming the members and the jobs' log files (each failed job had its own line before)."""
