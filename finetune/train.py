"""``finetune``: train one backbone on one dataset and write its run directory.

Read top to bottom: data, model, frozen stages and learning rates, optimizer and
schedule, then the epoch loop (train, evaluate, keep the best, save resume state,
stop early). Only rank 0 writes files when run under ``torchrun``.
"""

from __future__ import annotations

import json
import platform
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch

import zoo
from finetune import loaders
from finetune.config import FinetuneConfig
from finetune.engine import (EpochProgress, Hardware, Trainer, TrainingDiverged, log_loss_and_accuracy,
                             predict_logits, resolve_hardware, seed_everything, stderr_log)
from finetune.freeze import count_parameters, freeze_stages, frozen_group_count, set_train_mode
from finetune.optim import create_optimizer, create_schedule, current_rates, group_lr_scales
from finetune.report import format_report, plot_metrics, write_best_epoch_report, write_metrics
from zoo import atomic
from zoo.backbones import create_backbone, data_config, stage_groups, state_dict_hash
from zoo.data import CLASS_ORDER, Dataset, check_images, read_dataset
from zoo.errors import UserInputError
from zoo.predictions import Predictions, write_predictions
from zoo.rundir import RunDir


@dataclass
class FinetuneResult:
    run: RunDir
    best_epoch: int
    best_val_loss: float
    best_val_accuracy: float
    epochs_run: int
    stopped: str  # finished | early-stopped | interrupted


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it at step boundaries and saves resume state."""

    def __init__(self):
        self.signal_name: str | None = None

    def __call__(self) -> bool:
        return self.signal_name is not None

    def install(self):
        previous = {}

        def handler(signum, frame):
            self.signal_name = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous

    @staticmethod
    def uninstall(previous):
        for sig, h in previous.items():
            signal.signal(sig, h)


def _read_data(cfg: FinetuneConfig, log) -> Dataset:
    dataset = read_dataset(cfg.data, val_fraction=cfg.val_fraction, val_from_train=cfg.val_from_train,
                           seed=cfg.seed, allow_outside_root=cfg.allow_outside_root)
    for warning in dataset.warnings:
        log(f"warning: {warning}")
    skipped = []
    for split in list(dataset.splits):
        good, bad = check_images(dataset.splits[split], workers=loaders.default_workers(cfg.workers))
        dataset.splits[split] = good
        skipped += [(split, sid, why) for sid, why in bad]
    dataset.skipped = [(sid, f"{split}: {why}") for split, sid, why in skipped]
    if skipped:
        log(f"warning: skipped {len(skipped)} unreadable image(s) (listed in skipped_images.txt), e.g. {skipped[0][1]}: {skipped[0][2]}")
    for split in ("train", "val"):
        if not dataset.split(split):
            raise UserInputError(f"{cfg.data}: no readable {split} images left after skipping {len(skipped)} unreadable ones")
    empty = [c for c, n in zip(dataset.classes, dataset.class_counts("train")) if n == 0]
    if empty:
        raise UserInputError(f"{cfg.data}: class(es) {empty} have no readable train images; add images or remove the class")
    return dataset


def _rate_table(model, groups, frozen: int, rates, lr: float) -> str:
    rows = [("group", "stage", "params", "state", "peak lr")]
    for g, r in zip(groups, rates):
        state = "frozen" if g.index < frozen else "train"
        rows.append((str(g.index), g.name, f"{count_parameters(model, g.param_names):,}", state, f"{lr * r.lr_scale:.3g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  " + "  ".join(c.ljust(w) if i in (1, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def _save_weights(path: Path, model: torch.nn.Module, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic.write_with(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def _progress_bar(epoch: int, epochs: int, enabled: bool):
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=0, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)

    def update(done, total, loss, ips):
        bar.total = total
        bar.n = done
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.1f}", refresh=False)
        bar.refresh()

    return update, bar.close


def finetune(cfg: FinetuneConfig, *, log=stderr_log, progress: bool | None = None,
             stop_after_epoch: int | None = None) -> FinetuneResult:
    """Fine-tune ``cfg.backbone`` on ``cfg.data`` and write the run directory ``cfg.out``.

    ``stop_after_epoch`` ends the session after that many epochs (resume state saved),
    as if it had been interrupted there.
    """
    run = RunDir(cfg.out)
    resume_state = None
    if cfg.resume:
        if not run.resume_state.is_file():
            raise UserInputError(f"{run.resume_state}: nothing to resume (no resume state); start the run without --resume")
        resume_state = torch.load(run.resume_state, map_location="cpu", weights_only=True)
        saved = FinetuneConfig.from_dict(run.read_config()["options"])
        saved.resume = True
        cfg = saved
    elif run.is_run():
        raise UserInputError(f"{run.root}: already holds a run; pass --resume to continue it, or choose another --out")
    cfg.validate()
    hardware = resolve_hardware(cfg.device, cfg.amp, cfg.channels_last)
    show_progress = sys.stderr.isatty() if progress is None else progress

    # Data.
    dataset = _read_data(cfg, log)
    classes, num_classes = dataset.classes, len(dataset.classes)
    train_counts = dataset.class_counts("train")
    log(f"data: {len(dataset.split('train'))} train, {len(dataset.split('val'))} val"
        f"{' (split from train)' if dataset.val_source == 'from-train' else ''}, {num_classes} classes")

    # Model, its stage groups and its data config.
    seed_everything(cfg.seed)
    model_kwargs = cfg.create_kwargs()
    model = create_backbone(cfg.backbone, num_classes, pretrained=cfg.pretrained, weights=cfg.weights, **model_kwargs)
    start_hash = state_dict_hash(model)
    dcfg = data_config(model, {"input_size": cfg.input_size, "mean": cfg.mean, "std": cfg.std,
                               "interpolation": cfg.interpolation, "crop_pct": cfg.crop_pct})
    groups = stage_groups(model)
    model.to(hardware.device)
    if hardware.channels_last:
        model.to(memory_format=torch.channels_last)

    # Frozen stages, differential learning rates, optimizer, schedule.
    frozen = frozen_group_count(cfg.freeze, cfg.unfreeze_at, 0, len(groups))
    frozen_norms = freeze_stages(model, groups, frozen)
    rates = group_lr_scales(groups, cfg.layer_decay, cfg.backbone_lr_mult)
    optimizer = create_optimizer(model, rates, cfg.optimizer, cfg.lr, cfg.weight_decay)
    workers = loaders.default_workers(cfg.workers)
    pin = hardware.device.type == "cuda"
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=num_classes)
    train_tf = loaders.train_transform(dcfg, auto_augment=cfg.auto_augment, crop_scale=cfg.crop_scale, hflip=cfg.hflip)
    eval_tf = loaders.eval_transform(dcfg)

    def make_train_loader(generator):
        return loaders.train_loader(dataset.split("train"), train_tf, batch_size=cfg.batch_size, workers=workers,
                                    generator=generator, num_classes=num_classes, balanced=cfg.balance == "sampler",
                                    drop_last=mixup is not None, pin_memory=pin)

    val_loader = loaders.eval_loader(dataset.split("val"), eval_tf, batch_size=cfg.batch_size * 2, workers=workers, pin_memory=pin)
    updates_per_epoch = -(-len(make_train_loader(torch.Generator())) // cfg.accum_steps)
    scheduler = create_schedule(optimizer, cfg.schedule, lr=cfg.lr, epochs=cfg.epochs, updates_per_epoch=updates_per_epoch,
                                warmup_epochs=cfg.warmup_epochs, min_lr_ratio=cfg.min_lr_ratio, restarts=cfg.restarts)
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay)  # after freezing: it pairs tensors by position
    train_model = torch.compile(model) if cfg.compile else model
    trainer = Trainer(train_model, optimizer, scheduler, hardware, num_classes, label_smoothing=cfg.label_smoothing,
                      class_weights=loaders.class_loss_weights(train_counts).to(hardware.device) if cfg.balance == "loss" else None,
                      mixup=mixup, accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad, ema=ema)

    # Resume state, or a fresh run whose config is written before step 0.
    history: list[dict] = []
    best = {"epoch": -1, "val_loss": float("inf"), "val_accuracy": -1.0}
    start_epoch, bad_epochs, partial = 0, 0, None
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        trainer.scaler.load_state_dict(resume_state["scaler"])
        if ema is not None:
            ema.module.load_state_dict(resume_state["ema"])
        trainer.num_updates = resume_state["num_updates"]
        start_epoch, bad_epochs = resume_state["epoch"], resume_state["bad_epochs"]
        history, best = list(resume_state["history"]), dict(resume_state["best"])
        if resume_state.get("partial"):
            partial = EpochProgress(**resume_state["partial"])
        log(f"resuming {run.root} at epoch {start_epoch + 1}" + (f", batch {partial.batches + 1}" if partial else ""))
    else:
        run.root.mkdir(parents=True, exist_ok=True)
        atomic.write_json(run.config, {
            "backbone": cfg.backbone, "classes": classes, "class_order": CLASS_ORDER, "num_classes": num_classes,
            "data_config": dcfg, "model_kwargs": model_kwargs, "options": cfg.to_dict(),
            "dataset": {"root": str(dataset.root.resolve()), "kind": dataset.kind, "val_source": dataset.val_source,
                        "counts": {s: len(v) for s, v in dataset.splits.items()}, "train_class_counts": train_counts,
                        "skipped": len(dataset.skipped)},
            "stage_groups": [{"index": g.index, "name": g.name, "params": count_parameters(model, g.param_names),
                              "lr_scale": r.lr_scale, "head": g.is_head} for g, r in zip(groups, rates)],
            "start_weights_sha256": start_hash, "weights_source": cfg.weights or ("hub" if cfg.pretrained else "random"),
            "hardware": hardware.describe(), "effective_batch_size": cfg.batch_size * cfg.accum_steps,
            "updates_per_epoch": updates_per_epoch,
            "versions": {"zoo": zoo.__version__, "torch": torch.__version__, "timm": timm.__version__,
                         "python": platform.python_version()},
        })
        atomic.write_json(run.splits, {s: [x.id for x in v] for s, v in dataset.splits.items() if s in ("train", "val")})
        if dataset.skipped:
            atomic.write_text(run.skipped_images, "".join(f"{sid}\t{why}\n" for sid, why in dataset.skipped))
    log(f"{cfg.backbone}: {len(groups)} stage groups, first {frozen} frozen; head lr {cfg.lr:g}, layer decay "
        f"{cfg.layer_decay:g}, backbone x{cfg.backbone_lr_mult:g}; {cfg.optimizer}, {cfg.schedule}; {hardware.describe()}")
    log(_rate_table(model, groups, frozen, rates, cfg.lr))

    # The epoch loop.
    stop = StopFlag()
    previous_handlers = stop.install()
    status = "finished"
    eval_model = ema.module if ema is not None else model
    try:
        for epoch in range(start_epoch, cfg.epochs):
            now_frozen = frozen_group_count(cfg.freeze, cfg.unfreeze_at, epoch, len(groups))
            if now_frozen != frozen:
                frozen = now_frozen
                frozen_norms = freeze_stages(model, groups, frozen)
                log(f"epoch {epoch + 1}: unfreezing; first {frozen} group(s) stay frozen")
            generator = seed_everything(cfg.seed, epoch)
            set_train_mode(model, frozen_norms)
            update, close = _progress_bar(epoch, cfg.epochs, show_progress)
            try:
                stats = trainer.train_epoch(make_train_loader(generator), progress=update, stop_requested=stop, resume_from=partial)
            finally:
                close()
            partial = None
            if stats.stopped_at is not None:
                _save_resume(run, model, optimizer, trainer, ema, epoch, bad_epochs, history, best, stats.stopped_at)
                log(f"{stop.signal_name}: stopped at epoch {epoch + 1}, batch {stats.stopped_at.batches}; resume state saved. "
                    f"Continue with: zoo finetune --resume --out {run.root}")
                status = "interrupted"
                break
            logits, labels = predict_logits(eval_model, val_loader, hardware)
            val_loss, val_acc = log_loss_and_accuracy(logits, labels)
            row = {"epoch": epoch + 1, "train_loss": stats.loss, "train_accuracy": stats.accuracy, "val_loss": val_loss,
                   "val_accuracy": val_acc, "seconds": round(stats.seconds, 3), "images_per_second": round(stats.images_per_second, 2),
                   **{f"lr/{k}": v for k, v in current_rates(optimizer).items()}}
            history.append(row)
            improved = (val_loss < best["val_loss"]) if cfg.monitor == "loss" else \
                (val_acc > best["val_accuracy"] or (val_acc == best["val_accuracy"] and val_loss < best["val_loss"]))
            if improved:
                best, bad_epochs = {"epoch": epoch + 1, "val_loss": val_loss, "val_accuracy": val_acc}, 0
                _save_best(run, cfg, eval_model, classes, dataset, logits, labels, epoch + 1)
            else:
                bad_epochs += 1
            _save_resume(run, model, optimizer, trainer, ema, epoch + 1, bad_epochs, history, best, None)
            write_metrics(run.metrics_csv, history)
            plot_metrics(run.metrics_png, history, f"{cfg.backbone} on {Path(cfg.data).name}")
            log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {stats.loss:.4f} acc {stats.accuracy:.3f} | val loss "
                f"{val_loss:.4f} acc {val_acc:.3f}{' *' if improved else ''} | {stats.seconds:.1f}s, "
                f"{stats.images_per_second:.1f} img/s")
            if cfg.patience and bad_epochs >= cfg.patience and epoch + 1 < cfg.epochs:
                log(f"early stop: no improvement in val {cfg.monitor} for {bad_epochs} epochs")
                status = "early-stopped"
                break
            if stop():
                log(f"{stop.signal_name}: stopped after epoch {epoch + 1}; continue with: zoo finetune --resume --out {run.root}")
                status = "interrupted"
                break
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < cfg.epochs:
                status = "interrupted"
                break
    except TrainingDiverged as e:
        raise UserInputError(f"{run.root}: {e}; the last good checkpoint is kept. Lower --lr or set --clip-grad") from None
    finally:
        StopFlag.uninstall(previous_handlers)

    if best["epoch"] > 0 and status != "interrupted":
        report = json.loads(run.report.read_text())
        log(format_report(report, classes))
        log(f"best epoch {best['epoch']}: val loss {best['val_loss']:.4f}, val accuracy {best['val_accuracy']:.4f} -> {run.root}")
    return FinetuneResult(run, best["epoch"], best["val_loss"], best["val_accuracy"], len(history), status)


def _save_best(run: RunDir, cfg: FinetuneConfig, model, classes, dataset: Dataset, logits, labels, epoch: int) -> None:
    _save_weights(run.model, model, {"backbone": cfg.backbone, "classes": json.dumps(classes), "epoch": str(epoch)})
    preds = Predictions(logits=logits, labels=labels, ids=[s.id for s in dataset.split("val")], classes=classes,
                        backbone=cfg.backbone, run=str(run.root.resolve()), split="val", tta=1)
    write_predictions(run.predictions("val"), preds)
    write_best_epoch_report(run, preds, epoch)


def _save_resume(run: RunDir, model, optimizer, trainer: Trainer, ema, epoch: int, bad_epochs: int,
                 history, best, partial: EpochProgress | None) -> None:
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": trainer.scaler.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None, "epoch": epoch, "num_updates": trainer.num_updates,
        "bad_epochs": bad_epochs, "history": history, "best": best,
        "partial": vars(partial) if partial is not None else None,
    }
    atomic.write_with(run.resume_state, lambda tmp: torch.save(state, tmp))


__all__ = ["finetune", "FinetuneResult", "Hardware", "np"]
