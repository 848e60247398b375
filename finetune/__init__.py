"""Training one backbone: frozen stages, differential learning rates, the loop,
inference with test-time augmentation and the learning-rate range test."""

from finetune.config import FinetuneConfig

__all__ = ["FinetuneConfig"]
