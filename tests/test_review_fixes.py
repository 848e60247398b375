"""Regressions from the review of issue 11: each test fails on the code before its fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.engine import Trainer, resolve_hardware
from finetune.freeze import freeze_stages, set_train_mode
from finetune.optim import current_rates
from zoo.backbones import StageGroup, needs_img_size


def _one_step_update(accum_steps: int, batches) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    start = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = Trainer(model, optimizer, None, resolve_hardware("cpu", False, False), num_classes=3, accum_steps=accum_steps)
    trainer.train_epoch(batches)
    return model.weight.detach() - start


def test_a_partial_accumulation_group_is_the_mean_of_its_own_batches():
    # Item 6: with --accum-steps 2 an epoch of one batch makes one step of that batch's gradient,
    # not half of it.
    torch.manual_seed(1)
    batch = (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), torch.arange(5))
    plain = _one_step_update(1, [batch])
    accumulated = _one_step_update(2, [batch])
    assert torch.allclose(accumulated, plain, atol=1e-7) and plain.abs().sum() > 0
    # Three batches with accum 2: the second step holds the third batch alone, at full weight.
    batches = [(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), torch.arange(5)) for _ in range(3)]
    two_then_one = _one_step_update(2, batches)
    torch.manual_seed(0)
    reference = nn.Linear(4, 3)
    start = reference.weight.detach().clone()
    optimizer = torch.optim.SGD(reference.parameters(), lr=1.0)
    for group in (batches[:2], batches[2:]):
        optimizer.zero_grad()
        loss = sum(torch.nn.functional.cross_entropy(reference(x), y) for x, y, _ in group) / len(group)
        loss.backward()
        optimizer.step()
    assert torch.allclose(two_then_one, reference.weight.detach() - start, atol=1e-6)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False))
        self.stage = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, affine=False))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.stage(self.stem(x)).mean((2, 3)))


def _groups(model: nn.Module) -> list[StageGroup]:
    names = [n for n, _ in model.named_parameters()]
    return [StageGroup(i, prefix, tuple(n for n in names if n.startswith(prefix + ".")), prefix == "head")
            for i, prefix in enumerate(("stem", "stage", "head"))]


def test_running_statistics_of_a_parameterless_norm_in_a_frozen_stage_stay():
    # Item 9: a BatchNorm with affine=False has no parameters, so it was never counted as frozen.
    model = _Net()
    frozen_norms = freeze_stages(model, _groups(model), 1)
    assert frozen_norms == [model.stem[1]]
    before = model.stem[1].running_mean.clone()
    set_train_mode(model, frozen_norms)
    model(torch.randn(2, 3, 8, 8))
    assert torch.equal(model.stem[1].running_mean, before)
    assert not torch.equal(model.stage[1].running_mean, torch.zeros(4))  # the training stage's norm does update


def test_frozen_groups_log_a_rate_of_zero():
    # Item 7: metrics.csv logged the scheduled rate of frozen groups as if they trained.
    model = _Net()
    groups = _groups(model)
    freeze_stages(model, groups, 1)
    optimizer = torch.optim.AdamW([{"params": [p for n, p in model.named_parameters() if n in g.param_names],
                                    "group_name": g.name, "lr": 0.1 * (i + 1)} for i, g in enumerate(groups)])
    assert current_rates(optimizer) == {"stem": 0.0, "stage": pytest.approx(0.2), "head": pytest.approx(0.3)}


def test_a_fixed_size_model_with_an_unknown_tag_still_gets_its_input_size():
    # Item 10: timm raises for a tag it does not know; the exception was swallowed and the
    # answer was "not fixed-size", so --input-size built a ViT for the wrong size.
    assert needs_img_size("vit_tiny_patch16_224.not_a_tag") is True
    assert needs_img_size("resnet18.not_a_tag") is False
    assert needs_img_size("no_such_architecture") is False


def test_the_weight_average_follows_a_short_run():
    # Item 8: --ema-decay 0.998 per step with no warmup left the EMA model mostly at its starting
    # weights after the ~36 updates of a small dataset.
    from finetune.engine import create_ema

    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = create_ema(model, 0.998)
    for step in range(1, 37):  # the weight walks from 0 to 1
        with torch.no_grad():
            model.weight.fill_(step / 36)
        ema.update(model, step=step)
    assert ema.module.weight.item() > 0.7


def test_zoo_predict_writes_what_the_suffix_says(tmp_path):
    # Item 1: `zoo predict RUN --out preds.csv` wrote a safetensors file under a .csv name.
    import csv

    from click.testing import CliRunner

    from finetune.train import finetune
    from tests.conftest import make_image_folder, tiny_config
    from zoo.cli import main

    data = make_image_folder(tmp_path / "data", per_class=(4, 2, 2))
    finetune(tiny_config(data, tmp_path / "run", epochs=1), log=lambda m: None)
    out = tmp_path / "preds.csv"
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "run"), "--data", str(data), "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["id", "prediction", "ant", "bee", "cat"] and len(rows) == 7
    assert abs(sum(float(v) for v in rows[1][2:]) - 1) < 1e-4
    bad = tmp_path / "preds.txt"
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "run"), "--data", str(data), "--out", str(bad)])
    assert result.exit_code == 1 and "output must end in .safetensors or .csv" in result.output and not bad.exists()
