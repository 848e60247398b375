"""zoo export and zoo predict model.onnx: the ONNX graph's probabilities against zoo's own PyTorch predictions.

Members are tiny timm models trained for a few steps on generated images (tiny_config), read back through zoo's
data path on both sides: a single run (test_resnet, 32 px, bilinear), a cross-fit of fine-tunes
(test_efficientnet, 40 px, bicubic: K models in the graph), a linear-probe cross-fit (test_vit, 48 px: one backbone
and K heads) and the cross-fit's uniform soup; and an ensemble of the three backbones (three graph inputs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_image_folder, tiny_config

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOLERANCE = 1e-4  # the issue's: absolute, on probabilities
CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def zoo_runs(tmp_path_factory):
    from finetune.member import train_member

    root = tmp_path_factory.mktemp("export")
    data = make_image_folder(root / "data", per_class=(8, 4, 3), size=(44, 60))
    # lr 0.02 without label smoothing: members confident enough that a wrong preprocessing moves their probabilities.
    fast = dict(lr=0.02, freeze=0, label_smoothing=0.0)
    train_member(tiny_config(data, root / "res", backbone="test_resnet", input_size=32, **fast))
    train_member(tiny_config(data, root / "eff", backbone="test_efficientnet", input_size=40, folds=2, **fast))
    train_member(tiny_config(data, root / "vit", backbone="test_vit", input_size=48, folds=2, linear_probe=True))
    return root, data


@pytest.fixture(scope="module")
def ensemble_file(zoo_runs):
    from ensemble.file import write_ensemble
    from ensemble.model import Ensemble, Member

    root, _ = zoo_runs
    members = [Member("res", "test_resnet", 0.5, 2.0, run=str(root / "res")),
               Member("eff", "test_efficientnet", 0.3, 3.0, run=str(root / "eff")),
               Member("vit", "test_vit", 0.2, 8.0, run=str(root / "vit")),
               Member("unused", "test_resnet", 0.0, 1.0, run=str(root / "missing"))]  # weight 0: left out of the graph
    return write_ensemble(root / "ens.json", Ensemble(classes=CLASSES, members=members, final_temperature=1.5))


@pytest.fixture(scope="module")
def exported(zoo_runs, ensemble_file):
    """Each source exported once: name -> (ExportResult, zoo's PyTorch predictions of val/)."""
    from finetune.inference import predict_run
    from zoo.pipeline.export import export
    from zoo.pipeline.member_inference import ensemble_predict

    root, data = zoo_runs
    out = {}
    # The probe cross-fit (one backbone, K heads) is exported inside the ensemble, not again alone: the tests' time.
    for name, source, soup in (("res", root / "res", False), ("eff", root / "eff", False), ("eff-soup", root / "eff", True)):
        out[name] = export(source, root / f"{name}.onnx", soup=soup), None if soup else predict_run(source, data, split="val", threads=1)
    out["ensemble"] = export(ensemble_file, root / "ensemble.onnx"), ensemble_predict(ensemble_file, data=data, split="val")
    return out


def _soup_reference(root: Path, data: Path):
    """The cross-fit's uniform soup made by zoo soup, predicted by zoo."""
    from finetune.inference import predict_run
    from finetune.soup import make_soup

    make_soup([str(root / "eff")], str(root / "eff-soup"), threads=1)
    return predict_run(root / "eff-soup", data, split="val", threads=1)


@pytest.mark.parametrize("name", ["res", "eff", "eff-soup", "ensemble"])
def test_onnx_matches_pytorch_at_batch_1_and_7(zoo_runs, exported, name):
    from zoo.onnx_predict import predict_onnx

    root, data = zoo_runs
    result, reference = exported[name]
    if reference is None:
        reference = _soup_reference(root, data)
    assert result.max_difference <= TOLERANCE
    for batch in (1, 7):
        got = predict_onnx(result.path, data, split="val", batch_size=batch, threads=1)
        assert got.ids == reference.ids and got.classes == CLASSES
        np.testing.assert_array_equal(got.labels, reference.labels)
        np.testing.assert_allclose(got.probabilities(), reference.probabilities(), rtol=0, atol=TOLERANCE)


def test_ensemble_graph_has_one_input_per_preprocessing(exported):
    from zoo.onnx_predict import open_onnx

    result, _ = exported["ensemble"]
    model = open_onnx(result.path)
    assert [(i["name"], i["input_size"], i["members"]) for i in model.inputs] == [
        ("image_32x32", [3, 32, 32], ["res"]), ("image_40x40", [3, 40, 40], ["eff"]), ("image_48x48", [3, 48, 48], ["vit"])]
    assert [m["name"] for m in model.metadata["members"]] == ["res", "eff", "vit"]  # the zero-weight member is left out


def test_negative_control_another_members_preprocessing_fails(zoo_runs, exported):
    """Each input fed the interpolation and crop of the member next to it (same size): far outside the tolerance."""
    from zoo.data import load_rgb, read_prediction_images
    from zoo.onnx_predict import open_onnx, preprocess

    _, data = zoo_runs
    result, reference = exported["ensemble"]
    model = open_onnx(result.path)
    _, samples = read_prediction_images(data, CLASSES, "val")
    images = [load_rgb(s.path) for s in samples]
    wrong = [{**spec, **{k: model.inputs[(i + 1) % 3][k] for k in ("interpolation",)}, "crop_pct": 0.75}
             for i, spec in enumerate(model.inputs)]
    right = model.run([np.stack([preprocess(im, spec) for im in images]) for spec in model.inputs])
    swapped = model.run([np.stack([preprocess(im, spec) for im in images]) for spec in wrong])
    np.testing.assert_allclose(right, reference.probabilities(), rtol=0, atol=TOLERANCE)
    assert np.abs(swapped - reference.probabilities()).max() > 10 * TOLERANCE


def test_metadata_round_trips(zoo_runs, exported, ensemble_file):
    import hashlib

    import onnx

    from zoo import __version__
    from zoo.onnx_predict import open_onnx

    root, _ = zoo_runs
    result, _ = exported["res"]
    config = json.loads((root / "res" / "config.json").read_text())
    props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    spec = json.loads(props["zoo.inputs"])[0]
    assert json.loads(props["zoo.classes"]) == CLASSES and props["zoo.kind"] == "member"
    assert props["zoo.version"] == __version__ and props["zoo.backbone"] == "test_resnet"
    assert props["zoo.source_sha256"] == hashlib.sha256((root / "res" / "model.safetensors").read_bytes()).hexdigest()
    for key in ("input_size", "interpolation", "crop_pct", "mean", "std"):
        assert spec[key] == config["data_config"][key], key
    ens = open_onnx(exported["ensemble"][0].path).metadata
    assert ens["kind"] == "ensemble" and ens["combine"] == "arithmetic" and ens["final_temperature"] == 1.5
    assert [(m["weight"], m["temperature"]) for m in ens["members"]] == [(0.5, 2.0), (0.3, 3.0), (0.2, 8.0)]
    assert ens["source_sha256"] == hashlib.sha256(Path(ensemble_file).read_bytes()).hexdigest()
    assert [m["kind"] for m in ens["members"]] == ["member", "cross-fit", "cross-fit"]
    assert exported["eff"][0].kind == "cross-fit" and exported["eff-soup"][0].kind == "cross-fit soup"


@pytest.mark.parametrize("combine", ["arithmetic", "geometric"])
def test_ensemble_graph_is_the_ensembles_rule(tmp_path, combine):
    """EnsembleGraph against ensemble.model.Ensemble on the members' own log-probabilities (the graph's export is
    checked by every export and by the tests above)."""
    import torch

    from ensemble.model import Ensemble, Member
    from zoo.pipeline.export import EnsembleGraph, LogSoftmax

    torch.manual_seed(0)
    members = [LogSoftmax(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * s * s, 4))).eval() for s in (4, 6)]
    weights, temperatures = [0.7, 0.3], [0.5, 2.5]
    graph = EnsembleGraph(members, [0, 1], weights, temperatures, 0.8, combine).eval()
    pixels = [torch.rand(5, 3, s, s) * 4 for s in (4, 6)]
    ens = Ensemble(classes=list("wxyz"), members=[Member(str(i), "", w, t) for i, (w, t) in enumerate(zip(weights, temperatures))],
                   combine=combine, final_temperature=0.8)
    with torch.no_grad():
        got = graph(*pixels).numpy()
        expected = np.exp(ens.predict_log_proba([m(p).numpy() for m, p in zip(members, pixels)]))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_predict_cli_onnx_writes_the_same_csv_as_the_run(zoo_runs, exported, tmp_path):
    from zoo.cli import main

    root, data = zoo_runs
    runner = CliRunner()
    for source, out in ((str(exported["eff"][0].path), tmp_path / "onnx.csv"), (str(root / "eff"), tmp_path / "torch.csv")):
        result = runner.invoke(main, ["predict", source, "--data", str(data), "--split", "val", "--out", str(out), "--threads", "1"])
        assert result.exit_code == 0, result.output
    onnx_rows, torch_rows = ([line.split(",") for line in p.read_text().splitlines()] for p in (tmp_path / "onnx.csv", tmp_path / "torch.csv"))
    assert onnx_rows[0] == torch_rows[0] == ["id", "prediction", *CLASSES]
    assert [r[:2] for r in onnx_rows] == [r[:2] for r in torch_rows]
    np.testing.assert_allclose(np.array([r[2:] for r in onnx_rows[1:]], float), np.array([r[2:] for r in torch_rows[1:]], float),
                               rtol=0, atol=TOLERANCE)


