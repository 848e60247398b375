"""Transforms and data loaders, from timm's data config and transforms."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from timm.data import create_transform
from torch.utils.data import DataLoader, DistributedSampler, WeightedRandomSampler

from zoo.data import ImageDataset, Sample


def train_transform(data_config: dict[str, Any], *, auto_augment: str | None, crop_scale: float, hflip: float):
    return create_transform(
        input_size=tuple(data_config["input_size"]), is_training=True, interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]), std=tuple(data_config["std"]), scale=(crop_scale, 1.0), hflip=hflip,
        auto_augment=None if auto_augment in (None, "", "none") else auto_augment, re_prob=0.0,
    )


def eval_transform(data_config: dict[str, Any], crop_pct: float | None = None):
    return create_transform(
        input_size=tuple(data_config["input_size"]), is_training=False, interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
        crop_pct=crop_pct if crop_pct is not None else data_config["crop_pct"], crop_mode=data_config.get("crop_mode", "center"),
    )


def _collate(batch):
    images, labels, index = zip(*batch)
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.long), torch.as_tensor(index, dtype=torch.long)


def train_loader(samples: Sequence[Sample], transform, *, batch_size: int, workers: int, generator: torch.Generator,
                 num_classes: int, balanced: bool, drop_last: bool, pin_memory: bool,
                 shard: tuple[int, int] | None = None, seed: int = 0, epoch: int = 0) -> DataLoader:
    """Shuffled loader whose order and augmentation are fixed by ``generator``'s seed.

    Workers are not persistent: each epoch's workers take their seeds from that epoch's
    generator, so a resumed run sees exactly the batches an unbroken one would.

    ``shard=(rank, world_size)`` (torchrun) gives this rank its own part of each epoch:
    a ``DistributedSampler`` shuffled by ``seed`` and ``epoch``, the same on every rank,
    with the remainder dropped so every rank runs the same number of steps.
    """
    dataset = ImageDataset(samples, transform)
    sampler = None
    if shard is not None:
        if balanced:
            raise ValueError("balanced sampling is not available with sharded (distributed) loading")
        rank, world = shard
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
    elif balanced:
        counts = [0] * num_classes
        for s in samples:
            counts[s.label] += 1
        weights = [1.0 / counts[s.label] for s in samples]
        sampler = WeightedRandomSampler(weights, num_samples=len(samples), replacement=True, generator=generator)
    per_rank = len(sampler) if sampler is not None else len(samples)
    # A last batch of one image is dropped too: BatchNorm cannot train on it (and it would be a noisy step).
    drop_last = (drop_last and per_rank >= batch_size) or (per_rank > batch_size and per_rank % batch_size == 1)
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, generator=generator,
                      num_workers=workers, collate_fn=_collate, drop_last=drop_last,
                      pin_memory=pin_memory, persistent_workers=False)


def eval_loader(samples: Sequence[Sample], transform, *, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(ImageDataset(samples, transform), batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=_collate, pin_memory=pin_memory)


def class_loss_weights(counts: Sequence[int]) -> torch.Tensor:
    """1/sqrt(count) per class, normalised so the mean weight over samples is 1."""
    weights = torch.tensor([1.0 / math.sqrt(c) if c else 0.0 for c in counts], dtype=torch.float32)
    n = torch.tensor(counts, dtype=torch.float32)
    return weights * n.sum() / (weights * n).sum()
