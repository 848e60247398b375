"""Distributed data parallel from torchrun's environment (nanoGPT style).

``torchrun --nproc_per_node N -m zoo finetune ...`` starts N copies of the command and
sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in each; :func:`setup` reads them,
joins the process group (NCCL on CUDA, gloo on the CPU) and returns a :class:`Dist`
that the training loop asks everything distributed: who writes files (``is_main``),
which device to use, and the few collectives the loop needs (sums, "did any rank ask
to stop", gathering Python objects). Without torchrun it is a single process whose
collectives return their input, so the loop has one path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as tdist

from zoo.errors import UserInputError


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False  # under torchrun (a process group exists)
    backend: str = ""
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # setup() created the group, cleanup() destroys it

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, logs and shows the progress bar."""
        return self.rank == 0

    def describe(self) -> str:
        if not self.enabled:
            return "1 process"
        return f"{self.world_size} processes ({self.backend}), this is rank {self.rank}"

    # Collectives: identity in a single process.

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t.tolist()

    def max(self, values: Sequence[int]) -> list[int]:
        """Element-wise maximum over ranks (int64): "did any rank ..." flags."""
        if not self.enabled:
            return [int(v) for v in values]
        t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self._comm_device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def gather_state(self, obj: Any) -> list[Any]:
        """Like :meth:`gather` for objects that hold tensors (RNG states): sent as ``torch.save`` bytes,
        read back with ``weights_only=True`` (``all_gather_object`` cannot unpickle tensor storages)."""
        if not self.enabled:
            return [obj]
        import io

        buf = io.BytesIO()
        torch.save(obj, buf)
        return [torch.load(io.BytesIO(b), weights_only=True) for b in self.gather(buf.getvalue())]

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank.

        DDP sends rank 0's buffers to the others before each forward, but each rank's
        last forward of an epoch then updates its own copy with its own batch; without
        this, ranks would validate their shards with slightly different models.
        """
        if not self.enabled:
            return
        for buffer in module.buffers():
            tdist.broadcast(buffer.data, src=0)

    def barrier(self) -> None:
        if not self.enabled:
            return
        if self.backend == "nccl":
            tdist.barrier(device_ids=[self.local_rank])
        else:
            tdist.barrier()

    def cleanup(self) -> None:
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()
            self.owns_group = False

    @property
    def _comm_device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # Models.

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DistributedDataParallel (or itself in a single process).

        DDP registers only parameters with ``requires_grad`` when it is built, so frozen
        stages cause no unused-parameter error; wrap again whenever the trainable set
        changes (gradual unfreezing).
        """
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)


def from_environment() -> tuple[int, int, int] | None:
    """(rank, local rank, world size) as torchrun sets them, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UserInputError(f"RANK={os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: "
                             "torchrun's environment must hold integers; start the run with torchrun") from None
    if not 0 <= rank < world:
        raise UserInputError(f"RANK={rank} must be in [0, WORLD_SIZE={world}); start the run with torchrun")
    return rank, local, world


def setup(device: str | None) -> Dist:
    """Join torchrun's process group (if any) and pick this process's device.

    Under torchrun each process takes ``cuda:LOCAL_RANK`` (``--device cuda`` or none
    with CUDA present) with NCCL, or the CPU (``--device cpu``, or no CUDA) with gloo.
    """
    env = from_environment()
    if env is None:
        return Dist(device=torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local, world = env
    wants_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if wants_cuda:
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if local >= torch.cuda.device_count():
            raise UserInputError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPU(s); "
                                 "start torchrun with --nproc_per_node at most the GPU count")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    owns = not tdist.is_initialized()
    if owns:
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        tdist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return Dist(rank=rank, local_rank=local, world_size=world, enabled=True, backend=backend, device=dev, owns_group=owns)


def shard_overlap(per_rank: Sequence[Sequence[int]]) -> int:
    """How many sample indices more than one rank trained on (0 when the shards are disjoint)."""
    import numpy as np

    distinct = [np.unique(np.asarray(indices, dtype=np.int64)) for indices in per_rank]
    if not distinct:
        return 0
    _, ranks_per_index = np.unique(np.concatenate(distinct), return_counts=True)
    return int((ranks_per_index > 1).sum())


def interleave(shards: Sequence[Any]) -> Any:
    """Undo ``items[rank::world]`` sharding: rows of rank r's shard go to r, r+W, r+2W ..."""
    import numpy as np

    world = len(shards)
    total = sum(len(s) for s in shards)
    first = next(s for s in shards)
    out = np.empty((total, *np.asarray(first).shape[1:]), dtype=np.asarray(first).dtype)
    for r, s in enumerate(shards):
        out[r::world] = s
    return out
