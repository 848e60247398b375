"""LP-FT's starting head (``--head-init probe``, Kumar et al. 2022): a linear probe copied into the classifier.

:func:`init_head_from_probe` fits the probe (``finetune.probe``) on a run's train split and
copies it into the classifier before fine-tuning. A probe fitted on center crops is
confident (cross-validation may pick C = 100), and the fine-tune trains on augmented images
with a label-smoothed loss: copied as it is, the head's first steps send large gradients
into the backbone (measured on ants and bees: first-epoch train loss 1.37 against 0.67 from
a fresh head, and a worse model at the end). So LP-FT fits the probe on at least
``LPFT_VIEWS`` augmented views per image too, and scales the head by the one factor (at
most 1) that minimises the training loss, label smoothing included, on those augmented
views: the fine-tune starts at the minimum of its own loss along the probe's direction.
(Mixup and CutMix targets are not modelled: with them the head starts somewhat more
confident than their loss wants.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from finetune.config import FinetuneConfig
from finetune.engine import Hardware
from finetune.probe import LinearProbe, classifier_linear, fit_probe, set_head, train_features
from zoo.data import Sample

# LP-FT's probe sees at least this many augmented views of each train image: the fine-tune sees only augmented ones.
LPFT_VIEWS = 2


def smoothed_loss(logits: np.ndarray, labels: np.ndarray, label_smoothing: float) -> float:
    """The fine-tune's training loss (torch cross-entropy with label smoothing) of these logits."""
    return float(torch.nn.functional.cross_entropy(torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels),
                                                   label_smoothing=label_smoothing))


def head_scale(logits: np.ndarray, labels: np.ndarray, label_smoothing: float, smallest: float = 1e-3) -> float:
    """The factor s in [smallest, 1] minimising ``smoothed_loss(s * logits)``: the loss is convex in s, so one bounded search.

    Never above 1: the probe's L2 strength already chose how confident it may be on clean crops; the fine-tune's
    augmented images only ever ask for less.
    """
    from scipy.optimize import minimize_scalar  # here, not at the top: only --head-init probe needs scipy's import time

    logits = np.asarray(logits, dtype=np.float64)
    loss = lambda log_s: smoothed_loss(np.exp(log_s) * logits, labels, label_smoothing)  # noqa: E731
    result = minimize_scalar(loss, bounds=(np.log(smallest), 0.0), method="bounded", options={"xatol": 1e-4})
    if not result.success:
        raise RuntimeError(f"head scale search failed: {result.message}")
    # The bounded search never evaluates the bounds themselves; the minimum may sit on one (s = 1 when nothing shrinks).
    best = min([(result.fun, result.x), (loss(0.0), 0.0), (loss(np.log(smallest)), np.log(smallest))])
    return float(np.exp(best[1]))


@dataclass
class HeadInit:
    """What ``--head-init probe`` put into the classifier: ``scale`` times ``probe``'s weights."""

    probe: LinearProbe
    scale: float
    loss_before: float  # the smoothed training loss on the augmented views, unscaled probe
    loss_after: float  # the same, scaled
    views: int


def fit_head_init(model: torch.nn.Module, samples: Sequence[Sample], dcfg: dict, cfg: FinetuneConfig,
                  hardware: Hardware, workers: int) -> HeadInit:
    """LP-FT's head: a probe on center crops plus augmented views of ``samples``, scaled to the fine-tune's own loss."""
    views = max(cfg.probe_views, LPFT_VIEWS)
    model.to(hardware.device)
    train = train_features(model, samples, dcfg, replace(cfg, probe_views=views), hardware, workers)
    probe = fit_probe(train, model.get_classifier().out_features, cfg.seed, device=hardware.device)
    augmented = slice(len(samples), None)  # the rows after the center crops
    logits, labels = probe.logits(train.features[augmented]), train.labels[augmented]
    scale = head_scale(logits, labels, cfg.label_smoothing)
    return HeadInit(probe, scale, smoothed_loss(logits, labels, cfg.label_smoothing),
                    smoothed_loss(scale * logits, labels, cfg.label_smoothing), views)


def init_head_from_probe(model: torch.nn.Module, samples: Sequence[Sample], dcfg: dict, cfg: FinetuneConfig,
                         hardware: Hardware, workers: int) -> str:
    """LP-FT: fit the head (:func:`fit_head_init`) and copy it into the classifier; a line for the log."""
    classifier_linear(model, cfg.backbone)
    start = time.perf_counter()
    init = fit_head_init(model, samples, dcfg, cfg, hardware, workers)
    set_head(model, init.probe, cfg.backbone, init.scale)
    return (f"--head-init probe: classifier set to a linear probe on {len(samples)} train images x {1 + init.views} views "
            f"(C {init.probe.C_:.3g}, CV log loss {init.probe.cv_log_loss_:.4f}), scaled x{init.scale:.3g} to the "
            f"training loss on augmented views ({init.loss_before:.4f} -> {init.loss_after:.4f}) in "
            f"{time.perf_counter() - start:.1f}s")
