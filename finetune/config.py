"""Every option of a fine-tuning run, its default and its help: the one place for each.

The CLI builds ``zoo finetune``'s options from these fields, and ``config.json``
records them. Defaults are a fine-tuning recipe for a pretrained backbone on a small
or medium dataset (AdamW, a short warmup then cosine, the stem and first stage frozen,
lower rates toward the stem), not timm train.py's ImageNet-from-scratch defaults.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from finetune.schedules import SCHEDULE_REGISTRY

OPTIMIZERS = {"adamw": "AdamW (decoupled weight decay)", "sgd": "SGD with Nesterov momentum 0.9"}
SCHEDULES = {name: info.help for name, info in SCHEDULE_REGISTRY.items()}  # --schedule's choices and their help
BALANCE = {"none": "plain loss", "loss": "loss weights 1/sqrt(class count), normalised to mean 1",
           "sampler": "sample each class equally often"}
POOLS = {"train": "train/ only; val/ stays the untouched holdout", "train+val": "train/ and val/ (no holdout left)"}
MONITORS = {"loss": "validation log loss (lower is better)", "accuracy": "validation accuracy (higher is better)"}
HEAD_INITS = {"random": "small random weights (std 0.01), zero bias",
              "probe": "a linear probe fitted on the train split's frozen features (LP-FT)"}


def option(default: Any, help: str, **cli: Any):
    """A config field with its help text (and click extras such as ``choices``)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class FinetuneConfig:
    backbone: str = option("", "timm model name, e.g. convnext_tiny.fb_in22k", cli=False)
    data: str = option("", "image folder (train/<class>/...) or CSV path,label[,split]", cli=False)
    out: str = option("", "run directory to write", cli=False)

    # Weights.
    weights: str | None = option(None, "local weights file (.safetensors or torch state dict) instead of the hub")
    pretrained: bool = option(True, "start from pretrained weights (hub or --weights); --no-pretrained for random init")

    # Length and batch.
    epochs: int = option(10, "maximum number of epochs")
    batch_size: int = option(32, "images per optimizer step (before --accum-steps)")
    accum_steps: int = option(1, "accumulate gradients over this many batches per step")
    patience: int | None = option(5, "stop after this many epochs without improving --monitor (0: never)")
    monitor: str = option("loss", "validation metric that picks the best epoch", choices=MONITORS)

    # Frozen stages and learning rates.
    freeze: int = option(2, "freeze the first N stage groups (stem, then stages) as timm's group_matcher defines them")
    unfreeze_at: int | None = option(None, "from this epoch on, unfreeze one more group per epoch, last frozen first (ULMFiT)")
    lr: float = option(1e-3, "learning rate of the head")
    layer_decay: float = option(0.75, "each stage group below the head trains at this fraction of the one above")
    backbone_lr_mult: float = option(1.0, "extra multiplier on every backbone group's rate (e.g. 0.1)")
    optimizer: str = option("adamw", "optimizer", choices=OPTIMIZERS)
    weight_decay: float = option(0.05, "weight decay (not on norms and biases)")
    schedule: str = option("cosine", "learning-rate schedule", choices=SCHEDULES)
    warmup_epochs: float = option(1.0, "linear warmup length in epochs (before the schedule's peak)")
    min_lr_ratio: float = option(0.01, "cosine ends at this fraction of each group's rate")
    restarts: int = option(0, "cosine restarts (SGDR): the epochs are split into restarts+1 cycles")
    snapshots: bool = option(False, "with --restarts R: keep the model at the end of each of the R+1 cosine cycles as "
                                    "RUN/snapshot-1 ... (snapshot ensemble: R+1 members for the cost of one run)")
    clip_grad: float | None = option(None, "clip the gradient norm to this value")

    # Regularisation and augmentation (timm's transforms).
    label_smoothing: float = option(0.1, "label smoothing of the training loss")
    auto_augment: str = option("rand-m7-mstd0.5-inc1", "timm auto-augment policy ('none' to turn off)")
    crop_scale: float = option(0.35, "smallest area fraction of the random resized crop")
    hflip: float = option(0.5, "horizontal flip probability")
    mixup: float = option(0.0, "mixup alpha (0: off)")
    cutmix: float = option(0.0, "cutmix alpha (0: off)")
    drop_path: float | None = option(None, "stochastic depth rate (model default if unset)")
    model_kwargs: str | None = option(None, "extra timm.create_model arguments as JSON, e.g. '{\"patch_size\": 8}'")
    ema: bool = option(False, "keep an exponential moving average of the weights and evaluate it")
    ema_decay: float = option(0.998, "EMA decay per step")
    balance: str = option("none", "class imbalance handling", choices=BALANCE)

    # Data.
    val_fraction: float = option(0.2, "validation fraction taken from train when there is no val split")
    val_from_train: bool = option(False, "take validation from train even if val/ exists (val/ then becomes the test set)")
    input_size: int | None = option(None, "input size (default: the model's pretrained config)")
    mean: tuple[float, float, float] | None = option(None, "normalisation mean, 3 values (default: the model's)")
    std: tuple[float, float, float] | None = option(None, "normalisation std, 3 values (default: the model's)")
    interpolation: str | None = option(None, "resize interpolation (default: the model's)", choices={"bilinear": "", "bicubic": "", "nearest": ""})
    crop_pct: float | None = option(None, "eval center-crop fraction (default: the model's)")
    allow_outside_root: bool = option(False, "allow CSV paths outside the CSV's folder")
    exclude: str | None = option(None, "file of sample ids to leave out of training and validation (every fold of a "
                                       "cross-fit), e.g. reviewed `zoo label-issues` output: a CSV with an id column, or one "
                                       "id per line; the ids are recorded in config.json")
    cache: str | None = option(None, "decoded-image cache: 'ram' (this process: the folds of --folds share it) or a folder "
                                     "(memory-mapped, shared by every run that names it); each image is decoded and resized "
                                     "once, augmentations still run every epoch; the batches are the same as without it")
    workers: int | None = option(None, "data-loading processes (default: from the CPU budget: the cores no other process keeps "
                                       "busy; 0 on the CPU with 1-2 of them, up to 8 on a GPU)")
    threads: int | None = option(None, "torch CPU threads (default: OMP_NUM_THREADS where set, else the cores no other "
                                       "process keeps busy less the data-loading processes; printed with the run's settings)")

    # Linear probes (finetune/probe.py; their runs: finetune/probe_run.py): a logistic-regression head on frozen pooled features.
    linear_probe: bool = option(False, "freeze the whole backbone and fit only the head, as a logistic regression on pooled "
                                       "features with its L2 strength chosen by cross-validated log loss (seconds, no epochs)")
    probe_views: int = option(0, "linear probe: also fit on N augmented views (train transform) of each train image "
                                    "(--head-init probe: at least 2)")
    head_init: str = option("random", "how the new head starts before fine-tuning", choices=HEAD_INITS)

    # Distillation (``zoo distill``; finetune/views.py): set by the pipeline, recorded in config.json.
    distill: dict | None = option(None, "a distillation's student: alpha (weight of the hard labels), temperature, views, "
                                        "teacher mode, the ensemble file and its sha256, the unlabeled folders", cli=False)

    # Cross-fitting: K fold models whose out-of-fold predictions the ensemble is fitted on.
    folds: int | None = option(None, "cross-fit: train K fold models, fold i held out of model i's training and used to pick "
                                     "its epoch; writes out-of-fold predictions of every pool image (K >= 2)")
    fold: int | None = option(None, "with --folds: train fold I alone (1..K), e.g. one GPU or Slurm array task per fold")
    fold_seed: int = option(0, "seed of the fold assignment; keep it (and the data) the same for every member of an ensemble")
    pool: str = option("train", "with --folds: the images the folds split", choices=POOLS)

    # Hardware and reproducibility.
    device: str | None = option(None, "cuda, cpu, cuda:1 ... (default: cuda when present)")
    amp: bool | None = option(None, "mixed precision (default: on with CUDA; bf16 where supported, else fp16)")
    channels_last: bool | None = option(None, "channels-last memory format (default: on with CUDA)")
    compile: bool = option(False, "torch.compile the model")
    sync_bn: bool = option(False, "under torchrun on GPUs: BatchNorm statistics over all processes' batches (SyncBatchNorm); "
                                  "helps when each GPU's batch is small")
    scale_lr: bool = option(False, "under torchrun: multiply --lr by the number of processes (linear scaling rule: N processes "
                                   "make each step's batch N times larger); without it --lr is used as given")
    mlflow: bool | None = option(None, "log the options, every epoch's metrics and the run's files to MLflow (where "
                                       "MLFLOW_TRACKING_URI points; default: on when it is set); TensorBoard event files "
                                       "go to RUN/tb whenever tensorboard is installed")
    seed: int = option(0, "random seed (data order, augmentation, head init, validation split)")
    resume: bool = option(False, "continue the run in --out where it stopped (mid-epoch after Ctrl-C/SIGTERM), with its saved options")

    def cycle_epochs(self) -> int:
        """Epochs per cosine cycle when cycles end at epoch ends (what --snapshots needs), else 0."""
        after_warmup = self.epochs - self.warmup_epochs
        if self.schedule != "cosine" or after_warmup <= 0 or after_warmup != int(after_warmup) or after_warmup % (self.restarts + 1):
            return 0
        return int(after_warmup) // (self.restarts + 1)

    def snapshot_at(self, epoch: int) -> int:
        """The snapshot (1..restarts+1) taken after ``epoch`` (1-based), or 0 for none."""
        cycle = self.cycle_epochs() if self.snapshots else 0
        after_warmup = epoch - int(self.warmup_epochs)
        return after_warmup // cycle if cycle and after_warmup > 0 and after_warmup % cycle == 0 else 0

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for timm.create_model beyond the name and head."""
        import json

        kwargs = json.loads(self.model_kwargs) if self.model_kwargs else {}
        if self.input_size is not None and "img_size" not in kwargs:
            from zoo.backbones import needs_img_size

            # ViT-style models are built for one input size: build them for the asked one.
            if needs_img_size(self.backbone):
                kwargs["img_size"] = self.input_size
        if self.drop_path is not None:
            kwargs["drop_path_rate"] = self.drop_path
        return kwargs

    def data_overrides(self) -> dict[str, Any]:
        """The data-config values the user set (None: the model's pretrained config decides)."""
        return {"input_size": self.input_size, "mean": self.mean, "std": self.std,
                "interpolation": self.interpolation, "crop_pct": self.crop_pct}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FinetuneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names})

    def validate(self) -> "FinetuneConfig":
        """Refuse, in one line naming the option, values of the wrong type or out of range, and contradicting options."""
        from zoo.errors import UserInputError

        self._check_types()
        checks = [
            (self.epochs >= 1, "--epochs", "at least 1", self.epochs),
            (self.batch_size >= 1, "--batch-size", "at least 1", self.batch_size),
            (self.accum_steps >= 1, "--accum-steps", "at least 1", self.accum_steps),
            (self.freeze >= 0, "--freeze", "0 or more", self.freeze),
            (self.lr > 0, "--lr", "a positive number", self.lr),
            (0 < self.layer_decay <= 1, "--layer-decay", "in (0, 1]", self.layer_decay),
            (self.backbone_lr_mult > 0, "--backbone-lr-mult", "a positive number", self.backbone_lr_mult),
            (self.weight_decay >= 0, "--weight-decay", "0 or more", self.weight_decay),
            (self.warmup_epochs >= 0, "--warmup-epochs", "0 or more", self.warmup_epochs),
            (0 <= self.min_lr_ratio <= 1, "--min-lr-ratio", "in [0, 1]", self.min_lr_ratio),
            (self.restarts >= 0, "--restarts", "0 or more", self.restarts),
            (0 <= self.label_smoothing < 1, "--label-smoothing", "in [0, 1)", self.label_smoothing),
            (0 < self.crop_scale <= 1, "--crop-scale", "in (0, 1]", self.crop_scale),
            (0 < self.ema_decay < 1, "--ema-decay", "in (0, 1)", self.ema_decay),
            (self.patience is None or self.patience >= 0, "--patience", "0 or more", self.patience),
            (self.unfreeze_at is None or self.unfreeze_at >= 0, "--unfreeze-at", "an epoch, 0 or more", self.unfreeze_at),
            (self.optimizer in OPTIMIZERS, "--optimizer", f"one of {list(OPTIMIZERS)}", self.optimizer),
            (self.schedule in SCHEDULES, "--schedule", f"one of {list(SCHEDULES)}", self.schedule),
            (self.balance in BALANCE, "--balance", f"one of {list(BALANCE)}", self.balance),
            (self.monitor in MONITORS, "--monitor", f"one of {list(MONITORS)}", self.monitor),
            (self.input_size is None or self.input_size >= 8, "--input-size", "a size in pixels, 8 or more", self.input_size),
            (self.std is None or min(self.std) > 0, "--std", "3 positive numbers (images are divided by it)", self.std),
            (self.crop_pct is None or 0 < self.crop_pct <= 1, "--crop-pct", "in (0, 1]", self.crop_pct),
            (0 < self.val_fraction < 1, "--val-fraction", "in (0, 1)", self.val_fraction),
        ]
        for ok, name, expected, got in checks:
            if not ok:
                raise UserInputError(f"{name} must be {expected}, got {got!r}")
        if self.folds is not None and self.folds < 2:
            raise UserInputError(f"--folds must be 2 or more, got {self.folds}")
        if self.fold is not None and (self.folds is None or not 1 <= self.fold <= self.folds):
            raise UserInputError(f"--fold must be between 1 and --folds ({self.folds}), got {self.fold}" if self.folds
                                 else f"--fold {self.fold} needs --folds K (the number of folds)")
        if self.folds is None and self.pool != "train":
            raise UserInputError(f"--pool {self.pool} needs --folds K: without folds there is nothing to pool")
        if self.folds is not None and self.val_from_train:
            raise UserInputError("--val-from-train has no effect with --folds (each fold is its model's validation); drop it")
        if self.snapshots and (self.restarts < 1 or self.schedule != "cosine"):
            raise UserInputError(f"--snapshots needs --restarts R >= 1 with the cosine schedule (R+1 cycles, a snapshot at "
                                 f"the end of each), got --restarts {self.restarts} --schedule {self.schedule}")
        if self.snapshots and not self.cycle_epochs():
            whole = int(-(-self.warmup_epochs // 1))
            cycles = self.restarts + 1
            suggestion = whole + cycles * max(1, -(-(self.epochs - whole) // cycles))
            raise UserInputError(f"--snapshots needs cycles that end at epoch ends: --epochs minus --warmup-epochs must be a "
                                 f"whole multiple of --restarts + 1 ({cycles}), got {self.epochs} - {self.warmup_epochs:g}; "
                                 f"e.g. --epochs {suggestion} --warmup-epochs {whole}")
        if self.probe_views < 0:
            raise UserInputError(f"--probe-views must be 0 or more, got {self.probe_views}")
        if self.linear_probe and self.head_init == "probe":
            raise UserInputError("--head-init probe starts a fine-tune from a probe; with --linear-probe the probe is the "
                                 "whole run: drop one of them")
        if self.linear_probe and self.fold is not None:
            raise UserInputError(f"--fold {self.fold}: a linear-probe cross-fit fits all --folds in seconds, from features "
                                 "extracted once; drop --fold")
        if self.linear_probe and self.resume:
            raise UserInputError("--linear-probe runs have no resume state (they take seconds): run the command again "
                                 "with another --out")
        if self.distill is not None:
            self._check_distill()
        if self.pool not in POOLS:
            raise UserInputError(f"--pool must be one of {list(POOLS)}, got {self.pool!r}")
        if self.model_kwargs is not None:
            import json

            try:
                parsed = json.loads(self.model_kwargs)
            except json.JSONDecodeError as e:
                raise UserInputError(f"--model-kwargs must be a JSON object, got {self.model_kwargs!r} ({e})") from None
            if not isinstance(parsed, dict):
                raise UserInputError(f"--model-kwargs must be a JSON object, got {self.model_kwargs!r}")
        if self.weights is not None and not self.pretrained and not self.resume:
            # create_backbone loads --weights whatever --no-pretrained says: the pair would train from the file.
            raise UserInputError(f"--no-pretrained and --weights {self.weights} contradict each other: --weights loads that "
                                 "file as the starting weights; drop --weights for a random start, or --no-pretrained")
        if not self.backbone:
            raise UserInputError("a backbone name is required, e.g. `zoo finetune resnet50 --data DIR --out RUN`")
        return self

    def _check_distill(self) -> None:
        from zoo.errors import UserInputError

        d = self.distill
        if not isinstance(d.get("alpha"), (int, float)) or not 0 <= d["alpha"] <= 1:
            raise UserInputError(f"--alpha must be in [0, 1] (the hard labels' weight), got {d.get('alpha')!r}")
        if not isinstance(d.get("temperature"), (int, float)) or not d["temperature"] > 0:
            raise UserInputError(f"--temperature must be a positive number, got {d.get('temperature')!r}")
        if not isinstance(d.get("views"), int) or d["views"] < 1:
            raise UserInputError(f"--views must be 1 or more (view 0 is the centre crop), got {d.get('views')!r}")
        for bad, name in ((self.mixup > 0 or self.cutmix > 0, "--mixup/--cutmix"), (self.balance == "sampler", "--balance sampler"),
                          (self.folds is not None, "--folds"), (self.linear_probe, "--linear-probe"), (self.snapshots, "--snapshots")):
            if bad:
                raise UserInputError(f"{name} does not go with distillation (a student trains on its teacher's outputs for "
                                     "fixed views of each image, for a fixed schedule); drop it")

    def _check_types(self) -> None:
        """Each value has its field's type (a zoo file or the Python API can pass anything; click already checks)."""
        from zoo.errors import UserInputError

        for f in dataclasses.fields(self):
            expected = self.wrong_type(f.name, getattr(self, f.name))
            if expected:
                raise UserInputError(f"--{f.name.replace('_', '-')} must be {expected}, got {getattr(self, f.name)!r}")

    @classmethod
    def wrong_type(cls, name: str, value: Any) -> str | None:
        """What option ``name`` takes, in words, when ``value`` is not of its type; None when it is."""
        expected = typing.get_type_hints(cls)[name]
        return None if _has_type(value, expected) else _type_words(expected)

    def warnings(self) -> list[str]:
        """Options that run but do less than they say: one line each, logged when training starts."""
        lines = []
        if self.warmup_epochs > self.epochs:
            lines.append(f"warning: --warmup-epochs {self.warmup_epochs:g} is longer than --epochs {self.epochs}: the "
                         f"learning rate never reaches --lr {self.lr:g} (and no {self.schedule} phase follows); "
                         f"shorten the warmup or train longer")
        return lines


# Options that change where or how fast a run goes, not what it learns: they may differ
# between the command that started a run and one that continues it.
NOT_RESULT_OPTIONS = frozenset({"out", "resume", "fold", "workers", "device", "threads", "cache", "mlflow"})


def check_resume_options(given: FinetuneConfig, saved: FinetuneConfig, where) -> None:
    """Refuse options given with ``--resume`` that the saved run was not started with: it continues with its
    own, so an --epochs 5 here would be silently ignored."""
    from pathlib import Path

    from zoo.errors import UserInputError

    default = FinetuneConfig()
    asked = []
    for f in dataclasses.fields(FinetuneConfig):
        value, kept = getattr(given, f.name), getattr(saved, f.name)
        if f.name in NOT_RESULT_OPTIONS or value == getattr(default, f.name) or value == kept:
            continue
        if f.name == "data" and Path(value).resolve() == Path(kept).resolve():
            continue
        name = "BACKBONE" if f.name == "backbone" else f"--{f.name.replace('_', '-')}"
        asked.append(f"{name} {value!r} (started with {kept!r})")
    if asked:
        raise UserInputError(f"{where}: --resume continues the run with the options it was started with, but this command "
                             f"also asks for {'; '.join(asked)}; drop them, or start a new run with another --out")


def _has_type(value: Any, expected: Any) -> bool:
    if isinstance(expected, types.UnionType):
        return any(_has_type(value, t) for t in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if expected is str:
        return isinstance(value, str)
    if typing.get_origin(expected) is tuple:
        items = typing.get_args(expected)
        return (isinstance(value, (tuple, list)) and len(value) == len(items)
                and all(_has_type(v, t) for v, t in zip(value, items)))
    return True


def _type_words(expected: Any) -> str:
    if isinstance(expected, types.UnionType):
        return " or ".join(_type_words(t) for t in typing.get_args(expected))
    if typing.get_origin(expected) is tuple:
        return f"{len(typing.get_args(expected))} numbers"
    return {bool: "true or false", int: "a whole number", float: "a finite number", str: "text",
            type(None): "unset"}.get(expected, str(expected))
