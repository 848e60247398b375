"""Linear-probe members: a frozen pretrained backbone with a fitted logistic-regression head.

``zoo finetune BACKBONE --data D --out RUN --linear-probe`` extracts every image's pooled
features once (timm ``forward_features``, then ``forward_head(pre_logits=True)``: exactly
what the final Linear sees, so EfficientNet's conv_head or ConvNeXt's head norm stay
part of the features), fits a multinomial logistic regression on them and puts its
weights into the timm classifier (``model.get_classifier()``). The run directory is an
ordinary one: ``zoo predict``, ``correlate``, ``ensemble fit`` and ``soup`` take it.

- The L2 strength is chosen by cross-validated log loss (``LogisticRegressionCV``) on the
  train split alone; the validation split is only predicted, never selected on. With
  ``--probe-views N`` each train image adds N augmented views (the train transform); the
  inner folds keep all views of one image together, so no image is on both sides.
- The fit sees standardised features; the head absorbs the standardisation exactly
  (``W' = W / scale``, ``b' = b - W' @ mean``), so plain timm reproduces scikit-learn's
  probabilities. With two classes scikit-learn fits one logit (log-odds of class 1): the
  head gets the rows ``[0, w]``, which give the same softmax.
- ``--folds K``: features are extracted once for the pool and the holdout, then one probe
  per fold is fitted, in the layout ``finetune.kfold`` writes (``fold-i`` runs,
  ``oof.safetensors``, the holdout mean in ``val.safetensors``, ``folds.json``).
- ``--head-init probe`` (LP-FT, Kumar et al. 2022): :func:`init_head_from_probe` fits the
  probe on a run's train split and copies it into the classifier before fine-tuning. A
  probe fitted on center crops is confident (cross-validation may pick C = 100), and the
  fine-tune trains on augmented images with a label-smoothed loss: copied as it is, the
  head's first steps send large gradients into the backbone (measured on ants and bees:
  first-epoch train loss 1.37 against 0.67 from a fresh head, and a worse model at the
  end). So LP-FT fits the probe on at least ``LPFT_VIEWS`` augmented views per image too,
  and scales the head by the one factor (at most 1) that minimises the training loss,
  label smoothing included, on those augmented views: the fine-tune starts at the
  minimum of its own loss along the probe's direction. (Mixup and CutMix targets are not
  modelled: with them the head starts somewhat more confident than their loss wants.)
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import timm
import torch

import zoo
from finetune import loaders
from finetune.config import FinetuneConfig
from finetune.engine import (Hardware, keep_cpu_heap, log_loss_and_accuracy, predict_logits, resolve_hardware,
                             seed_everything, stderr_log)
from zoo import atomic
from zoo.cpu import apply_budget, cpu_budget
from zoo.data import CLASS_ORDER, Sample, check_images, read_dataset, read_listing
from zoo.errors import UserInputError
from zoo.rundir import RunDir

# Inverse L2 strengths tried (on standardised features), strongest first; 10^-4 .. 10^2 in half decades.
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 13))
# LP-FT's probe sees at least this many augmented views of each train image: the fine-tune sees only augmented ones.
LPFT_VIEWS = 2


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


def smoothed_loss(logits: np.ndarray, labels: np.ndarray, label_smoothing: float) -> float:
    """The fine-tune's training loss (torch cross-entropy with label smoothing) of these logits."""
    return float(torch.nn.functional.cross_entropy(torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels),
                                                   label_smoothing=label_smoothing))


