"""A run's files: reloadable with plain timm, robust to corrupt images, resumable exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from finetune.inference import predict_run
from finetune.train import finetune
from tests.conftest import make_image_folder, tiny_config
from zoo.errors import UserInputError
from zoo.predictions import read_predictions


def quiet(message):
    pass


def test_best_checkpoint_reloaded_with_plain_timm_gives_the_logits_the_run_saw(tmp_path, image_folder):
    run = tmp_path / "run"
    finetune(tiny_config(image_folder, run, backbone="test_efficientnet", epochs=2), progress=False, log=quiet)
    config = json.loads((run / "config.json").read_text())
    saw = read_predictions(run / "predictions" / "val.safetensors")
    # Exactly the loading recipe of docs/commands.md: plain timm, nothing from zoo.
    model = timm.create_model("test_efficientnet", num_classes=3, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(run / "model.safetensors"), num_classes=3)).eval()
    from PIL import Image

    transform = timm.data.create_transform(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["data_config"].items()})
    images = torch.stack([transform(Image.open(image_folder / sid).convert("RGB")) for sid in saw.ids])
    with torch.no_grad():
        logits = model(images).numpy()
    np.testing.assert_allclose(logits, saw.logits, rtol=1e-4, atol=1e-5)
    assert saw.classes == ["ant", "bee", "cat"] == config["classes"]
    # zoo predict gives the same logits again (and TTA differs but keeps shapes).
    again = predict_run(run, image_folder, split="val")
    assert again.ids == saw.ids
    np.testing.assert_allclose(again.logits, saw.logits, rtol=1e-4, atol=1e-5)
    tta = predict_run(run, image_folder, split="val", tta=4)
    assert tta.logits.shape == saw.logits.shape and not np.allclose(tta.logits, saw.logits)
    np.testing.assert_allclose(np.exp(tta.logits).sum(1), 1.0, rtol=1e-5)


def test_corrupt_and_empty_images_are_skipped_and_listed_not_a_crash(tmp_path, image_folder):
    (image_folder / "train" / "ant" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 50)
    (image_folder / "train" / "bee" / "empty.png").write_bytes(b"")
    (image_folder / "val" / "cat" / "text.png").write_text("not an image")
    messages = []
    result = finetune(tiny_config(image_folder, tmp_path / "run", epochs=1), progress=False, log=messages.append)
    assert result.best_epoch == 1
    listed = (tmp_path / "run" / "skipped_images.txt").read_text()
    for name in ("train/ant/truncated.jpg", "train/bee/empty.png", "val/cat/text.png"):
        assert name in listed
    assert any("skipped 3 unreadable" in m for m in messages)
    ids = read_predictions(tmp_path / "run" / "predictions" / "val.safetensors").ids
    assert "val/cat/text.png" not in ids and len(ids) == 12


@pytest.mark.parametrize("backbone,extra", [("test_resnet", {}), ("test_vit", {"ema": True, "accum_steps": 2})])
def test_resume_after_stopping_gives_the_same_result_as_an_unbroken_run(tmp_path, image_folder, backbone, extra):
    options = dict(backbone=backbone, epochs=3, auto_augment="rand-m9-mstd0.5", lr=5e-3, **extra)
    finetune(tiny_config(image_folder, tmp_path / "straight", **options), progress=False, log=quiet)
    first = finetune(tiny_config(image_folder, tmp_path / "broken", **options), progress=False, log=quiet, stop_after_epoch=1)
    assert first.stopped == "interrupted" and first.epochs_run == 1
    resumed = finetune(tiny_config(image_folder, tmp_path / "broken", resume=True, **options), progress=False, log=quiet)
    assert resumed.epochs_run == 3
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "broken" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "broken" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ma = (tmp_path / "straight" / "metrics.csv").read_text().splitlines()
    mb = (tmp_path / "broken" / "metrics.csv").read_text().splitlines()
    strip = lambda lines: [",".join(x for i, x in enumerate(l.split(",")) if i not in (5, 6)) for l in lines]  # timings differ
    assert strip(ma) == strip(mb)


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, image_folder):
    finetune(tiny_config(image_folder, tmp_path / "run", epochs=1), progress=False, log=quiet)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(UserInputError, match="already holds a run; pass --resume"):
        finetune(tiny_config(image_folder, tmp_path / "run", epochs=1), progress=False, log=quiet)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before


def test_early_stopping_keeps_the_best_epoch(tmp_path, image_folder, monkeypatch):
    # Validation losses scripted per epoch: best at epoch 2, then two epochs without improvement.
    import finetune.train

    scripted = iter([(1.0, 0.5), (0.5, 0.6), (0.7, 0.6), (0.8, 0.6), (0.1, 0.9), (0.1, 0.9)])
    monkeypatch.setattr(finetune.train, "log_loss_and_accuracy", lambda logits, labels: next(scripted))
    result = finetune.train.finetune(tiny_config(image_folder, tmp_path / "run", epochs=6, patience=2), progress=False,
                                     log=quiet)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    assert (result.stopped, result.best_epoch, len(rows), result.best_val_loss) == ("early-stopped", 2, 4, 0.5)
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["best"]["epoch"] == 2 and json.loads((tmp_path / "run" / "result.json").read_text())["best_epoch"] == 2


def test_class_imbalance_loss_weights_and_sampler(tmp_path):
    from finetune.loaders import class_loss_weights, train_loader
    from zoo.data import Sample

    weights = class_loss_weights([100, 25, 4])
    assert weights[1] / weights[0] == pytest.approx(2.0) and weights[2] / weights[0] == pytest.approx(5.0)
    assert float((weights * torch.tensor([100.0, 25.0, 4.0])).sum() / 129) == pytest.approx(1.0)  # mean 1 over samples
    samples = [Sample(tmp_path / f"{i}.png", f"{i}", 0 if i < 90 else 1) for i in range(100)]
    loader = train_loader(samples, None, batch_size=100, workers=0, generator=torch.Generator().manual_seed(0),
                          num_classes=2, balanced=True, drop_last=False, pin_memory=False)
    drawn = [samples[i].label for i in loader.sampler]
    assert 0.35 < np.mean(drawn) < 0.65  # 10% of the data, about half the draws
    # Each option changes training: the same seed gives other weights than plain training.
    data = make_image_folder(tmp_path / "data", per_class=(6, 3, 0))
    for class_dir, keep in (("bee", 2), ("cat", 1)):  # imbalance: 6 ant, 2 bee, 1 cat
        for extra in sorted((data / "train" / class_dir).iterdir())[keep:]:
            extra.unlink()
    trained = {}
    for balance in ("none", "loss", "sampler"):
        finetune(tiny_config(data, tmp_path / balance, epochs=1, balance=balance), progress=False, log=quiet)
        trained[balance] = load_file(tmp_path / balance / "model.safetensors")
    head = [k for k in trained["none"] if k.endswith("weight")][-1]
    for balance in ("loss", "sampler"):
        assert not torch.allclose(trained[balance][head], trained["none"][head]), f"--balance {balance} changed nothing"


def test_run_config_records_what_reproduces_the_run(tmp_path, image_folder):
    finetune(tiny_config(image_folder, tmp_path / "run", epochs=1), progress=False, log=quiet)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    for key in ("backbone", "classes", "class_order", "data_config", "options", "start_weights_sha256", "versions", "stage_groups"):
        assert key in config
    assert config["data_config"]["input_size"] == [3, 32, 32]
    assert config["options"]["seed"] == 0 and config["options"]["freeze"] == 2
    assert len(config["start_weights_sha256"]) == 64
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["per_class_accuracy"]) == {"ant", "bee", "cat"}
    assert np.array(report["confusion_matrix"]).sum() == 12
    assert (tmp_path / "run" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "run" / "worst_val_errors.csv").read_text().startswith("id,label,predicted")


def test_a_fixed_size_vit_trains_and_predicts_at_the_asked_input_size(tmp_path, image_folder):
    # vit_tiny is built for 224x224 inputs; --input-size must rebuild it for 32x32.
    run = tmp_path / "run"
    finetune(tiny_config(image_folder, run, backbone="vit_tiny_patch16_224", epochs=1), progress=False, log=quiet)
    config = json.loads((run / "config.json").read_text())
    assert config["model_kwargs"]["img_size"] == 32 and config["data_config"]["input_size"] == [3, 32, 32]
    assert predict_run(run, image_folder, split="val").logits.shape == (12, 3)
