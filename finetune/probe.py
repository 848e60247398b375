"""Linear probes: a multinomial logistic regression fitted on a frozen pretrained backbone's pooled features.

Each image's pooled features are what the final Linear sees (timm ``forward_features``, then
``forward_head(pre_logits=True)``), so EfficientNet's conv_head or ConvNeXt's head norm stay part
of the features; the fitted weights go into the timm classifier (``model.get_classifier()``).

- The L2 strength is chosen by cross-validated log loss (``LogisticRegressionCV``) on the
  rows it is given. With augmented views of each image (``TrainFeatures``), the inner folds
  keep all views of one image together, so no image is on both sides.
- The fit sees standardised features; the head absorbs the standardisation exactly
  (``W' = W / scale``, ``b' = b - W' @ mean``), so plain timm reproduces scikit-learn's
  probabilities. With two classes scikit-learn fits one logit (log-odds of class 1): the
  head gets the rows ``[0, w]``, which give the same softmax.

Probe runs (``zoo finetune --linear-probe``) are written by ``finetune.probe_run``; LP-FT's
starting head (``--head-init probe``) is set up by ``finetune.lpft``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from finetune import loaders
from finetune.config import FinetuneConfig
from finetune.engine import Hardware, predict_logits, seed_everything
from zoo.data import Sample
from zoo.errors import UserInputError

# Inverse L2 strengths tried (on standardised features), strongest first; 10^-4 .. 10^2 in half decades.
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 13))


class LinearProbe:
    """Multinomial logistic regression on pooled features, L2 strength chosen by grouped CV log loss.

    After ``fit``: ``coef_`` [C, D] and ``intercept_`` [C] act on raw (unstandardised)
    features, in the timm classifier's layout; ``C_`` the chosen strength, ``cv_log_loss_``
    its mean inner-CV log loss (NaN when a class is too rare to cross-validate),
    ``estimator_`` the scikit-learn model on standardised features (``mean_``, ``scale_``).
    """

    def __init__(self, Cs: Sequence[float] = DEFAULT_CS, cv: int = 5, max_iter: int = 2000, seed: int = 0):
        self.Cs, self.cv, self.max_iter, self.seed = Cs, cv, max_iter, seed

    def fit(self, features: np.ndarray, labels: np.ndarray, num_classes: int, groups: np.ndarray | None = None) -> "LinearProbe":
        # Imported here: scikit-learn takes about a second, and every fine-tune imports this module (LP-FT) fitting or not.
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

        x, y = np.asarray(features, dtype=np.float64), np.asarray(labels, dtype=np.int64)
        if x.ndim != 2 or len(x) != len(y):
            raise ValueError(f"features: expected [N, D] with one label per row, got {x.shape} and {y.shape} labels")
        present = np.unique(y)
        if len(present) < 2:
            raise UserInputError(f"a linear probe needs train images of at least 2 classes, got only class {int(present[0])}")
        self.mean_ = x.mean(0)
        self.scale_ = x.std(0)
        self.scale_[self.scale_ < 1e-12] = 1.0  # a constant feature (dead channel) carries nothing; keep it finite
        z = (x - self.mean_) / self.scale_
        splits = self._splits(y, groups)
        with warnings.catch_warnings():
            # The weakest strengths of the grid may stop early, harmlessly: CV does not choose them when they over-fit.
            warnings.simplefilter("ignore", ConvergenceWarning)
            if splits is None:  # a class too rare for even 2 folds: no CV, a moderate fixed strength
                self.estimator_ = LogisticRegression(C=1.0, max_iter=self.max_iter).fit(z, y)
                self.C_, self.cv_log_loss_ = 1.0, float("nan")
            else:
                self.estimator_ = LogisticRegressionCV(Cs=list(self.Cs), cv=splits, scoring="neg_log_loss", l1_ratios=(0.0,),
                                                       max_iter=self.max_iter, use_legacy_attributes=False).fit(z, y)
                self.C_ = float(np.ravel(self.estimator_.C_)[0])
                scores = np.asarray(self.estimator_.scores_, dtype=np.float64)  # [folds, l1 ratios, Cs]
                self.cv_log_loss_ = float(-scores.mean(axis=0).max())
        coef, intercept = self.estimator_.coef_, self.estimator_.intercept_
        if len(self.estimator_.classes_) == 2:  # one logit, the log-odds of the second class
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
        weight = np.zeros((num_classes, x.shape[1]))
        bias = np.full(num_classes, float(intercept.min()) - 50.0)  # a class absent from training: ~e^-50 of the rest
        weight[self.estimator_.classes_] = coef / self.scale_
        bias[self.estimator_.classes_] = intercept - (coef / self.scale_) @ self.mean_
        self.coef_, self.intercept_, self.num_classes_ = weight, bias, num_classes
        return self

    def _splits(self, y: np.ndarray, groups: np.ndarray | None):
        from sklearn.model_selection import StratifiedGroupKFold

        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        per_class = [len(np.unique(groups[y == c])) for c in np.unique(y)]
        folds = min(self.cv, min(per_class))
        if folds < 2:
            return None
        return list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=self.seed).split(y, y, groups))

    def logits(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, dtype=np.float64) @ self.coef_.T + self.intercept_).astype(np.float32)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """scikit-learn's own probabilities, one column per class (0 for classes absent from training)."""
        p = np.zeros((len(features), self.num_classes_))
        p[:, self.estimator_.classes_] = self.estimator_.predict_proba((np.asarray(features, np.float64) - self.mean_) / self.scale_)
        return p


