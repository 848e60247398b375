"""Linear-probe members and LP-FT (finetune/probe.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner

from conftest import make_image_folder, tiny_config
from finetune import loaders
from finetune.engine import resolve_hardware
from finetune.lpft import LPFT_VIEWS, fit_head_init, head_scale, smoothed_loss
from finetune.probe import LinearProbe, pooled_features, set_head
from finetune.probe_run import build_model, linear_probe
from zoo.data import load_rgb, read_dataset
from zoo.folds import assign_folds
from zoo.predictions import read_predictions
from zoo.rundir import RunDir

CPU = resolve_hardware("cpu", False, False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("probe") / "data", per_class=(8, 4, 0))


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet"])
@pytest.mark.parametrize("classes", [("ant", "bee"), ("ant", "bee", "cat")])
def test_head_reproduces_sklearn_probabilities(tmp_path, backbone, classes):
    # Noisy colours so the classes overlap and the fit is not a separable, saturated one.
    data = make_image_folder(tmp_path / "data", classes=classes, per_class=(10, 4, 0))
    cfg = tiny_config(data, tmp_path / "run", backbone=backbone)
    dataset = read_dataset(data)
    model, _, _, dcfg = build_model(cfg, len(classes))
    samples = dataset.split("train") + dataset.split("val")
    features = pooled_features(model, samples, loaders.eval_transform(dcfg), CPU)
    labels = np.array([s.label for s in samples])
    probe = LinearProbe(Cs=(0.01, 0.1, 1.0), cv=3).fit(features, labels, len(classes))
    set_head(model, probe, backbone)
    images = torch.stack([loaders.eval_transform(dcfg)(load_rgb(s.path)) for s in samples])
    with torch.no_grad():
        head_probs = torch.softmax(model(images).double(), 1).numpy()  # the whole timm model, as plain timm runs it
    np.testing.assert_allclose(head_probs, probe.predict_proba(features), atol=2e-5)
    assert probe.coef_.shape == (len(classes), features.shape[1])


def test_absent_class_gets_a_negligible_probability():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), np.repeat([0, 2], 15)  # class 1 never seen
    x[y == 2] += 2.0
    probe = LinearProbe(Cs=(1.0,), cv=3).fit(x, y, num_classes=3)
    p = torch.softmax(torch.from_numpy(probe.logits(x)).double(), 1).numpy()
    assert p[:, 1].max() < 1e-15
    np.testing.assert_allclose(p[:, [0, 2]], probe.predict_proba(x)[:, [0, 2]], atol=1e-6)


def test_probe_run_is_an_ordinary_run(data, tmp_path):
    from finetune.inference import load_run, predict_run

    result = linear_probe(tiny_config(data, tmp_path / "lp", linear_probe=True))
    config = json.loads(RunDir(result.run.root).config.read_text())
    for key in ("backbone", "classes", "num_classes", "data_config", "model_kwargs", "options", "start_weights_sha256",
                "weights_source", "dataset"):
        assert key in config, key
    stored = read_predictions(result.run.predictions("val"))
    again = predict_run(result.run.root, data, split="val", workers=0)
    assert again.ids == stored.ids
    np.testing.assert_allclose(again.logits, stored.logits, atol=1e-4)
    model, _ = load_run(result.run.root)  # strict load of backbone + fitted head
    assert isinstance(model.get_classifier(), torch.nn.Linear)
    # The recipe of docs/commands.md: plain timm, the run's file overlaid.
    plain = timm.create_model("test_resnet", pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(result.run.model), num_classes=3))
    torch.testing.assert_close(plain.get_classifier().weight, model.get_classifier().weight)


def test_probe_cross_fit_uses_the_finetune_folds(data, tmp_path):
    result = linear_probe(tiny_config(data, tmp_path / "lpk", linear_probe=True, folds=3, probe_views=1))
    run = result.run
    dataset = read_dataset(data)
    train = dataset.split("train")
    folds = json.loads(run.folds.read_text())["folds"]
    assert folds == assign_folds([s.id for s in train], [s.label for s in train], 3, 0)
    oof = read_predictions(run.predictions("oof"))
    assert sorted(oof.ids) == sorted(s.id for s in train)
    for fold in (1, 2, 3):  # each fold model predicts exactly the fold it did not fit on
        held = read_predictions(run.fold_run(fold).predictions("val"))
        assert {folds[i] for i in held.ids} == {fold}
        assert not set(held.ids) & set(json.loads(run.fold_run(fold).splits.read_text())["train"])
    holdout = read_predictions(run.predictions("val"))
    assert sorted(holdout.ids) == sorted(s.id for s in dataset.split("val"))
    assert json.loads(run.config.read_text())["kind"] == "cross-fit"


def test_lpft_first_step_starts_from_the_probe(data, tmp_path, monkeypatch):
    from finetune import train as train_module

    cfg = tiny_config(data, tmp_path / "lpft", head_init="probe", epochs=1)
    seen = {}
    original = train_module.Trainer.train_epoch

    def spy(self, *args, **kwargs):
        if not seen:  # before the first optimizer step
            head = self.model.get_classifier()
            seen["weight"], seen["bias"] = head.weight.detach().clone(), head.bias.detach().clone()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(train_module.Trainer, "train_epoch", spy)
    train_module.finetune(cfg, progress=False)
    # The same head, fitted independently on the run's train split: the probe on center crops and augmented views,
    # scaled to the smoothed training loss.
    dataset = read_dataset(data)
    model, _, _, dcfg = build_model(cfg, len(dataset.classes))
    init = fit_head_init(model, dataset.split("train"), dcfg, cfg, CPU, 0)
    assert init.views == LPFT_VIEWS and 0 < init.scale <= 1
    np.testing.assert_allclose(seen["weight"].numpy(), init.scale * init.probe.coef_, atol=1e-5)
    np.testing.assert_allclose(seen["bias"].numpy(), init.scale * init.probe.intercept_, atol=1e-5)
    assert np.abs(seen["weight"].numpy()).max() > 0.05  # far from the default head (std 0.01): the check can fail


def test_head_scale_minimises_the_smoothed_loss():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    confident = 12.0 * np.eye(3)[labels] + rng.normal(0, 1, (400, 3))  # right, but far too sure for smoothing 0.1
    scale = head_scale(confident, labels, 0.1)
    assert scale < 0.7
    best = smoothed_loss(scale * confident, labels, 0.1)
    for other in (0.8 * scale, 1.25 * scale, 1.0):
        assert smoothed_loss(other * confident, labels, 0.1) > best
    # Scores already less sure than the smoothed target: never scaled up.
    assert head_scale(0.2 * confident, labels, 0.1) == 1.0
    # Without smoothing and augmentation a right, confident head keeps its size.
    assert head_scale(confident, labels, 0.0) == 1.0


def test_cli_linear_probe_and_refusals(data, tmp_path):
    from zoo.cli import main

    args = ["finetune", "test_resnet", "--data", str(data), "--no-pretrained", "--input-size", "32", "--workers", "0"]
    ok = CliRunner().invoke(main, args + ["--out", str(tmp_path / "r"), "--linear-probe"])
    assert ok.exit_code == 0, ok.output
    assert "linear_probe" in ok.output
    again = CliRunner().invoke(main, args + ["--out", str(tmp_path / "r"), "--linear-probe"])
    assert again.exit_code == 1 and "already holds a run" in again.output
    both = CliRunner().invoke(main, args + ["--out", str(tmp_path / "b"), "--linear-probe", "--head-init", "probe"])
    assert both.exit_code == 1 and "--head-init probe" in both.output and len(both.output.strip().splitlines()) == 1
