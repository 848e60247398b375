"""``config.json``: what a run records before step 0, so that it describes itself (nanoGPT's checkpoints
do the same) and ``--resume``, ``zoo predict`` and the ensemble commands can rebuild what they need."""

from __future__ import annotations

import platform

import timm
import torch

import zoo
from finetune.config import FinetuneConfig
from finetune.distributed import Dist
from finetune.freeze import count_parameters
from finetune.hardware import Hardware
from zoo.cpu import CpuBudget
from zoo.data import CLASS_ORDER, Dataset


def start_model(cfg: FinetuneConfig, num_classes: int) -> tuple[torch.nn.Module, dict, str, dict]:
    """The model a run starts from (seeded, so the same seed gives the same new head), its model kwargs, the hash of
    its starting weights (what soups and cross-fits compare) and its data config: one recipe for fine-tunes and probes."""
    from finetune.rng import seed_everything
    from zoo.backbones import check_input_size, create_backbone, data_config, state_dict_hash

    seed_everything(cfg.seed)
    model_kwargs = cfg.create_kwargs()
    model = create_backbone(cfg.backbone, num_classes, pretrained=cfg.pretrained, weights=cfg.weights, **model_kwargs)
    dcfg = data_config(model, cfg.data_overrides())
    check_input_size(model, cfg.backbone, dcfg)
    return model, model_kwargs, state_dict_hash(model), dcfg


def run_config(cfg: FinetuneConfig, dataset: Dataset, dcfg: dict, model: torch.nn.Module, groups, rates, *, start_hash: str,
               hardware: Hardware, dist: Dist, lr: float, updates_per_epoch: int, budget: CpuBudget) -> dict:
    """The resolved config of a fresh run: backbone, classes, data config, every option, the stage groups and their
    rates, the starting weights' hash, hardware, processes, CPU budget and versions."""
    classes, world = dataset.classes, dist.world_size
    num_classes = len(classes)
    model_kwargs = cfg.create_kwargs()
    effective_batch = cfg.batch_size * cfg.accum_steps * world
    train_counts = dataset.class_counts("train")
    return {
        "backbone": cfg.backbone, "classes": classes, "class_order": CLASS_ORDER, "num_classes": num_classes,
        "data_config": dcfg, "model_kwargs": model_kwargs, "options": cfg.to_dict(),
        "dataset": {"root": str(dataset.root.resolve()), "kind": dataset.kind, "val_source": dataset.val_source,
                    "counts": {s: len(v) for s, v in dataset.splits.items()}, "train_class_counts": train_counts,
                    "skipped": len(dataset.skipped), "excluded_ids": dataset.excluded},
        "stage_groups": [{"index": g.index, "name": g.name, "params": count_parameters(model, g.param_names),
                          "lr_scale": r.lr_scale, "head": g.is_head} for g, r in zip(groups, rates)],
        "start_weights_sha256": start_hash, "weights_source": cfg.weights or ("hub" if cfg.pretrained else "random"),
        "hardware": hardware.describe(), "world_size": world, "effective_batch_size": effective_batch, "lr": lr,
        "distributed": {"world_size": world, "backend": dist.backend or None, "sync_bn": bool(cfg.sync_bn and dist.enabled)},
        "updates_per_epoch": updates_per_epoch, "cpu_budget": budget.to_dict(),
        **({"distill": cfg.distill} if cfg.distill else {}),  # a student's teacher: ensemble file and hash, views, alpha, T
        "versions": {"zoo": zoo.__version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
    }
