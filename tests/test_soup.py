"""Model soups (finetune/soup.py, `zoo soup`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import make_image_folder, tiny_config
from finetune.soup import make_soup
from finetune.train import finetune
from zoo.errors import UserInputError
from zoo.predictions import read_predictions, write_predictions
from zoo.rundir import RunDir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three test_resnet runs from the same starting weights (seed 0), trained differently; one nearly untrained."""
    root = tmp_path_factory.mktemp("soup")
    data = make_image_folder(root / "data", per_class=(10, 5, 0))
    out = {}
    for name, overrides in {"a": dict(lr=3e-3), "b": dict(lr=1e-2, freeze=0), "c": dict(lr=1e-5, epochs=1)}.items():
        finetune(tiny_config(data, root / name, **overrides), progress=False)
        out[name] = root / name
    out["root"], out["data"] = root, data
    return out


def _val_loss(run) -> float:
    from finetune.engine import log_loss_and_accuracy

    p = read_predictions(RunDir(run).predictions("val"))
    return log_loss_and_accuracy(p.logits, p.labels)[0]


@pytest.mark.parametrize("bn", ["reestimate", "average"])
def test_soup_of_one_run_is_the_run(runs, tmp_path, bn):
    result = make_soup([str(runs["a"])], str(tmp_path / "soup"), bn=bn, log=lambda m: None)
    original, souped = load_file(str(RunDir(runs["a"]).model)), load_file(str(result.run.model))
    assert original.keys() == souped.keys()
    for key in original:
        assert torch.equal(original[key], souped[key]), key  # bit-identical, BatchNorm statistics included
    np.testing.assert_allclose(read_predictions(result.run.predictions("val")).logits,
                               read_predictions(RunDir(runs["a"]).predictions("val")).logits, atol=1e-5)


def test_uniform_soup_of_two_is_their_parameter_mean(runs, tmp_path):
    result = make_soup([str(runs["a"]), str(runs["b"])], str(tmp_path / "soup"), bn="average", log=lambda m: None)
    a, b = load_file(str(RunDir(runs["a"]).model)), load_file(str(RunDir(runs["b"]).model))
    souped = load_file(str(result.run.model))
    moved = 0
    for key, tensor in souped.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, (a[key] + b[key]) / 2, rtol=0, atol=1e-7)
            moved += not torch.equal(a[key], b[key])
    assert moved > 10  # the two runs really differ, so the mean is not trivially either of them
    config = json.loads(result.run.config.read_text())
    assert config["soup"]["kept"] == [str(runs["a"]), str(runs["b"])] and config["backbone"] == "test_resnet"
    # The "plain timm" recipe of docs/commands.md loads it, and it predicts what the soup's val file says.
    model = timm.create_model("test_resnet", pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(result.run.model), num_classes=3))
    torch.testing.assert_close(model.get_classifier().weight, souped["fc.weight"])


def test_reestimated_batchnorm_changes_only_trained_norm_layers(runs, tmp_path):
    result = make_soup([str(runs["a"]), str(runs["b"])], str(tmp_path / "soup"), bn="reestimate", log=lambda m: None)
    a, b = load_file(str(RunDir(runs["a"]).model)), load_file(str(RunDir(runs["b"]).model))
    souped = load_file(str(result.run.model))
    for key, tensor in souped.items():
        if key.endswith(("running_mean", "running_var")):
            if torch.equal(a[key], b[key]):  # a layer both runs kept frozen keeps its statistics
                assert torch.equal(tensor, a[key]), key
            else:
                assert not torch.allclose(tensor, (a[key] + b[key]) / 2), key
        elif tensor.is_floating_point():
            torch.testing.assert_close(tensor, (a[key] + b[key]) / 2, rtol=0, atol=1e-7)


def test_greedy_never_scores_worse_than_its_best_ingredient(runs, tmp_path):
    names = [str(runs[k]) for k in ("c", "a", "b")]
    result = make_soup(names, str(tmp_path / "soup"), method="greedy", log=lambda m: None)
    own = {n: _val_loss(n) for n in names}
    best = min(own, key=own.get)
    assert result.kept[0] == best
    assert result.scores["log_loss"] <= own[best] + 1e-5
    soup_val = read_predictions(result.run.predictions("val"))
    assert sorted(soup_val.ids) == sorted(read_predictions(RunDir(runs["a"]).predictions("val")).ids)
    assert [t["kept"] for t in result.trace][0] and len(result.trace) == 3


def _copy_with(runs, tmp_path, name, **changes):
    target = tmp_path / name
    shutil.copytree(runs["a"], target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("field, value", [("backbone", "test_efficientnet"), ("classes", ["ant", "bee", "dog"]),
                                          ("start_weights_sha256", "0" * 64), ("model_kwargs", {"img_size": 64})])
def test_incompatible_runs_are_refused_in_one_line(runs, tmp_path, field, value):
    from zoo.cli import main

    other = _copy_with(runs, tmp_path, "other", **{field: value})
    result = CliRunner().invoke(main, ["soup", str(runs["a"]), str(other), "--out", str(tmp_path / "soup")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and str(other) in lines[0] and str(runs["a"]) in lines[0], result.output
    assert not (tmp_path / "soup").exists()


def test_runs_with_other_validation_ids_are_refused(runs, tmp_path):
    other = _copy_with(runs, tmp_path, "other")
    preds = read_predictions(RunDir(other).predictions("val"))
    write_predictions(RunDir(other).predictions("val"), preds.take(range(1, len(preds.ids))))
    with pytest.raises(UserInputError, match="different validation ids"):
        make_soup([str(runs["a"]), str(other)], str(tmp_path / "soup"), method="greedy", log=lambda m: None)


def test_cross_fit_is_souped_uniformly_and_scored_on_its_holdout(runs, tmp_path):
    from finetune.probe_run import linear_probe

    crossfit = linear_probe(tiny_config(runs["data"], tmp_path / "k", linear_probe=True, folds=3)).run
    with pytest.raises(UserInputError, match="--score-split holdout"):
        make_soup([str(crossfit.root)], str(tmp_path / "greedy"), method="greedy", log=lambda m: None)
    result = make_soup([str(crossfit.root)], str(tmp_path / "soup"), log=lambda m: None)
    assert len(result.kept) == 3
    heads = [load_file(str(crossfit.fold_run(i).model))["fc.weight"] for i in (1, 2, 3)]
    torch.testing.assert_close(load_file(str(result.run.model))["fc.weight"], sum(heads) / 3)
    soup_val = read_predictions(result.run.predictions("val"))
    assert sorted(soup_val.ids) == sorted(read_predictions(crossfit.predictions("val")).ids)  # the untouched holdout
    picked = make_soup([str(crossfit.root)], str(tmp_path / "picked"), method="greedy", score_split="holdout", log=lambda m: None)
    assert "optimistic" in json.loads(picked.run.config.read_text())["soup"]["note"]
