"""The finetune-side commands, as a user types them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from zoo.cli import main
from zoo.predictions import read_predictions

TINY = ["--no-pretrained", "--epochs", "1", "--batch-size", "8", "--input-size", "32", "--workers", "0", "--auto-augment", "none"]


def test_finetune_then_predict_with_tta(tmp_path, image_folder):
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(main, ["finetune", "test_convnext", "--data", str(image_folder), "--out", str(run), *TINY, "--freeze", "1"])
    assert result.exit_code == 0, result.output
    assert "peak lr" in result.output and "frozen" in result.output
    # The line it prints is the run's best epoch: its val_loss is that of the saved validation predictions.
    from finetune.engine import log_loss_and_accuracy

    line = next(l for l in result.output.splitlines() if l.startswith(str(run) + "\t"))
    printed = dict(kv.split("=") for kv in line.split("\t")[1:4])
    val = read_predictions(run / "predictions" / "val.safetensors")
    assert float(printed["val_loss"]) == pytest.approx(log_loss_and_accuracy(val.logits, val.labels)[0], abs=1e-4)
    out = tmp_path / "test.safetensors"
    result = runner.invoke(main, ["predict", str(run), "--data", str(image_folder), "--split", "val", "--tta", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    preds = read_predictions(out)
    assert preds.tta == 2 and preds.split == "val" and len(preds.ids) == 12 and preds.backbone == "test_convnext"
    # Any flat folder of images: unknown labels are -1.
    result = runner.invoke(main, ["predict", str(run), "--data", str(image_folder / "val" / "ant"), "--split", "all", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (read_predictions(out).labels == -1).all()


@pytest.mark.parametrize("args,message", [
    (["finetune", "test_resnet", "--data", "{missing}", "--out", "{run}"], "no such file or folder"),
    (["finetune", "test_resnet", "--data", "{data}", "--out", "{run}", "--lr", "-1"], "--lr must be a positive number, got -1"),
    (["finetune", "test_resnet", "--data", "{data}", "--out", "{run}", "--layer-decay", "1.5"], "--layer-decay must be in (0, 1]"),
    (["finetune", "nosuchnet_xl", "--data", "{data}", "--out", "{run}"], "unknown timm model 'nosuchnet_xl'"),
    (["finetune", "--resume", "--out", "{run}"], "nothing to resume"),
    (["predict", "{data}", "--data", "{data}", "--out", "{run}/p.safetensors"], "not a zoo run directory"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path, image_folder, args, message):
    args = [a.format(missing=tmp_path / "missing", run=tmp_path / "run", data=image_folder) for a in args]
    result = CliRunner().invoke(main, args + (TINY if args[0] == "finetune" and "--resume" not in args else []))
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1


def test_lr_find_suggests_a_rate_and_plots(tmp_path, image_folder):
    plot = tmp_path / "lr.png"
    result = CliRunner().invoke(main, ["lr-find", "test_resnet", "--data", str(image_folder), "--no-pretrained", "--input-size", "32",
                                       "--batch-size", "4", "--steps", "30", "--workers", "0", "--out", str(plot)])
    assert result.exit_code == 0, result.output
    assert "suggested --lr" in result.output and plot.read_bytes()[:4] == b"\x89PNG"


def test_lr_find_valley_is_inside_the_descent():
    import numpy as np

    from finetune.lr_find import analyse

    lrs = list(np.logspace(-6, 0, 60))
    # Flat, then a clean descent between 1e-4 and 1e-2, then divergence.
    losses = [2.0 if lr < 1e-4 else (2.0 - np.log10(lr / 1e-4) * 0.8 if lr < 1e-2 else 0.4 + (np.log10(lr / 1e-2)) * 5) for lr in lrs]
    result = analyse(lrs, losses, beta=0.0)
    assert 1e-4 < result.valley < 1e-2
    assert 1e-4 <= result.steepest <= 1e-2
