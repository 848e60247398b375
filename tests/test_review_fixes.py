"""Regressions from the review of issue 11: each test fails on the code before its fix."""

from __future__ import annotations

import numpy as np
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


# ---------------------------------------------------------------------------- second round of issue 11


def test_temperatures_fitted_without_tta_are_flagged_when_applied_to_tta_predictions(tmp_path):
    # Item 3: member and final temperatures were fitted on single-view validation predictions and then
    # applied, without a word, to --tta N predictions (averaged views are softer).
    import numpy as np

    from ensemble.file import read_ensemble, write_ensemble
    from ensemble.fit import fit_ensemble
    from ensemble.predict import predict_ensemble
    from zoo.predictions import Predictions

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)

    def member(name, tta, noise):
        logits = 3 * np.eye(3)[labels] + noise * rng.normal(size=(60, 3))
        return Predictions(logits=logits.astype(np.float32), labels=labels, ids=[f"i{k}" for k in range(60)],
                           classes=["a", "b", "c"], backbone=name, run=str(tmp_path / name), split="val", tta=tta)

    fitted = fit_ensemble([member("m1", 1, 1.0), member("m2", 1, 2.0)], cv=0)
    write_ensemble(tmp_path / "ens.json", fitted)
    ens = read_ensemble(tmp_path / "ens.json")
    assert [m.tta for m in ens.members] == [1] * len(ens.members) and ens.calibrated
    said = []
    predict_ensemble(ens, predictions=[member(m.name, 2, 1.0) for m in ens.members], log=said.append)
    assert any("fitted on predictions with tta=1 and are applied to tta=2" in s and "--split run-val --tta 2" in s
               for s in said), said
    said.clear()
    predict_ensemble(ens, predictions=[member(m.name, 1, 1.0) for m in ens.members], log=said.append)
    assert not any("tta" in s for s in said), said


def test_zoo_predict_reaches_the_runs_own_validation_split_taken_from_train(tmp_path):
    # Item 3: with validation split from train/, `--split val` cannot reach those images, so TTA
    # predictions to fit temperatures on could not be made.
    import json

    from click.testing import CliRunner

    from finetune.train import finetune
    from tests.conftest import make_image_folder, tiny_config
    from zoo.cli import main
    from zoo.predictions import read_predictions

    data = make_image_folder(tmp_path / "data", per_class=(6, 0, 2))
    finetune(tiny_config(data, tmp_path / "run", epochs=1), log=lambda m: None)
    out = tmp_path / "val_tta2.safetensors"
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "run"), "--data", str(data), "--split", "run-val",
                                       "--tta", "2", "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    preds = read_predictions(out)
    val_ids = json.loads((tmp_path / "run" / "splits.json").read_text())["val"]
    assert sorted(preds.ids) == sorted(val_ids) and all(i.startswith("train/") for i in preds.ids)
    assert (preds.split, preds.tta) == ("val", 2) and (preds.labels >= 0).all()
    single = read_predictions(tmp_path / "run" / "predictions" / "val.safetensors")
    assert single.tta == 1 and not np.allclose(single.logits, preds.logits[[preds.ids.index(i) for i in single.ids]])


def test_no_pretrained_with_weights_is_refused():
    # Item 4: --no-pretrained was silently ignored when --weights was given.
    from finetune.config import FinetuneConfig
    from zoo.errors import UserInputError

    with pytest.raises(UserInputError, match="--no-pretrained and --weights w.pth contradict each other"):
        FinetuneConfig(backbone="resnet18", data="d", out="o", weights="w.pth", pretrained=False).validate()
    FinetuneConfig(backbone="resnet18", data="d", out="o", weights="w.pth").validate()


def test_freezing_a_randomly_initialised_model_is_warned_about():
    # Item 4: --freeze on a random init froze random weights without a word.
    import timm

    from finetune.config import FinetuneConfig
    from finetune.optim import prepare_training

    hardware = resolve_hardware("cpu", False, False)

    def warnings(**options):
        cfg = FinetuneConfig(backbone="test_resnet", **options)
        model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
        return prepare_training(model, cfg, hardware, 1e-3).warnings

    said = warnings(pretrained=False, freeze=2)
    assert len(said) == 1 and "--freeze 2 with --no-pretrained" in said[0] and "--freeze 0" in said[0]
    assert warnings(pretrained=False, freeze=0) == [] and warnings(pretrained=True, freeze=2) == []


