"""What a run writes to disk and reads back: the best weights (a plain timm state dict), the best epoch's
validation predictions and report, snapshot members, and the resume state (``last.pt``). Rank 0 alone
calls the writers; every file goes to a temporary name and is renamed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.config import FinetuneConfig
from finetune.engine import Trainer
from finetune.report import write_best_epoch_report
from zoo import atomic
from zoo.backbones import unreadable_reason
from zoo.data import Dataset
from zoo.errors import UserInputError
from zoo.predictions import Predictions, write_predictions
from zoo.rundir import RunDir


def save_state(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The one writer of ``model.safetensors``: a plain timm state dict with zoo's metadata."""
    from safetensors.torch import save_file

    atomic.write_with(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def save_weights(path: Path, model: torch.nn.Module, metadata: dict[str, str]) -> None:
    save_state(path, {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, metadata)


def write_run_predictions(run: RunDir, split: str, logits, labels, ids, classes, backbone: str,
                          report_epoch: int | None = None) -> Predictions:
    """``RUN/predictions/<split>.safetensors`` (and, with ``report_epoch``, the best-epoch report from them)."""
    preds = Predictions(logits=logits, labels=labels, ids=list(ids), classes=classes, backbone=backbone,
                        run=str(run.root.resolve()), split=split)
    write_predictions(run.predictions(split), preds)
    if report_epoch is not None:
        write_best_epoch_report(run, preds, report_epoch)
    return preds


def save_best(run: RunDir, cfg: FinetuneConfig, model, classes, dataset: Dataset, logits, labels, epoch: int) -> None:
    save_weights(run.model, model, {"backbone": cfg.backbone, "classes": json.dumps(classes), "epoch": str(epoch)})
    write_run_predictions(run, "val", logits, labels, [s.id for s in dataset.split("val")], classes, cfg.backbone,
                          report_epoch=epoch)


def save_snapshot(run: RunDir, cfg: FinetuneConfig, model, classes, dataset: Dataset, logits, labels, epoch: int,
                  index: int, val_loss: float, val_accuracy: float) -> None:
    """``RUN/snapshot-<index>``: the model at the end of cosine cycle ``index`` (Huang et al. 2017), an
    ordinary run directory (config, weights, validation predictions, splits, result) usable as a member."""
    snap = run.snapshot(index)
    config = json.loads(run.config.read_text(encoding="utf-8"))
    config["snapshot"] = {"index": index, "of": cfg.restarts + 1, "epoch": epoch, "run": str(run.root.resolve())}
    atomic.write_json(snap.config, config)
    atomic.write_text(snap.splits, run.splits.read_text(encoding="utf-8"))
    save_weights(snap.model, model, {"backbone": cfg.backbone, "classes": json.dumps(classes), "epoch": str(epoch)})
    write_run_predictions(snap, "val", logits, labels, [s.id for s in dataset.split("val")], classes, cfg.backbone)
    atomic.write_json(snap.result, {"status": "snapshot", "best_epoch": epoch, "val_loss": val_loss,
                                    "val_accuracy": val_accuracy, "epochs_run": epoch})


def save_resume(run: RunDir, model, optimizer, trainer: Trainer, ema, epoch: int, bad_epochs: int,
                 history, best, partials: list[dict] | None, world_size: int) -> None:
    """Write last.pt (rank 0). ``partials``: each rank's progress through an interrupted epoch."""
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": trainer.scaler.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None, "epoch": epoch, "num_updates": trainer.num_updates,
        "bad_epochs": bad_epochs, "history": history, "best": best, "world_size": world_size,
        "partial": partials[0] if partials else None, "partials": partials,
    }
    atomic.write_with(run.resume_state, lambda tmp: torch.save(state, tmp))


def load_resume_state(run: RunDir) -> dict:
    """``last.pt``, read with weights_only=True (never unpickling objects) and checked to be zoo resume state."""
    try:
        state = torch.load(run.resume_state, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated, foreign or pickled-object file: torch raises many types
        raise UserInputError(f"{run.resume_state}: cannot be read as zoo resume state ({unreadable_reason(e)}); it is "
                             "loaded with weights_only=True, never unpickling objects; start a new run") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch"} <= set(state):
        raise UserInputError(f"{run.resume_state}: not zoo resume state (no model, optimizer and epoch); start a new run")
    return state


def restore(state: dict, model, optimizer, trainer: Trainer, ema) -> None:
    """Load the model, optimizer, grad scaler, EMA and update count of ``state`` (from ``load_resume_state``)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.module.load_state_dict(state["ema"])
    trainer.num_updates = state["num_updates"]