def classifier_linear(model: torch.nn.Module, backbone: str) -> torch.nn.Linear:
    """The model's final Linear (``get_classifier()``); refuses heads that are not one Linear layer."""
    head = model.get_classifier()
    if not isinstance(head, torch.nn.Linear) or head.bias is None:
        raise UserInputError(f"{backbone}: its classifier (get_classifier()) is {type(head).__name__}, not one Linear layer "
                             "with a bias; --linear-probe and --head-init probe need such a head: choose another backbone")
    return head


def set_head(model: torch.nn.Module, probe: LinearProbe, backbone: str, scale: float = 1.0) -> None:
    """Copy the probe's weights, times ``scale``, into the timm classifier."""
    head = classifier_linear(model, backbone)
    if tuple(head.weight.shape) != probe.coef_.shape:
        raise ValueError(f"probe: coefficients {probe.coef_.shape} do not fit the classifier {tuple(head.weight.shape)}")
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(probe.coef_ * scale).to(head.weight))
        head.bias.copy_(torch.from_numpy(probe.intercept_ * scale).to(head.bias))


class PooledFeatures(torch.nn.Module):
    """``model`` up to the input of its final Linear: what a probe is fitted on."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True).flatten(1)


def pooled_features(model: torch.nn.Module, samples: Sequence[Sample], transform, hardware: Hardware, *,
                    batch_size: int = 64, workers: int = 0) -> np.ndarray:
    """[N, D] float32: ``forward_head(forward_features(x), pre_logits=True)`` of each sample, in order."""
    if not samples:
        return np.zeros((0, 0), np.float32)
    loader = loaders.eval_loader(samples, transform, batch_size=batch_size, workers=workers,
                                 pin_memory=hardware.device.type == "cuda")
    features, _ = predict_logits(PooledFeatures(model), loader, hardware)  # the prediction loop, on features
    return features


@dataclass
class TrainFeatures:
    """The train rows a probe is fitted on: center crops, then ``views`` augmented copies of each image."""

    features: np.ndarray
    labels: np.ndarray
    groups: np.ndarray  # the image each row comes from (keeps its views in one CV fold)


def train_features(model, samples: Sequence[Sample], dcfg: dict, cfg: FinetuneConfig, hardware: Hardware, workers: int,
                   center: np.ndarray | None = None) -> TrainFeatures:
    """Center-crop features (``center`` if already extracted) plus ``cfg.probe_views`` augmented views per image."""
    n = len(samples)
    parts = [center if center is not None else pooled_features(model, samples, loaders.eval_transform(dcfg), hardware,
                                                               batch_size=cfg.batch_size, workers=workers)]
    if cfg.probe_views:
        seed_everything(cfg.seed)  # the views' random crops and flips are part of the result: make them reproducible
        augment = loaders.train_transform(dcfg, auto_augment=cfg.auto_augment, crop_scale=cfg.crop_scale, hflip=cfg.hflip)
        for _ in range(cfg.probe_views):
            parts.append(pooled_features(model, samples, augment, hardware, batch_size=cfg.batch_size, workers=workers))
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return TrainFeatures(np.concatenate(parts), np.tile(labels, len(parts)), np.tile(np.arange(n), len(parts)))


def fit_probe(train: TrainFeatures, num_classes: int, seed: int) -> LinearProbe:
    return LinearProbe(seed=seed).fit(train.features, train.labels, num_classes, groups=train.groups)
