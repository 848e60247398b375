"""The training step and epoch (``Trainer``), its loss, the weight average, and evaluation: the parts of
the loop that the loop (``finetune.train``), the benchmark and lr-find share.

The device and precision live in ``finetune.hardware`` and the random states in ``finetune.rng``;
their names are imported here too, where the loop's other users have always found them."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from finetune.hardware import Hardware, keep_cpu_heap, resolve_hardware
from finetune.rng import get_rng_state, seed_everything, set_rng_state
from zoo.predictions import log_loss_and_accuracy  # one definition, in the core (zoo predict model.onnx uses it without torch)
from zoo.progress import Progress, write as write_above_progress


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def create_ema(model: torch.nn.Module, decay: float):
    """timm's ModelEmaV3 with its warmup: the decay at update k is min(decay, 1 - (1 + k)^(-2/3)).

    Without it a per-step decay of 0.998 over the ~36 updates of a small dataset leaves the
    average about 93% at the starting weights; with it the average follows the model early
    and settles to ``decay`` once there are hundreds of updates.
    """
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross entropy against soft targets (smoothed or mixed labels), optionally class-weighted.

    With weights it is ``sum(w_i * loss_i) / sum(w_i)`` with ``w_i`` the target-weighted
    class weight, as torch's weighted cross entropy.
    """
    per_sample = -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    if class_weights is None:
        return per_sample.mean()
    w = targets @ class_weights
    return (per_sample * w).sum() / w.sum()


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_log_probs: torch.Tensor, hard_targets: torch.Tensor,
                      *, alpha: float, temperature: float, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha`` x the hard-label loss + (1 - ``alpha``) x T^2 x KL(teacher at T || student at T), T = ``temperature``.

    The hard-label loss is the plain fine-tuning loss (``soft_cross_entropy`` of ``hard_targets``: the smoothed
    one-hot labels) over the labelled rows (``labels`` >= 0; unlabelled images have the teacher's term alone);
    alpha = 1 is exactly that loss. The teacher's log-probabilities and the student's logits are both divided by
    T before the softmax, and T^2 keeps the soft term's gradients at the scale of the hard one (Hinton et al. 2015).
    """
    labelled = labels >= 0
    hard = soft_cross_entropy(logits[labelled], hard_targets[labelled], class_weights) if bool(labelled.any()) \
        else logits.new_zeros(())
    if alpha == 1:
        return hard
    teacher = F.log_softmax(teacher_log_probs.float() / temperature, dim=1)
    student = F.log_softmax(logits.float() / temperature, dim=1)
    soft = F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2
    return alpha * hard + (1 - alpha) * soft if alpha > 0 else soft


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(
        1, labels.unsqueeze(1), 1.0 - smoothing + off)


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float
    updates: int
    stopped_at: "EpochProgress | None" = None  # set when a stop was requested mid-epoch
    loss_sum: float = 0.0  # over the whole epoch so far (a resumed part included): for reducing over ranks
    correct: int = 0
    seen: int = 0
    indices: list[int] = field(default_factory=list)  # dataset indices this process trained on this epoch

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class Trainer:
    """What one optimisation step needs; ``train_epoch`` runs the steps of one epoch."""

    model: torch.nn.Module  # what runs forward (possibly compiled or DDP-wrapped)
    optimizer: torch.optim.Optimizer
    scheduler: object | None  # a timm scheduler, stepped per update
    hardware: Hardware
    num_classes: int
    label_smoothing: float = 0.0
    class_weights: torch.Tensor | None = None
    mixup: Callable | None = None  # timm.data.Mixup
    accum_steps: int = 1
    clip_grad: float | None = None
    ema: object | None = None  # timm.utils.ModelEmaV3
    num_updates: int = 0
    # Distillation (soft targets in the batches): (alpha, temperature) of ``distillation_loss``. None: plain fine-tuning.
    distill: tuple[float, float] | None = None
    # Distributed: element-wise max of small int flags over ranks (Dist.max), called once per step so
    # that every rank stops, or reports a diverged loss, at the same step. None: one process.
    sync_flags: Callable[[list[int]], list[int]] | None = None
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self):
        self.scaler = torch.amp.GradScaler(self.hardware.device.type, enabled=self.hardware.needs_scaler)

    def _targets(self, images, labels):
        if self.mixup is not None:
            return self.mixup(images, labels)
        return images, smooth_one_hot(labels.clamp_min(0), self.num_classes, self.label_smoothing)  # -1: unlabelled, unused

    def loss(self, logits, labels, targets, teacher=None) -> torch.Tensor:
        """The training loss of one batch: the fine-tuning loss, or with ``teacher`` (log-probabilities) the distillation loss."""
        if teacher is None:
            return soft_cross_entropy(logits, targets, self.class_weights)
        alpha, temperature = self.distill
        return distillation_loss(logits, labels, teacher.to(logits.device), targets, alpha=alpha, temperature=temperature,
                                 class_weights=self.class_weights)

    def _backward(self, images, labels, step_batches: int, teacher=None):
        """Forward one batch and add its share (1/``step_batches``) of the step's gradient, through the grad scaler."""
        hw = self.hardware
        images = images.to(hw.device, non_blocking=True)
        labels = labels.to(hw.device, non_blocking=True)
        if hw.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        images, targets = self._targets(images, labels)
        with hw.autocast():
            logits = self.model(images)
        loss = self.loss(logits, labels, targets, teacher)
        self.scaler.scale(loss / step_batches).backward()
        return logits, labels, loss

    def _update(self) -> None:
        """One optimizer update from the gradients gathered so far: clip, step (scaled), schedule, EMA."""
        opt = self.optimizer
        if self.clip_grad is not None:
            self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"] if p.grad is not None], self.clip_grad)
        self.scaler.step(opt)
        self.scaler.update()
        opt.zero_grad(set_to_none=True)
        self.num_updates += 1
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.num_updates)
        if self.ema is not None:
            self.ema.update(getattr(self.model, "module", self.model), step=self.num_updates)

    def train_step(self, images, labels, teacher=None) -> float:
        """One update on one batch, exactly as a step of ``train_epoch`` (lr-find's step); returns its loss."""
        _, _, loss = self._backward(images, labels, 1, teacher)
        self._update()
        return loss.item()

    def train_epoch(self, batches: Iterable, progress=None, stop_requested: Callable[[], bool] = lambda: False,
                    resume_from: "EpochProgress | None" = None) -> "EpochStats":
        """Train over ``batches``; stop early, at a step boundary, when ``stop_requested()``.

        ``resume_from`` continues an epoch that was stopped part-way: its batches are
        drawn (so data order and augmentation match) but not trained on again, and the
        RNG states saved at the stop are restored before the next batch is drawn.
        Raises ``TrainingDiverged`` when the loss becomes NaN or infinite (checked every
        10 batches in one process, every step under torchrun).
        """
        model, opt, hw = self.model, self.optimizer, self.hardware
        done = resume_from or EpochProgress()
        loss_sum = torch.tensor(done.loss_sum, device=hw.device, dtype=torch.float64)
        correct = torch.tensor(done.correct, device=hw.device, dtype=torch.long)
        bad = torch.zeros((), device=hw.device, dtype=torch.bool)
        seen, start, updates = done.seen, time.perf_counter(), 0
        indices: list[torch.Tensor] = []
        n_batches = len(batches)
        ddp = _ddp_module(model)
        opt.zero_grad(set_to_none=True)
        iterator = iter(batches)
        for _ in range(done.batches):
            indices.append(_as_index(next(iterator)[2]))  # (images, labels, index[, teacher])
        if resume_from is not None and resume_from.rng is not None:
            set_rng_state(resume_from.rng)
        i = done.batches - 1
        for i, (images, labels, index, *teacher) in enumerate(iterator, start=done.batches):
            indices.append(_as_index(index))
            last_of_step = (i + 1) % self.accum_steps == 0 or i + 1 == n_batches
            if ddp is not None:  # all-reduce gradients on a step's last batch only
                ddp.require_backward_grad_sync = last_of_step
            # The mean over this step's batches: the epoch's last step may gather fewer than accum_steps.
            step_batches = min(self.accum_steps, n_batches - (i // self.accum_steps) * self.accum_steps)
            logits, labels, loss = self._backward(images, labels, step_batches, *teacher)
            if last_of_step:
                self._update()
                updates += 1
            loss_sum += loss.detach().double() * labels.shape[0]
            # An unlabeled image or a mixed view (label -1) counts against the teacher's top class.
            reference = labels if not teacher else torch.where(labels >= 0, labels, teacher[0].to(labels.device).argmax(1))
            correct += (logits.detach().argmax(1) == reference).sum()
            bad |= ~torch.isfinite(loss.detach())
            seen += labels.shape[0]
            every_10 = i % 10 == 9 or i + 1 == n_batches
            if progress is not None and every_10:
                running = loss_sum.item() / seen  # a sync every 10 batches, not every step
                progress(i + 1, n_batches, running, (seen - done.seen) / (time.perf_counter() - start))
            if self.sync_flags is None and every_10 and bool(bad.item()):
                raise TrainingDiverged(f"training loss became {loss_sum.item() / seen} by batch {i + 1} of {n_batches}")
            if last_of_step:
                stop = self._check_step(stop_requested, bad, loss_sum, seen, i, n_batches)
                if stop and i + 1 < n_batches:
                    return EpochStats(loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1), seen - done.seen,
                                      time.perf_counter() - start, updates,
                                      stopped_at=EpochProgress(i + 1, loss_sum.item(), correct.item(), seen, get_rng_state()),
                                      loss_sum=loss_sum.item(), correct=int(correct.item()), seen=seen,
                                      indices=_cat_indices(indices))
        total = loss_sum.item() / max(seen, 1)
        if self.sync_flags is None and not math.isfinite(total):
            raise TrainingDiverged(f"training loss became {total}")
        return EpochStats(total, correct.item() / max(seen, 1), seen - done.seen, time.perf_counter() - start, updates,
                          loss_sum=loss_sum.item(), correct=int(correct.item()), seen=seen, indices=_cat_indices(indices))

    def _check_step(self, stop_requested, bad: torch.Tensor, loss_sum: torch.Tensor, seen: int, i: int,
                    n_batches: int) -> bool:
        """At a step boundary: whether a stop was asked for.

        Under torchrun the stop request and "the loss became NaN or infinite" travel in
        one small all-reduce every step, so all ranks stop, or raise, at the same step
        and none waits forever for the others.
        """
        if self.sync_flags is None:
            return stop_requested()
        stop, diverged = self.sync_flags([int(stop_requested()), int(bad.item())])
        if diverged:
            value = loss_sum.item() / max(seen, 1)
            what = value if not math.isfinite(value) else "NaN or infinite on another rank"
            raise TrainingDiverged(f"training loss became {what} by batch {i + 1} of {n_batches}")
        return bool(stop)


def _ddp_module(model: torch.nn.Module):
    """The DistributedDataParallel module inside ``model`` (torch.compile wraps it), or None."""
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, torch.nn.parallel.DistributedDataParallel) else None