def test_predict_onnx_never_imports_torch(zoo_runs, exported, tmp_path):
    """`zoo predict model.onnx` in a fresh interpreter: the CLI, onnxruntime and the prediction file, no torch."""
    _, data = zoo_runs
    out = tmp_path / "preds.safetensors"
    code = ("import sys\nfrom zoo.cli import main\n"
            f"try:\n    main(['predict', {str(exported['ensemble'][0].path)!r}, '--data', {str(data)!r}, '--split', 'val', "
            f"'--out', {str(out)!r}, '--threads', '1'])\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('no torch')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and "no torch" in result.stdout, result.stderr
    from zoo.predictions import read_predictions

    assert read_predictions(out).logits.shape == (12, 3)


def test_preprocess_is_timms_eval_transform(tmp_path):
    """The torch-free resize and crop against timm's eval transform (before its Normalize), on odd shapes."""
    from PIL import Image

    from finetune.loaders import eval_transform
    from zoo.onnx_predict import preprocess

    rng = np.random.default_rng(0)
    for (h, w), spec in [((37, 53), dict(input_size=[3, 32, 32], interpolation="bilinear", crop_pct=0.95, crop_mode="center")),
                         ((64, 41), dict(input_size=[3, 40, 40], interpolation="bicubic", crop_pct=0.875, crop_mode="center")),
                         ((50, 50), dict(input_size=[3, 48, 48], interpolation="bicubic", crop_pct=1.0, crop_mode="center")),
                         ((30, 70), dict(input_size=[3, 24, 32], interpolation="bilinear", crop_pct=0.9, crop_mode="squash"))]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8))
        timm_pixels = eval_transform({**spec, "mean": [0.0] * 3, "std": [1.0] * 3})(image).numpy()
        np.testing.assert_allclose(preprocess(image, spec), timm_pixels, rtol=0, atol=1e-6)


