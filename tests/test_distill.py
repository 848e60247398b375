"""zoo distill: teacher targets from an ensemble of cross-fits, consistent views, the student's loss and run.

Members are tiny timm models on generated images (tiny_config): a cross-fit of fine-tunes (test_efficientnet,
40 px, bicubic, K = 2 fold models of their own) and a linear-probe cross-fit (test_vit, 48 px: one backbone and
K heads), in an ensemble with temperatures and weights; the student is test_resnet at 32 px.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_image_folder, tiny_config

CLASSES = ["ant", "bee", "cat"]
STUDENT = dict(pretrained=False, epochs=2, batch_size=8, input_size=32, workers=0, threads=1, warmup_epochs=0.5,
               auto_augment="none", patience=0)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    from ensemble.file import write_ensemble
    from ensemble.model import Ensemble, Member
    from finetune.member import train_member

    root = tmp_path_factory.mktemp("distill")
    data = make_image_folder(root / "data", per_class=(8, 4, 0), size=(44, 60))
    train_member(tiny_config(data, root / "eff", backbone="test_efficientnet", input_size=40, folds=2, epochs=1,
                             lr=0.02, freeze=0, label_smoothing=0.0))
    train_member(tiny_config(data, root / "vit", backbone="test_vit", input_size=48, folds=2, linear_probe=True))
    ens = Ensemble(classes=CLASSES, members=[Member("eff", "test_efficientnet", 0.6, 2.0, run=str(root / "eff")),
                                             Member("vit", "test_vit", 0.4, 3.0, run=str(root / "vit"))],
                   final_temperature=1.5)
    return root, data, write_ensemble(root / "ens.json", ens)


def _pool(data):
    from zoo.data import read_dataset

    return read_dataset(data).split("train")


def _targets(ens_file, samples, teacher, views=3):
    from ensemble.file import read_ensemble
    from finetune.views import ViewSpec
    from zoo.pipeline.distill import teacher_log_probs

    ens = read_ensemble(ens_file)
    spec = ViewSpec(views, seed=0)
    return ens, spec, teacher_log_probs(ens, [m.run for m in ens.members], samples, spec, teacher, progress=False)


def _fold_model_log_probs(run, fold_models, sample, view, spec):
    """The log of the mean probability of ``fold_models`` (1-based) of a member on one view of one image, by hand."""
    from finetune.inference import load_run
    from finetune.views import ViewRenderer
    from zoo.data import load_rgb

    outs = []
    for k in fold_models:
        model, config = load_run(f"{run}/fold-{k}")
        x = ViewRenderer(config["data_config"], spec)(load_rgb(sample.path), sample.id, view)
        with torch.no_grad():
            outs.append(model(x[None]).float().log_softmax(1)[0].numpy())
    return np.log(np.mean(np.exp(outs), 0))


def test_pool_target_is_the_ensemble_of_exactly_the_fold_models_that_did_not_train_on_it(members):
    from ensemble.predict import ensemble_predictions
    from zoo.folds import read_folds
    from zoo.predictions import load_predictions

    root, data, ens_file = members
    samples = _pool(data)
    ens, spec, oof = _targets(ens_file, samples, "oof")
    _, _, every = _targets(ens_file, samples, "all")
    folds = read_folds(root / "eff")["folds"]
    for i in (0, 5, len(samples) - 1):
        s = samples[i]
        for view in range(spec.count):
            own = [_fold_model_log_probs(m.run, [folds[s.id]], s, view, spec) for m in ens.members]
            both = [_fold_model_log_probs(m.run, [1, 2], s, view, spec) for m in ens.members]
            np.testing.assert_allclose(oof[i, view], ens.predict_log_proba([o[None] for o in own])[0], atol=1e-4)
            np.testing.assert_allclose(every[i, view], ens.predict_log_proba([b[None] for b in both])[0], atol=1e-4)
        assert not np.allclose(oof[i], every[i], atol=1e-3)  # the other fold model does change the target
    # The centre view is the ensemble's out-of-fold prediction, as `zoo ensemble predict` makes it from the oof files.
    expected = ensemble_predictions(ens, [load_predictions(m.run, "oof") for m in ens.members], "oof", 1, "ens", None)
    row = {sample_id: j for j, sample_id in enumerate(expected.ids)}
    np.testing.assert_allclose(oof[:, 0], expected.logits[[row[s.id] for s in samples]], atol=1e-4)


def test_views_are_the_same_region_for_every_network_and_differ_between_views():
    from PIL import Image

    from finetune.views import ViewRenderer, ViewSpec, view_params

    spec = ViewSpec(4, seed=3)
    boxes = {view_params(spec, "a/b.png", v, 120, 90) for v in range(1, 4)}
    assert len(boxes) == 3 and view_params(spec, "a/b.png", 2, 120, 90) == view_params(ViewSpec(4, seed=3), "a/b.png", 2, 120, 90)
    assert view_params(ViewSpec(4, seed=4), "a/b.png", 2, 120, 90) != view_params(spec, "a/b.png", 2, 120, 90)
    # A left-to-right ramp: the mean of a rendered view is the mean of its box's columns, whatever the input size.
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 120).astype(np.uint8)[None, :, None], (90, 1, 3)))
    means = []
    for size in (32, 64):
        dcfg = {"input_size": (3, size, size), "interpolation": "bilinear", "mean": (0, 0, 0), "std": (1, 1, 1), "crop_pct": 1.0}
        means.append(float(ViewRenderer(dcfg, spec)(ramp, "a/b.png", 2).mean()))
    assert means[0] == pytest.approx(means[1], abs=0.01)


def test_alpha_1_is_exactly_the_plain_cross_entropy():
    from finetune.engine import Trainer, distillation_loss, smooth_one_hot, soft_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 2, 1, 0])
    teacher = torch.randn(6, 3, generator=g).log_softmax(1)
    hard = smooth_one_hot(labels, 3, 0.1)
    plain = soft_cross_entropy(logits, hard)
    assert torch.equal(distillation_loss(logits, labels, teacher, hard, alpha=1.0, temperature=4.0), plain)
    # The trainer's loss, as the training step calls it: with the teacher at alpha 1, and without a teacher.
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    from finetune.engine import resolve_hardware

    hw = resolve_hardware("cpu", False, False)
    student = Trainer(model, opt, None, hw, 3, label_smoothing=0.1, distill=(1.0, 4.0))
    finetune = Trainer(model, opt, None, hw, 3, label_smoothing=0.1)
    assert torch.equal(student.loss(logits, labels, hard, teacher), finetune.loss(logits, labels, hard))
    # Alpha 0 is the teacher alone: T^2 KL, zero when the student's logits are the teacher's.
    assert distillation_loss(teacher, labels, teacher, hard, alpha=0.0, temperature=2.0).item() == pytest.approx(0, abs=1e-6)
    assert distillation_loss(logits, labels, teacher, hard, alpha=0.0, temperature=2.0).item() > 0


def _distil(members, out, **kwargs):
    from zoo.pipeline.distill import distill

    root, data, ens_file = members
    options = dict(STUDENT, views=3, log=lambda _: None, progress=False)
    options.update(kwargs)
    return distill(ens_file, data, "test_resnet", out, **options)


def test_student_trains_on_the_view_the_teacher_saw_and_uses_unlabeled_images(members, tmp_path, monkeypatch):
    from finetune import views
    from finetune.views import ViewRenderer
    from zoo.data import load_rgb
    from zoo.pipeline.distill import read_teacher_targets
    from zoo.rundir import RunDir

    extra = make_image_folder(tmp_path / "extra", per_class=(2, 0, 0), size=(44, 60), seed=5) / "train"
    seen = []
    original = views.ViewDataset.__getitem__

    def record(self, index):
        item = original(self, index)
        if self.targets is not None:
            seen.append((self.samples[index], self.view_of(index), item[0], item[3]))
        return item
    monkeypatch.setattr(views.ViewDataset, "__getitem__", record)
    result = _distil(members, tmp_path / "student", unlabeled=[str(extra)])
    run = RunDir(tmp_path / "student")
    config = run.read_config()
    targets = read_teacher_targets(run)
    row = {sample_id: i for i, sample_id in enumerate(targets.ids)}
    renderer = ViewRenderer(config["data_config"], targets.spec)
    assert len(seen) == 2 * (24 + 6)  # two epochs of the 24 train images and the 6 unlabeled ones
    assert {v for _, v, _, _ in seen} == {0, 1, 2}
    for sample, view, image, target in seen:
        assert torch.equal(target, torch.from_numpy(targets.log_probs[row[sample.id], view]))
        assert torch.equal(image, renderer(load_rgb(sample.path), sample.id, view))
    # Unlabeled images: trained on (label -1), counted in the result, config.json and the epoch rows.
    assert result.unlabeled == 6 and len(targets.unlabeled) == 6
    assert sum(s.label < 0 for s, _, _, _ in seen) == 12
    assert config["distill"]["unlabeled_images"] == 6 and config["distill"]["teacher"] == "oof"
    assert config["distill"]["ensemble_sha256"] and config["distill"]["views"] == 3
    assert "unlabeled" in (run.metrics_csv.read_text().split("\n")[0] + str(result.summary))
    lines = run.metrics_csv.read_text().strip().split("\n")
    header = lines[0].split(",")
    assert all(int(float(r.split(",")[header.index("train_images")])) == 30 for r in lines[1:])
    assert json.loads(run.result.read_text())["best_epoch"] == 2  # the last epoch: nothing chosen on val/


def test_a_mixed_view_is_taught_by_the_fold_models_that_held_out_both_images(members):
    from ensemble.file import read_ensemble
    from finetune.inference import load_run
    from finetune.views import ViewRenderer, ViewSpec
    from zoo.data import load_rgb
    from zoo.folds import read_folds
    from zoo.pipeline.distill import teacher_log_probs, view_mixing

    root, data, ens_file = members
    samples, ens = _pool(data), read_ensemble(ens_file)
    runs = [m.run for m in ens.members]
    spec = ViewSpec(3, seed=0, mix=1.0)
    folds = read_folds(root / "eff")["folds"]
    mixing = view_mixing(runs, samples, spec, "oof")
    assert (mixing.partners[:, 0] == -1).all() and (mixing.partners[:, 1:] >= 0).all()  # the centre view: never mixed
    rows, views = np.nonzero(mixing.partners >= 0)  # partners are held out by the same fold models
    assert all(folds[samples[i].id] == folds[samples[mixing.partners[i, v]].id] for i, v in zip(rows, views))
    assert 0 < mixing.weights[:, 1:].min() and mixing.weights[:, 1:].max() < 1 and mixing.weights[:, 0].max() == 1
    every = view_mixing(runs, samples, spec, "all")
    assert any(folds[samples[i].id] != folds[samples[p].id] for i, p in enumerate(every.partners[:, 1]))  # with all: any two
    # The same draw whatever the order of the images.
    reordered = view_mixing(runs, samples[::-1], spec, "oof")
    n = len(samples)
    np.testing.assert_array_equal(n - 1 - reordered.partners[::-1, 1:], mixing.partners[:, 1:])
    targets = teacher_log_probs(ens, runs, samples, spec, "oof", progress=False, mixing=mixing)
    i, view = 3, 2
    j, weight = int(mixing.partners[i, view]), float(mixing.weights[i, view])
    by_hand = []
    for member in ens.members:  # the fold model that held out both images, on the mixed pixels
        model, config = load_run(f"{member.run}/fold-{folds[samples[i].id]}")
        renderer = ViewRenderer(config["data_config"], spec)
        own, other = renderer(load_rgb(samples[i].path), samples[i].id, view), renderer(load_rgb(samples[j].path), samples[j].id, view)
        mixed = renderer(load_rgb(samples[i].path), samples[i].id, view, (load_rgb(samples[j].path), samples[j].id), weight)
        torch.testing.assert_close(mixed, weight * own + (1 - weight) * other)
        with torch.no_grad():
            by_hand.append(model(mixed[None]).float().log_softmax(1).numpy())
    np.testing.assert_allclose(targets[i, view], ens.predict_log_proba(by_hand)[0], atol=1e-4)


def test_the_student_sees_the_mixed_view_its_teacher_saw(members, tmp_path, monkeypatch):
    from finetune import views
    from finetune.views import ViewRenderer
    from zoo.data import load_rgb
    from zoo.pipeline.distill import read_teacher_targets
    from zoo.rundir import RunDir

    seen = []
    original = views.ViewDataset.__getitem__

    def record(self, index):
        item = original(self, index)
        seen.append((self.samples[index], self.view_of(index), item[0], item[1], item[3]))
        return item
    monkeypatch.setattr(views.ViewDataset, "__getitem__", record)
    _distil(members, tmp_path / "student", view_mixup=0.5, epochs=1, alpha=0.5)
    run = RunDir(tmp_path / "student")
    config, targets = run.read_config(), read_teacher_targets(run)
    assert config["distill"]["view_mixup"] == 0.5 and targets.spec.mix == 0.5 and targets.mixing is not None
    row = {sample_id: i for i, sample_id in enumerate(targets.ids)}
    renderer = ViewRenderer(config["data_config"], targets.spec)
    mixed = 0
    for sample, view, image, label, target in seen:
        r = row[sample.id]
        assert torch.equal(target, torch.from_numpy(targets.log_probs[r, view]))
        partner = int(targets.mixing.partners[r, view])
        if partner < 0:
            assert label == sample.label and torch.equal(image, renderer(load_rgb(sample.path), sample.id, view))
            continue
        mixed += 1
        other = targets.ids[partner]
        other_path = next(s.path for s, *_ in seen if s.id == other)
        expected = renderer(load_rgb(sample.path), sample.id, view, (load_rgb(other_path), other),
                            float(targets.mixing.weights[r, view]))
        assert label == -1 and torch.equal(image, expected)  # no one hard label: the teacher's term alone
    assert mixed == sum(v > 0 for _, v, *_ in seen) > 0
    # Targets mixed among other images (here: a validation split taken from train) are not reused: they are made again.
    import shutil

    other = tmp_path / "split"
    other.mkdir()
    shutil.copy(run.teacher_targets, other / run.teacher_targets.name)
    _distil(members, other, view_mixup=0.5, epochs=1, alpha=0.5, val_from_train=True)
    remade = read_teacher_targets(RunDir(other))
    assert len(remade.ids) < len(targets.ids) and (remade.mixing.partners < len(remade.ids)).all()


def test_interrupted_distillation_resumes_bit_exact(members, tmp_path):
    from safetensors.torch import load_file

    from zoo.pipeline.distill import distill

    _distil(members, tmp_path / "whole", alpha=0.3, temperature=2.0)
    _distil(members, tmp_path / "parts", alpha=0.3, temperature=2.0, stop_after_epoch=1)
    assert not (tmp_path / "parts" / "result.json").exists()
    distill(None, None, None, tmp_path / "parts", resume=True, log=lambda _: None, progress=False)
    whole, parts = load_file(str(tmp_path / "whole/model.safetensors")), load_file(str(tmp_path / "parts/model.safetensors"))
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)


def test_the_student_is_an_ordinary_run(members, tmp_path):
    from finetune.inference import predict_run

    root, data, _ = members
    _distil(members, tmp_path / "s", epochs=1, views=1)
    preds = predict_run(tmp_path / "s", data, split="val", threads=1)
    assert preds.logits.shape == (12, 3) and preds.backbone == "test_resnet"


def test_the_student_exports_to_onnx_with_its_predictions(members, tmp_path):
    """A student ships as one ONNX graph (zoo export takes it like any run): the same probabilities as zoo's."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from finetune.inference import predict_run
    from zoo.onnx_predict import predict_onnx
    from zoo.pipeline.export import export

    root, data, _ = members
    _distil(members, tmp_path / "s", epochs=1, views=1)
    result = export(tmp_path / "s", tmp_path / "student.onnx")
    assert result.kind == "member" and result.max_difference <= 1e-4
    got, reference = predict_onnx(result.path, data, split="val", threads=1), predict_run(tmp_path / "s", data, split="val", threads=1)
    assert got.ids == reference.ids
    np.testing.assert_allclose(got.probabilities(), reference.probabilities(), rtol=0, atol=1e-4)


