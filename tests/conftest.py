from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

try:
    import torch

    # With another process on a 2-core machine, two-thread timings turn erratic.
    torch.set_num_threads(1)
except ImportError:  # the ensemble tests run without torch
    pass


def make_image_folder(root: Path, classes=("ant", "bee", "cat"), per_class=(8, 4, 0), size=(40, 48), seed=0) -> Path:
    """A small image folder whose classes differ by colour, so a tiny model learns them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val", "test"), per_class):
        if n == 0:
            continue
        for ci, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 80, (*size, 3)).astype(np.uint8)
                pixels[..., ci % 3] += 150
                Image.fromarray(pixels).save(folder / f"{name}_{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")


def tiny_config(data, out, backbone="test_resnet", **overrides):
    from finetune.config import FinetuneConfig

    options = dict(backbone=backbone, data=str(data), out=str(out), pretrained=False, epochs=2, batch_size=8,
                   input_size=32, workers=0, threads=1, warmup_epochs=0.5, auto_augment="none", patience=0)
    options.update(overrides)
    return FinetuneConfig(**options)