def test_lr_find_takes_finetunes_training_step_and_says_its_settings(tmp_path, monkeypatch):
    # Item 5: lr-find had its own step, without the grad scaler (fp16 ran unscaled), and applied
    # label smoothing 0.1 and weight decay 0.05 without saying so.
    from finetune.config import FinetuneConfig
    from finetune.lr_find import lr_find
    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", per_class=(6, 2, 0))
    scaled_steps = []
    original = torch.amp.GradScaler.step
    monkeypatch.setattr(torch.amp.GradScaler, "step", lambda self, opt, *a, **k: (scaled_steps.append(1), original(self, opt, *a, **k))[1])
    said = []
    cfg = FinetuneConfig(backbone="test_resnet", data=str(data), pretrained=False, freeze=0, batch_size=4, input_size=32,
                         workers=0, threads=1, auto_augment="none")
    result = lr_find(cfg, steps=6, end_lr=1e-2, log=said.append)
    assert len(scaled_steps) == len(result.lrs) == 6
    assert any("weight decay 0.05" in s and "label smoothing 0.1" in s for s in said), said


def test_a_stop_flag_installed_off_the_main_thread_says_ctrl_c_will_not_save(tmp_path):
    # Item 10: off the main thread the signal handlers could not be installed and nothing said so.
    import threading

    from finetune.train import StopFlag

    said = []
    thread = threading.Thread(target=lambda: said.append(StopFlag().install(said.append)))
    thread.start()
    thread.join()
    notes = [s for s in said if isinstance(s, str)]
    assert len(notes) == 1 and "Ctrl-C" in notes[0] and "without saving resume state" in notes[0]
    assert said[-1] == {}  # nothing installed, nothing to restore


def test_image_checks_split_the_cores_over_torchruns_local_processes(monkeypatch, tmp_path):
    # Item 12: every torchrun process decoded with min(8, cpus) threads of its own.
    import zoo.data
    from zoo.cpu import cpu_budget, MachineLoad

    seen = []
    real = zoo.data.ThreadPoolExecutor
    monkeypatch.setattr(zoo.data, "ThreadPoolExecutor", lambda max_workers: (seen.append(max_workers), real(max_workers))[1])
    monkeypatch.setattr(zoo.data.os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    zoo.data.check_images([])
    assert seen == [4]
    # Loader workers on a GPU: each of 4 local processes takes its share of 16 free cores, not min(8, 16).
    budget = cpu_budget(device_type="cuda", measure=lambda: MachineLoad(cores=16, busy=0, starting=0),
                        environ={"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"})
    assert budget.share == 4 and budget.workers == 3 and 4 * (budget.workers + budget.threads) <= 16


def test_plots_leave_the_callers_matplotlib_backend_alone(tmp_path):
    # Structure: matplotlib.use("Agg") inside library functions switched the caller's backend.
    import matplotlib

    from finetune.report import plot_metrics

    before = matplotlib.get_backend()
    try:
        matplotlib.use("svg")
        rows = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "train_accuracy": 0.5, "val_accuracy": 0.4,
                 "lr/head": 1e-3} for e in (1, 2)]
        plot_metrics(tmp_path / "m.png", rows, "t")
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "m.png").read_bytes().startswith(b"\x89PNG")
    finally:
        matplotlib.use(before)


@pytest.mark.parametrize("option", ["mixup", "cutmix"])
def test_mixup_and_cutmix_train_on_mixed_images_and_mixed_targets(option, monkeypatch):
    # The model sees mixed images and the loss mixed targets (two classes per row), not the batch as drawn.
    from timm.data import Mixup

    import finetune.engine

    torch.manual_seed(0)
    seen = {}
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x: (seen.setdefault("images", x.clone()), forward(x))[1])
    loss = finetune.engine.soft_cross_entropy
    monkeypatch.setattr(finetune.engine, "soft_cross_entropy", lambda logits, targets, w=None: (seen.setdefault("targets", targets), loss(logits, targets, w))[1])
    mixup = Mixup(**{f"{option}_alpha": 1.0}, label_smoothing=0.0, num_classes=3)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), None, resolve_hardware("cpu", False, False),
                      num_classes=3, mixup=mixup)
    images, labels = torch.rand(8, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    trainer.train_epoch([(images.clone(), labels, torch.arange(8))])
    assert not torch.equal(seen["images"], images)
    mixed_rows = ((seen["targets"] > 0.01).sum(1) == 2).sum()
    assert mixed_rows > 0 and torch.allclose(seen["targets"].sum(1), torch.ones(8))


def test_an_ema_run_saves_the_average_not_the_raw_weights(tmp_path):
    # --ema evaluates and saves the exponential moving average; model.safetensors must hold it.
    from safetensors.torch import load_file

    from finetune.train import finetune
    from tests.conftest import make_image_folder, tiny_config

    data = make_image_folder(tmp_path / "data", per_class=(6, 2, 0))
    finetune(tiny_config(data, tmp_path / "run", epochs=1, ema=True, ema_decay=0.9, freeze=0), log=lambda m: None)
    saved = load_file(tmp_path / "run" / "model.safetensors")
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    floats = [k for k, v in saved.items() if v.is_floating_point()]
    assert all(torch.equal(saved[k], state["ema"][k]) for k in floats)
    assert any(not torch.equal(saved[k], state["model"][k]) for k in floats)
