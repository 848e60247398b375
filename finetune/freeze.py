"""Frozen early stages.

Frozen parameters get ``requires_grad=False``: no gradient, so the optimizer keeps no
state for them and never moves them (torch's optimizers skip parameters whose grad is
None). They stay in the optimizer's groups, so unfreezing needs no new optimizer or
scheduler. BatchNorm layers of frozen stages are put back in eval mode after every
``model.train()``, so their running statistics do not drift either.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from zoo.backbones import StageGroup


def frozen_group_count(freeze: int, unfreeze_at: int | None, epoch: int, num_groups: int) -> int:
    """How many leading groups are frozen during ``epoch`` (0-based).

    ``freeze`` groups are frozen (never the head). From ``unfreeze_at`` on, one more
    group is unfrozen each epoch, the one nearest the head first (ULMFiT's gradual
    unfreezing).
    """
    frozen = min(freeze, num_groups - 1)
    if unfreeze_at is not None and epoch >= unfreeze_at:
        frozen = max(0, frozen - (epoch - unfreeze_at + 1))
    return frozen


def freeze_stages(model: nn.Module, groups: Sequence[StageGroup], n: int) -> list[nn.Module]:
    """Freeze the first ``n`` groups and unfreeze the rest; return the frozen norm layers."""
    frozen_names = {name for g in groups[:n] for name in g.param_names}
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen_names)
    modules = dict(model.named_modules())
    frozen_norms = []
    for module_name, module in modules.items():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        # A norm with affine=False has no parameters of its own: it belongs to the stage of the
        # nearest enclosing module that has some (its block), and must stop updating its running
        # statistics with it.
        owner, names = module_name, []
        while not names:
            names = [f"{owner}.{p}" if owner else p for p, _ in modules[owner].named_parameters()]
            if not owner:
                break
            owner = owner.rpartition(".")[0]
        if names and all(p in frozen_names for p in names):
            frozen_norms.append(module)
    return frozen_norms


def set_train_mode(model: nn.Module, frozen_norms: Sequence[nn.Module]) -> None:
    """``model.train()``, with frozen stages' BatchNorm layers kept in eval mode."""
    model.train()
    for module in frozen_norms:
        module.eval()


def count_parameters(model: nn.Module, names: Sequence[str]) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)
