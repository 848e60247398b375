"""The callable submitit runs in each task of ``zoo run --launcher slurm``'s job array (imports submitit).

A ``submitit.helpers.Checkpointable``: when Slurm signals the task with USR2 (its time is nearly up, or the
cluster pre-empts it), submitit calls ``checkpoint``, which resubmits this same job, and requeues the task
(``scontrol requeue``). The requeued task trains the same fold again, and ``finetune`` continues it from the
resume state the fold left (``last.pt``), so a pre-empted job loses at most the epoch it was in.
"""

from __future__ import annotations

import submitit

from zoo.pipeline.job import Job, run_job


class SlurmTrainingJob(submitit.helpers.Checkpointable):
    def __init__(self, job: Job):
        self.job = job

    def __call__(self) -> str:
        # A task that a requeue starts again finds the fold's resume state and continues from it (finetune.kfold).
        return run_job(self.job)
