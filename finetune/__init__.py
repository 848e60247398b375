"""Training one backbone: frozen stages, differential learning rates, the loop,
inference with test-time augmentation and the learning-rate range test.

Layer: beside ``ensemble``, above the ``zoo`` core, below ``zoo.pipeline`` and the CLI; it
imports neither ``ensemble`` nor anything above it. ``member.train_member`` trains one member
from its config (a linear probe, a cross-fit or a single run). ``config`` (with ``schedules``)
stays torch-free: the CLI reads its options at startup.
"""

from finetune.config import FinetuneConfig

__all__ = ["FinetuneConfig"]
