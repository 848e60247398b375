"""Transforms and data loaders, from timm's data config and transforms."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
from timm.data import create_transform
from torch.utils.data import DataLoader, DistributedSampler, WeightedRandomSampler

from zoo import cache as image_cache
from zoo.data import ImageDataset, Sample, check_images as decode_check


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
    images, labels, index, *targets = zip(*batch)  # targets: a distillation's teacher rows (finetune.views.ViewDataset)
    return (torch.stack(images), torch.as_tensor(labels, dtype=torch.long), torch.as_tensor(index, dtype=torch.long),
            *(torch.stack(t) for t in targets))


def train_loader(samples: Sequence[Sample], transform, *, batch_size: int, workers: int, generator: torch.Generator,
                 num_classes: int, balanced: bool, drop_last: bool, pin_memory: bool,
                 shard: tuple[int, int] | None = None, seed: int = 0, epoch: int = 0,
                 images: Callable[[int], Any] | None = None, dataset=None) -> DataLoader:
    """Shuffled loader whose order and augmentation are fixed by ``generator``'s seed.

    Workers are not persistent: each epoch's workers take their seeds from that epoch's
    generator, so a resumed run sees exactly the batches an unbroken one would.

    ``shard=(rank, world_size)`` (torchrun) gives this rank its own part of each epoch:
    a ``DistributedSampler`` shuffled by ``seed`` and ``epoch``, the same on every rank,
    with the remainder dropped so every rank runs the same number of steps.

    ``images``: where sample i's image comes from (``ImageSources.train``); default: its file, decoded.
    ``dataset``: the map dataset over ``samples`` to load instead of ``ImageDataset(samples, transform, images)``
    (a distillation's ``finetune.views.ViewDataset``).
    """
    dataset = dataset if dataset is not None else ImageDataset(samples, transform, images)
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


def eval_loader(samples: Sequence[Sample], transform, *, batch_size: int, workers: int, pin_memory: bool,
                images: Callable[[int], Any] | None = None) -> DataLoader:
    return DataLoader(ImageDataset(samples, transform, images), batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=_collate, pin_memory=pin_memory)


def class_loss_weights(counts: Sequence[int]) -> torch.Tensor:
    """1/sqrt(count) per class, normalised so the mean weight over samples is 1."""
    weights = torch.tensor([1.0 / math.sqrt(c) if c else 0.0 for c in counts], dtype=torch.float32)
    n = torch.tensor(counts, dtype=torch.float32)
    return weights * n.sum() / (weights * n).sum()


# --------------------------------------------------------------------------- decoded images (--cache)

# Where the eval transform does not start with a plain shorter-side resize (squash, border crops), the
# cache keeps eval images at their decoded size.
KEEP_SIZE = image_cache.ShortSideCap(1 << 30, "bicubic")


@dataclass
class ImageSources:
    """Where a run's loaders take their images: the file decoded each time, or a decoded-image cache.

    Train images are capped to ``train_cap`` on both paths (the random resized crop's
    smallest crop still spans the input size), so a run with ``--cache`` sees the same
    batches as one without. Eval images come from the cache at the eval transform's own
    first resize, which then leaves them as they are: the same tensors as uncached.
    """

    train_cap: image_cache.ShortSideCap
    eval_cap: image_cache.ShortSideCap
    store: image_cache.RamStore | image_cache.DirStore | None = None
    workers: int = 1  # decoding threads while filling the cache

    @property
    def caps(self) -> list[image_cache.ShortSideCap]:
        return [self.train_cap, self.eval_cap]

    def train(self, samples: Sequence[Sample]) -> Callable[[int], Any]:
        if self.store is None:
            return image_cache.CappedImages(samples, self.train_cap)
        return image_cache.cached_images(self.store, samples, self.train_cap, self.caps, workers=self.workers)

    def eval(self, samples: Sequence[Sample]) -> Callable[[int], Any] | None:
        if self.store is None:
            return None
        return image_cache.cached_images(self.store, samples, self.eval_cap, self.caps, workers=self.workers)


def check_through(sources: ImageSources | None, samples: Sequence[Sample], *, workers: int,
                  progress: Callable[[int, int], None] | None = None) -> tuple[list[Sample], list[tuple[str, str]]]:
    """The readable samples and (id, why) of the others: decoded into ``sources``' cache when it has one (so the
    loaders do not decode them again), else decoded and dropped."""
    if sources is None or sources.store is None:
        return decode_check(samples, workers=workers, progress=progress)
    result = image_cache.fill(sources.store, samples, sources.caps, workers=workers, progress=progress)
    bad = {sample_id for sample_id, _ in result.bad}
    return [s for s in samples if s.id not in bad], result.bad


def image_sources(cache: str | None, root: Path, data_config: dict[str, Any], crop_scale: float, *,
                  workers: int = 1) -> ImageSources:
    """The run's :class:`ImageSources`: ``cache`` is None (decode each time), ``"ram"`` or a folder."""
    image_cache.check_cache_option(cache)
    eval_cap = image_cache.eval_cap(eval_transform(data_config)) or KEEP_SIZE
    train_cap = image_cache.train_cap(int(data_config["input_size"][-1]), crop_scale, data_config["interpolation"])
    store = image_cache.open_store(cache, root) if cache is not None else None
    return ImageSources(train_cap, eval_cap, store, workers)


def expected_data_config(cfg) -> dict[str, Any] | None:
    """The data config ``cfg``'s model will have, from timm's pretrained config alone (no model built),
    or None where timm has none for the name."""
    import timm

    from zoo.backbones import data_config

    try:
        pretrained = timm.models.get_pretrained_cfg(cfg.backbone) or timm.models.get_pretrained_cfg(cfg.backbone.split(".")[0])
    except RuntimeError:  # an unknown tag: the model factory reports it later
        return None
    if pretrained is None:
        return None
    return data_config(SimpleNamespace(pretrained_cfg=pretrained.to_dict()), cfg.data_overrides())


def check_images(cfg, root: Path, samples: Sequence[Sample], *, workers: int,
                 progress: Callable[[int, int], None] | None = None) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Decode every image once before training; return the good ones and (id, why) for the rest.

    With ``cfg.cache`` the decoded pixels go into the cache, so loaders (and the later folds of
    a cross-fit) do not decode them again. ``progress(done, total)`` is called as images are checked.
    """
    dcfg = expected_data_config(cfg) if cfg.cache is not None else None
    sources = image_sources(cfg.cache, root, dcfg, cfg.crop_scale, workers=workers) if dcfg is not None else None
    return check_through(sources, samples, workers=workers, progress=progress)