def head_scale(logits: np.ndarray, labels: np.ndarray, label_smoothing: float, smallest: float = 1e-3) -> float:
    """The factor s in [smallest, 1] minimising ``smoothed_loss(s * logits)``: the loss is convex in s, so one bounded search.

    Never above 1: the probe's L2 strength already chose how confident it may be on clean crops; the fine-tune's
    augmented images only ever ask for less.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    loss = lambda log_s: smoothed_loss(np.exp(log_s) * logits, labels, label_smoothing)  # noqa: E731
    result = minimize_scalar(loss, bounds=(np.log(smallest), 0.0), method="bounded", options={"xatol": 1e-4})
    if not result.success:
        raise RuntimeError(f"head scale search failed: {result.message}")
    # The bounded search never evaluates the bounds themselves; the minimum may sit on one (s = 1 when nothing shrinks).
    best = min([(result.fun, result.x), (loss(0.0), 0.0), (loss(np.log(smallest)), np.log(smallest))])
    return float(np.exp(best[1]))


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
    probe = fit_probe(train, model.get_classifier().out_features, cfg.seed)
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


# --------------------------------------------------------------------------- runs


@dataclass
class ProbeResult:
    run: RunDir
    summary: str  # the line `zoo finetune --linear-probe` prints
    scores: dict[str, dict[str, float]]


def linear_probe(cfg: FinetuneConfig, *, log=stderr_log) -> ProbeResult:
    """Fit a linear-probe run (``cfg.folds``: a cross-fit of K probes) into ``cfg.out``."""
    cfg.validate()
    run = RunDir(cfg.out)
    if run.is_run():
        raise UserInputError(f"{run.root}: already holds a run; a linear probe takes seconds: choose another --out")
    hardware = resolve_hardware(cfg.device, cfg.amp, cfg.channels_last)
    if hardware.device.type == "cpu":
        keep_cpu_heap()  # measured: feature extraction 2.5x faster on the CPU (no page faults on every batch)
    budget = cpu_budget(cfg.threads, cfg.workers, hardware.device.type)
    apply_budget(budget)
    log(budget.describe())
    return (probe_folds if cfg.folds else probe_single)(cfg, run, hardware, budget, log)


def readable(samples: Sequence[Sample], workers: int, log, where: str) -> tuple[list[Sample], list[tuple[str, str]]]:
    good, bad = check_images(samples, workers=workers)
    if bad:
        log(f"warning: skipped {len(bad)} unreadable {where} image(s) (listed in skipped_images.txt), e.g. {bad[0][0]}: {bad[0][1]}")
    return good, bad


def build_model(cfg: FinetuneConfig, num_classes: int):
    """The backbone with its fresh head, exactly as a fine-tune starts (``start_model``), checked to have a Linear head."""
    from finetune.run_config import start_model

    model, model_kwargs, start_hash, dcfg = start_model(cfg, num_classes)
    classifier_linear(model, cfg.backbone)
    return model, model_kwargs, start_hash, dcfg


def run_config(cfg: FinetuneConfig, classes, model_kwargs, dcfg, start_hash, dataset_record: dict, probe: LinearProbe,
               hardware: Hardware, budget, extra: dict) -> dict:
    """config.json of a probe run: the keys a finetune run has that other commands read, plus a ``linear_probe`` record."""
    return {
        "backbone": cfg.backbone, "classes": classes, "class_order": CLASS_ORDER, "num_classes": len(classes),
        "data_config": dcfg, "model_kwargs": model_kwargs, "options": cfg.to_dict(), "dataset": dataset_record,
        "start_weights_sha256": start_hash, "weights_source": cfg.weights or ("hub" if cfg.pretrained else "random"),
        "linear_probe": {"C": probe.C_, "cv_log_loss": probe.cv_log_loss_, "feature_dim": int(probe.coef_.shape[1]),
                         "views_per_train_image": 1 + cfg.probe_views, "Cs": list(probe.Cs), **extra},
        "hardware": hardware.describe(), "cpu_budget": budget.to_dict(),
        "versions": {"zoo": zoo.__version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
    }


def write_probe_run(run: RunDir, config: dict, model, splits: dict[str, list[Sample]], val_logits: np.ndarray,
                    skipped: list[tuple[str, str]], extra_predictions: dict[str, tuple[list[Sample], np.ndarray]] | None = None
                    ) -> dict[str, float]:
    """Write one probe run directory (config, weights, splits, predictions, report, result); returns its val scores."""
    from finetune.checkpoints import save_weights, write_run_predictions

    run.root.mkdir(parents=True, exist_ok=True)
    atomic.write_json(run.config, config)
    atomic.write_json(run.splits, {s: [x.id for x in v] for s, v in splits.items() if s in ("train", "val")})
    if skipped:
        atomic.write_text(run.skipped_images, "".join(f"{sid}\t{why}\n" for sid, why in skipped))
    save_weights(run.model, model, {"backbone": config["backbone"], "classes": json.dumps(config["classes"]), "epoch": "0"})
    for split, (samples, logits) in {"val": (splits["val"], val_logits), **(extra_predictions or {})}.items():
        write_run_predictions(run, split, logits, [s.label for s in samples], [s.id for s in samples], config["classes"],
                              config["backbone"], report_epoch=0 if split == "val" else None)
    loss, accuracy = log_loss_and_accuracy(val_logits, np.array([s.label for s in splits["val"]]))
    atomic.write_json(run.result, {"status": "finished", "best_epoch": 0, "val_loss": loss, "val_accuracy": accuracy,
                                   "epochs_run": 0, "linear_probe": config["linear_probe"]})
    return {"log_loss": loss, "accuracy": accuracy, "images": len(splits["val"])}


def probe_single(cfg: FinetuneConfig, run: RunDir, hardware: Hardware, budget, log) -> ProbeResult:
    """One probe: fitted on the train split (C by inner CV there), the validation split predicted."""
    start = time.perf_counter()
    dataset = read_dataset(cfg.data, val_fraction=cfg.val_fraction, val_from_train=cfg.val_from_train, seed=cfg.seed,
                           allow_outside_root=cfg.allow_outside_root)
    for warning in dataset.warnings:
        log(f"warning: {warning}")
    splits, skipped = {}, []
    for split in ("train", "val"):
        splits[split], bad = readable(dataset.split(split), budget.share, log, split)
        skipped += bad
        if not splits[split]:
            raise UserInputError(f"{cfg.data}: no readable {split} images")
    classes = dataset.classes
    model, model_kwargs, start_hash, dcfg = build_model(cfg, len(classes))
    model.to(hardware.device)
    eval_tf = loaders.eval_transform(dcfg)
    val_features = pooled_features(model, splits["val"], eval_tf, hardware, batch_size=cfg.batch_size, workers=budget.workers)
    train = train_features(model, splits["train"], dcfg, cfg, hardware, budget.workers)
    extracted = time.perf_counter() - start
    probe = fit_probe(train, len(classes), cfg.seed)
    set_head(model, probe, cfg.backbone)
    seconds = time.perf_counter() - start
    record = {"root": str(dataset.root.resolve()), "kind": dataset.kind, "val_source": dataset.val_source,
              "counts": {s: len(v) for s, v in splits.items()}, "train_class_counts": dataset.class_counts("train"),
              "skipped": len(skipped)}
    config = run_config(cfg, classes, model_kwargs, dcfg, start_hash, record, probe, hardware, budget,
                        {"train_images": len(splits["train"]), "seconds_features": round(extracted, 2), "seconds": round(seconds, 2)})
    scores = write_probe_run(run, config, model, splits, probe.logits(val_features), skipped)
    views = f" x {1 + cfg.probe_views} views" if cfg.probe_views else ""
    log(f"linear probe of {cfg.backbone}: {len(splits['train'])} train images{views}, "
        f"{train.features.shape[1]} features; C {probe.C_:.3g} (CV log loss {probe.cv_log_loss_:.4f}); val log loss "
        f"{scores['log_loss']:.4f}, accuracy {scores['accuracy']:.4f}; {extracted:.1f}s features, {seconds - extracted:.1f}s fit")
    return ProbeResult(run, f"{run.root}\tlinear_probe\tC={probe.C_:.3g}\tval_loss={scores['log_loss']:.4f}\t"
                            f"val_accuracy={scores['accuracy']:.4f}\t{seconds:.1f}s", {"val": scores})


def probe_folds(cfg: FinetuneConfig, run: RunDir, hardware: Hardware, budget, log) -> ProbeResult:
    """K probes on the folds ``zoo finetune --folds`` uses (same ids, labels, K, seed: the same folds), features extracted once."""
    from finetune.kfold import write_cross_fit_parent, assemble
    from zoo.folds import assign_folds, pool_and_holdout

    start = time.perf_counter()
    listing = read_listing(cfg.data, allow_outside_root=cfg.allow_outside_root)
    listed_pool, listed_holdout = pool_and_holdout(listing, cfg.pool)
    # Folds are assigned on the listed ids, before any image is read, exactly as fine-tuned cross-fits do.
    folds = assign_folds([s.id for s in listed_pool], [s.label for s in listed_pool], cfg.folds, cfg.fold_seed)
    pool, skipped = readable(listed_pool, budget.share, log, "pool")
    holdout, bad = readable(listed_holdout, budget.share, log, "holdout")
    skipped += bad
    classes = listing.classes
    write_cross_fit_parent(run, cfg, classes, folds, holdout_split="val" if holdout else None)
    model, model_kwargs, start_hash, dcfg = build_model(cfg, len(classes))
    model.to(hardware.device)
    eval_tf = loaders.eval_transform(dcfg)
    center = pooled_features(model, pool, eval_tf, hardware, batch_size=cfg.batch_size, workers=budget.workers)
    held = pooled_features(model, holdout, eval_tf, hardware, batch_size=cfg.batch_size, workers=budget.workers) if holdout else None
    every = train_features(model, pool, dcfg, cfg, hardware, budget.workers, center=center)
    log(f"linear probes of {cfg.backbone}: features of {len(pool)} pool and {len(holdout)} holdout images in "
        f"{time.perf_counter() - start:.1f}s; fitting {cfg.folds} folds")
    fold_of = np.array([folds[s.id] for s in pool])
    for fold in range(1, cfg.folds + 1):
        train_rows = np.flatnonzero(fold_of[every.groups] != fold)
        train = TrainFeatures(every.features[train_rows], every.labels[train_rows], every.groups[train_rows])
        probe = fit_probe(train, len(classes), cfg.seed)
        set_head(model, probe, cfg.backbone)
        splits = {"train": [s for s in pool if folds[s.id] != fold], "val": [s for s in pool if folds[s.id] == fold]}
        record = {"root": str(listing.root.resolve()), "kind": listing.kind, "val_source": f"fold {fold} of {cfg.folds}",
                  "counts": {**{s: len(v) for s, v in splits.items()}, "holdout": len(holdout)},
                  "train_class_counts": [sum(1 for s in splits["train"] if s.label == c) for c in range(len(classes))],
                  "skipped": len(skipped)}
        fold_cfg = replace(cfg, out=str(run.fold_run(fold).root), fold=fold)
        config = run_config(fold_cfg, classes, model_kwargs, dcfg, start_hash, record, probe, hardware, budget,
                            {"train_images": len(splits["train"])})
        extra = {"holdout": (holdout, probe.logits(held))} if holdout else None
        scores = write_probe_run(run.fold_run(fold), config, model, splits, probe.logits(center[fold_of == fold]), skipped, extra)
        log(f"fold {fold}/{cfg.folds}: C {probe.C_:.3g}; held-out fold log loss {scores['log_loss']:.4f}, "
            f"accuracy {scores['accuracy']:.4f}")
    scores = assemble(run, cfg, folds, bool(holdout), log)
    seconds = time.perf_counter() - start
    line = "".join(f"\t{split}_log_loss={s['log_loss']:.4f}\t{split}_accuracy={s['accuracy']:.4f}" for split, s in scores.items())
    return ProbeResult(run, f"{run.root}\tlinear_probe\tfolds={cfg.folds}{line}\t{seconds:.1f}s", scores)
