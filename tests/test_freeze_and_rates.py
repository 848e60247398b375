"""Frozen stages stay frozen, and every group trains at the rate that was asked."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from finetune.engine import Trainer, resolve_hardware
from finetune.freeze import freeze_stages, frozen_group_count, set_train_mode
from finetune.optim import create_optimizer, create_schedule, current_rates, group_lr_scales
from finetune.train import finetune
from tests.conftest import tiny_config
from zoo.backbones import create_backbone, stage_groups


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet", "test_convnext", "test_vit"])
def test_frozen_stage_weights_and_bn_statistics_are_bit_identical_after_training(tmp_path, image_folder, backbone):
    cfg = tiny_config(image_folder, tmp_path / "run", backbone=backbone, freeze=2, epochs=2, lr=1e-2)
    # The run's starting weights: the same seed as the run's own model creation.
    from finetune.engine import seed_everything

    seed_everything(cfg.seed)
    start = create_backbone(backbone, 3, pretrained=False, **cfg.create_kwargs()).state_dict()
    finetune(cfg, progress=False, log=lambda m: None)
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    model = create_backbone(backbone, 3, pretrained=False, **cfg.create_kwargs())
    groups = stage_groups(model)
    frozen_params = {n for g in groups[:2] for n in g.param_names}
    frozen_modules = {n.rsplit(".", 1)[0] for n in frozen_params}
    checked_stats = 0
    for name, tensor in start.items():
        module = name.rsplit(".", 1)[0]
        if name in frozen_params or (module in frozen_modules and name.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(trained[name], tensor), f"{backbone}: frozen {name} changed"
            checked_stats += name.endswith("running_mean")
    moved = [n for g in groups[2:] for n in g.param_names if not torch.equal(trained[n], start[n])]
    assert moved, "nothing trained: the test would pass vacuously"
    if backbone in ("test_resnet", "test_efficientnet"):
        assert checked_stats > 0, "no BatchNorm statistics were checked"


def test_frozen_parameters_get_no_gradient_and_no_optimizer_state(image_folder):
    model = create_backbone("test_resnet", 3, pretrained=False)
    groups = stage_groups(model)
    frozen_norms = freeze_stages(model, groups, 3)
    optimizer = create_optimizer(model, group_lr_scales(groups, 0.7, 1.0), "adamw", 1e-3, 0.05)
    set_train_mode(model, frozen_norms)
    assert frozen_norms and all(not m.training for m in frozen_norms)
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    params = dict(model.named_parameters())
    for name in (n for g in groups[:3] for n in g.param_names):
        assert params[name].grad is None and params[name] not in optimizer.state
    assert any(params[n] in optimizer.state for n in groups[-1].param_names)


@pytest.mark.parametrize("schedule,restarts", [("cosine", 0), ("cosine", 2), ("constant", 0)])
@pytest.mark.parametrize("layer_decay,backbone_mult", [(0.5, 1.0), (0.8, 0.1)])
def test_every_group_rate_is_what_was_asked_at_every_step(schedule, restarts, layer_decay, backbone_mult):
    model = create_backbone("test_resnet", 3, pretrained=False)
    groups = stage_groups(model)
    lr = 3e-3
    optimizer = create_optimizer(model, group_lr_scales(groups, layer_decay, backbone_mult), "adamw", lr, 0.05)
    updates_per_epoch, epochs = 4, 6
    scheduler = create_schedule(optimizer, schedule, lr=lr, epochs=epochs, updates_per_epoch=updates_per_epoch,
                                warmup_epochs=1, min_lr_ratio=0.01, restarts=restarts)
    trainer = Trainer(model, optimizer, scheduler, resolve_hardware("cpu", False, False), num_classes=3)
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), torch.tensor([0, 1]))] * updates_per_epoch
    head_rates, last = [], len(groups) - 1
    for _ in range(epochs):
        for b in batches:
            trainer.train_epoch([b])
            rates = current_rates(optimizer)
            head = rates[groups[-1].name]
            head_rates.append(head)
            for g in groups:
                expected = head * (1.0 if g.is_head else layer_decay ** (last - g.index) * backbone_mult)
                assert rates[g.name] == pytest.approx(expected, rel=1e-9), (g.name, trainer.num_updates)
    # The head reaches --lr at the end of warmup (warmup is a prefix, not inside the schedule).
    assert head_rates[updates_per_epoch - 1] == pytest.approx(lr, rel=1e-9)
    if schedule == "constant":
        assert head_rates[-1] == pytest.approx(lr)
    elif restarts == 0:
        assert head_rates[-1] < 0.05 * lr
    else:
        assert max(head_rates[updates_per_epoch + 2:]) == pytest.approx(lr, rel=1e-6)  # a restart returns to the peak


def test_rates_in_a_real_run_follow_layer_decay(tmp_path, image_folder):
    import csv

    # freeze=0: every group trains (a frozen group logs a rate of 0, see test_review_fixes).
    cfg = tiny_config(image_folder, tmp_path / "run", layer_decay=0.5, backbone_lr_mult=0.2, lr=1e-2, epochs=2, freeze=0)
    finetune(cfg, progress=False, log=lambda m: None)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    groups = stage_groups(create_backbone("test_resnet", 3, pretrained=False))
    for row in rows:
        head = float(row[f"lr/{groups[-1].name}"])
        for g in groups[:-1]:
            assert float(row[f"lr/{g.name}"]) == pytest.approx(head * 0.5 ** (len(groups) - 1 - g.index) * 0.2, rel=1e-9)


@pytest.mark.parametrize("freeze,unfreeze_at,epoch,expected", [
    (2, None, 5, 2), (3, 2, 1, 3), (3, 2, 2, 2), (3, 2, 3, 1), (3, 2, 9, 0), (99, None, 0, 5), (0, 0, 0, 0),
])
def test_gradual_unfreezing_schedule(freeze, unfreeze_at, epoch, expected):
    assert frozen_group_count(freeze, unfreeze_at, epoch, num_groups=6) == expected


def test_unfreeze_at_trains_the_unfrozen_group(tmp_path, image_folder):
    from finetune.engine import seed_everything

    seed_everything(0)
    start = create_backbone("test_resnet", 3, pretrained=False).state_dict()
    cfg = tiny_config(image_folder, tmp_path / "run", freeze=3, unfreeze_at=1, epochs=2, lr=1e-2)
    finetune(cfg, progress=False, log=lambda m: None)
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    groups = stage_groups(create_backbone("test_resnet", 3, pretrained=False))
    assert all(torch.equal(trained[n], start[n]) for g in groups[:2] for n in g.param_names)
    assert any(not torch.equal(trained[n], start[n]) for n in groups[2].param_names)
