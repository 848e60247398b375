"""Every random number generator of a run: seeded per (seed, epoch, rank), saved and restored mid-epoch,
so that a resumed run continues exactly as an unbroken one."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int, epoch: int = 0, rank: int = 0) -> torch.Generator:
    """Seed every RNG from (seed, epoch, rank); return the data-order generator of that epoch.

    Each epoch starts from RNG states that depend only on the seed and the epoch, so a
    run resumed at an epoch boundary continues exactly as an unbroken one. Under
    torchrun each rank draws its own augmentation and dropout (rank 0 draws what a
    single process would); the model starts identical on every rank because DDP
    copies rank 0's weights to the others.
    """
    value = (seed * 1_000_003 + epoch + rank * 1_000_000_007) % (2 ** 63)
    random.seed(value)
    np.random.seed(value % (2 ** 32))
    torch.manual_seed(value)
    return torch.Generator().manual_seed(value)


def get_rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np.random.get_state()[0], torch.from_numpy(np.random.get_state()[1].copy())] + list(np.random.get_state()[2:])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only (one GPU per rank)
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        if isinstance(state["cuda"], (list, tuple)):  # resume state written before one-GPU-per-rank states
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"])