def _other_classes(members, tmp_path):
    from ensemble.file import read_ensemble, write_ensemble

    ens = read_ensemble(members[2])
    ens.classes = ["a", "b", "c"]
    return write_ensemble(tmp_path / "other.json", ens)


def _missing_member(members, tmp_path):
    from ensemble.file import read_ensemble, write_ensemble

    ens = read_ensemble(members[2])
    ens.members[1].run = str(tmp_path / "gone")
    return write_ensemble(tmp_path / "missing.json", ens)


@pytest.mark.parametrize("case, message", [
    ("classes", "differ from"),
    ("student", "unknown timm model 'no_such_net'"),
    ("missing", "run directory"),
    ("holdout", "holdout"),
    ("alpha", "--alpha must be in [0, 1]"),
    ("mixup-alpha-1", "a mixed view has no one hard label"),
])
def test_bad_inputs_are_one_line_each(members, tmp_path, case, message):
    from zoo.cli import main

    root, data, ens_file = members
    ens, student, extra = str(ens_file), "test_resnet", []
    if case == "classes":
        ens = str(_other_classes(members, tmp_path))
    elif case == "student":
        student = "no_such_net"
    elif case == "missing":
        ens = str(_missing_member(members, tmp_path))
    elif case == "holdout":
        extra = ["--unlabeled", str(data / "val")]
    elif case == "alpha":
        extra = ["--alpha", "1.5"]
    elif case == "mixup-alpha-1":
        extra = ["--alpha", "1", "--view-mixup", "1"]
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["distill", ens, "--data", str(data), "--student", student, "--out", str(out),
                                       "--no-pretrained", "--input-size", "32", "--threads", "1", *extra])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
    assert not out.exists()  # refused before anything was written