def test_corrupt_and_foreign_onnx_files_are_refused(tmp_path, zoo_runs):
    import onnx
    from onnx import TensorProto, helper

    from zoo.cli import main

    _, data = zoo_runs
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not a model at all" * 10)
    foreign = tmp_path / "foreign.onnx"  # a valid ONNX file that zoo did not write
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph), str(foreign))
    runner = CliRunner()
    for path, why in ((corrupt, "not a readable ONNX file"), (foreign, "not an ONNX file written by `zoo export`")):
        result = runner.invoke(main, ["predict", str(path), "--data", str(data), "--out", str(tmp_path / "p.csv")])
        assert result.exit_code == 1 and why in result.output and len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / "p.csv").exists()


def test_export_refuses_bad_input(tmp_path, zoo_runs, ensemble_file):
    from ensemble.file import read_ensemble, write_ensemble
    from zoo.cli import main

    root, _ = zoo_runs
    stacking = read_ensemble(ensemble_file)
    stacking.method, stacking.stacking = "stacking", {"coef": [[0.0] * 12] * 3, "intercept": [0.0] * 3, "clip": -16.0}
    stacking.members = stacking.members[:4]
    write_ensemble(tmp_path / "stack.json", stacking)
    runner = CliRunner()
    for args, why in (([str(tmp_path / "stack.json"), "--out", str(tmp_path / "s.onnx")], "a stacking ensemble is not exported"),
                      ([str(root / "res"), "--soup", "--out", str(tmp_path / "r.onnx")], "--soup takes a cross-fitted run"),
                      ([str(root / "res"), "--out", str(tmp_path / "r.pt")], "--out must end in .onnx")):
        result = runner.invoke(main, ["export", *args])
        assert result.exit_code == 1 and why in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not list(tmp_path.glob("*.onnx"))


def test_latency_backend_onnx_times_the_exported_pass(zoo_runs):
    from zoo.pipeline.leaderboard import measure_latency

    root, _ = zoo_runs
    entry = measure_latency(root / "vit", repeats=1, threads=1, backend="onnx", batch_sizes=(1, 4))
    assert entry["backend"] == "onnx" and entry["passes"] == 1  # the probe cross-fit: one backbone pass, K heads
    assert entry["ms_per_image_batch1"] > 0 and entry["ms_per_image_batch4"] > 0