def _as_index(index) -> torch.Tensor:
    if index is None:
        return torch.zeros(0, dtype=torch.long)
    return torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()


def _cat_indices(parts: list[torch.Tensor]) -> list[int]:
    return torch.cat(parts).tolist() if parts else []


@dataclass
class EpochProgress:
    """How far an epoch got before a stop: enough to continue it exactly."""

    batches: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    rng: dict | None = None


@torch.no_grad()
def predict_logits(model: torch.nn.Module, batches: Iterable, hardware: Hardware,
                   views: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = (lambda x: x,),
                   progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32) and labels over ``batches``; with several views, log of the mean probability.
    ``progress`` (``zoo.progress``) advances by one per batch."""
    model.eval()
    out, labels_out = [], []
    for images, labels, _ in batches:
        images = images.to(hardware.device, non_blocking=True)
        if hardware.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with hardware.autocast():
            if len(views) == 1:
                logits = model(views[0](images)).float()
            else:
                probs = torch.stack([model(view(images)).float().softmax(1) for view in views]).mean(0)
                logits = probs.clamp_min(1e-12).log()
        out.append(logits.cpu())
        labels_out.append(labels)
        if progress is not None:
            progress.update(1)
    return torch.cat(out).numpy().astype(np.float32), torch.cat(labels_out).numpy().astype(np.int64)


def stderr_log(message: str) -> None:
    write_above_progress(message)  # stderr; above a progress bar that is open on the terminal


def quiet_log(message: str) -> None:
    """The log of processes that are not rank 0 under torchrun: rank 0 alone speaks."""


__all__ = ["Trainer", "EpochStats", "EpochProgress", "TrainingDiverged", "create_ema", "soft_cross_entropy", "smooth_one_hot",
           "predict_logits", "log_loss_and_accuracy", "stderr_log", "quiet_log", "Hardware", "keep_cpu_heap", "resolve_hardware",
           "get_rng_state", "seed_everything", "set_rng_state"]