def test_zoo_run_distills_its_ensemble_into_a_student_row(tmp_path):
    import csv

    from zoo.pipeline.run import run_zoo
    from zoo.pipeline.zoo_file import MemberSpec, read_distill_table

    data = make_image_folder(tmp_path / "data", per_class=(6, 3, 0), size=(40, 48))
    zoo_file = tmp_path / "zoo.toml"
    zoo_file.write_text('[distill]\nbackbone = "test_resnet"\nviews = 2\nalpha = 0.5\nepochs = 1\npretrained = false\n'
                        'input_size = 32\nbatch_size = 8\nauto_augment = "none"\n')
    distill = read_distill_table(zoo_file)
    assert distill["views"] == 2 and distill["options"]["epochs"] == 1
    members = [MemberSpec("res", "test_resnet", options={"linear_probe": True}),
               MemberSpec("vit", "test_vit", options={"linear_probe": True, "input_size": 48})]
    result = run_zoo(data, tmp_path / "zoo", members, given={"pretrained": False, "input_size": 32, "workers": 0, "threads": 1},
                     folds=2, cv=2, latency_repeats=1, log=lambda _: None, distill=distill)
    rows = {r["name"]: r for r in csv.DictReader((tmp_path / "zoo" / "leaderboard.csv").open())}
    student = rows["student"]
    assert student["kind"] == "student" and float(student["holdout_log_loss"]) > 0 and float(student["ms_per_image_batch1"]) > 0
    config = json.loads((tmp_path / "zoo" / "student" / "config.json").read_text())
    assert config["distill"]["alpha"] == 0.5 and config["distill"]["members"] == ["res", "vit"]
    assert "student" in (tmp_path / "zoo" / "report.html").read_text() and result.status == "finished"
