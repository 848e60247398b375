"""The GPU code path: bf16 and fp16 (grad scaler) mixed precision, channels-last, torch.compile,
pinned memory with loader workers, a decoded-image cache feeding a GPU. Skipped without CUDA;
``bench/gpu_check.sh`` runs them on the day a GPU is lent (``pytest -m gpu``)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from tests.conftest import make_image_folder, tiny_config

# ZOO_GPU_TESTS_DEVICE=cpu runs what can run on the CPU (bf16 autocast, channels-last), to check these tests themselves.
DEVICE = os.environ.get("ZOO_GPU_TESTS_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_check.sh runs these on a GPU)")]
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="CUDA only (fp16 autocast, torch.compile's GPU kernels)")


def _quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("gpu") / "data", per_class=(12, 4, 4), size=(72, 96))


def _finetune(data, out, **overrides):
    from finetune.train import finetune

    options = dict(device=DEVICE, workers=2, threads=2, epochs=2)
    options.update(overrides)
    result = finetune(tiny_config(data, out, **options), log=_quiet)
    config = json.loads((out / "config.json").read_text())
    return result, config


def test_bf16_channels_last_with_cached_images_then_predict(data, tmp_path):
    from finetune.inference import predict_run

    if ON_CUDA and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    result, config = _finetune(data, tmp_path / "run", amp=True, channels_last=True, cache="ram")
    assert config["hardware"] == f"{DEVICE} (bf16 mixed, channels-last)", config["hardware"]
    assert result.best_epoch >= 1 and math.isfinite(result.best_val_loss)
    preds = predict_run(tmp_path / "run", data, split="test", tta=2, device=DEVICE, workers=2)
    assert preds.logits.shape == (12, 3) and np.isfinite(preds.logits).all()


@needs_cuda
def test_fp16_trains_with_a_grad_scaler(data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # as on a pre-Ampere GPU
    result, config = _finetune(data, tmp_path / "run", amp=True, channels_last=False)
    assert config["hardware"].endswith("(fp16 mixed + grad scaler)"), config["hardware"]
    assert math.isfinite(result.best_val_loss)
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert state["scaler"] and state["scaler"]["scale"] > 0  # the scaler ran and its state is resumable


def test_fp32_and_bf16_agree_at_the_start(data, tmp_path):
    # One epoch from the same seed: mixed precision changes the loss by rounding, not by a bug's margin.
    fp32, _ = _finetune(data, tmp_path / "fp32", amp=False, channels_last=False, epochs=1)
    mixed, _ = _finetune(data, tmp_path / "mixed", amp=True, channels_last=True, epochs=1)
    assert abs(fp32.best_val_loss - mixed.best_val_loss) < 0.05 * max(1.0, fp32.best_val_loss)


@needs_cuda
def test_compile(data, tmp_path):
    result, config = _finetune(data, tmp_path / "run", amp=True, channels_last=True, compile=True, epochs=1)
    assert config["options"]["compile"] is True and math.isfinite(result.best_val_loss)
