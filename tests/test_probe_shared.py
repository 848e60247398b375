"""A probe cross-fit predicts with one backbone pass and its K heads, when (and only when) its fold models share
their backbone, tensor for tensor; the numbers are those of K separate passes."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from finetune import loaders
from finetune.engine import resolve_hardware
from finetune.inference import (FoldHeads, load_pass_model, load_run, predict_logits, predict_run, shared_backbone,
                                tta_views)
from finetune.member import train_member
from tests.conftest import make_image_folder, tiny_config
from zoo.data import read_prediction_images
from zoo.predictions import mean_log_probability
from zoo.rundir import RunDir

CPU = resolve_hardware("cpu", False, False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("shared") / "data", per_class=(8, 3, 3))


@pytest.fixture(scope="module")
def probe_crossfit(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "lp"
    train_member(tiny_config(data, out, linear_probe=True, folds=3), log=lambda m: None)
    return RunDir(out)


def _k_passes(run: RunDir, data, tta: int) -> np.ndarray:
    """The cross-fit's test predictions the long way: every fold model on every image, then the mean probability."""
    root, samples = read_prediction_images(data, run.read_config()["classes"], "test")
    outputs = []
    for fold_run in run.fold_runs():
        model, config = load_run(fold_run.root)
        loader = loaders.eval_loader(samples, loaders.eval_transform(config["data_config"]), batch_size=4, workers=0,
                                     pin_memory=False)
        outputs.append(predict_logits(model, loader, CPU, tta_views(tta))[0])
    return mean_log_probability(outputs)


@pytest.mark.parametrize("tta", [1, 2])
def test_one_backbone_pass_gives_the_k_pass_numbers(probe_crossfit, data, tta):
    said = []
    preds = predict_run(probe_crossfit.root, data, split="test", tta=tta, device="cpu", log=said.append, progress=False)
    assert any("share their backbone: one pass and 3 heads" in line for line in said)
    np.testing.assert_allclose(preds.logits, _k_passes(probe_crossfit, data, tta), atol=2e-5)
    assert preds.split == "test" and preds.tta == tta and len(preds.ids) == 9


def test_the_shared_backbone_is_checked_not_assumed(probe_crossfit, tmp_path):
    import shutil

    copy = RunDir(tmp_path / "lp")
    shutil.copytree(probe_crossfit.root, copy.root)
    assert shared_backbone(copy.fold_runs()) is not None
    model, _, passes = load_pass_model(copy.root)
    assert passes == 1 and isinstance(model, FoldHeads) and model.weight.shape[0] == 3  # three heads on one backbone
    path = copy.fold_run(2).model
    state = load_file(str(path))
    key = next(k for k, v in state.items() if v.is_floating_point() and "classifier" not in k and "fc" not in k)
    state[key] = state[key] + 1e-3  # one backbone tensor of one fold model differs
    save_file(state, str(path), metadata={"format": "pt"})
    assert shared_backbone(copy.fold_runs()) is None
    assert load_pass_model(copy.root)[2] == 3  # back to one pass per fold model


def test_a_fine_tuned_cross_fit_keeps_one_pass_per_fold_model(data, tmp_path):
    out = tmp_path / "ft"
    train_member(tiny_config(data, out, folds=2, epochs=1, freeze=0), log=lambda m: None)
    run = RunDir(out)
    assert shared_backbone(run.fold_runs()) is None
    model, _, passes = load_pass_model(run.root)
    assert passes == 2 and not isinstance(model, FoldHeads)
