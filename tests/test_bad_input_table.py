"""Every ``zoo`` subcommand against one table of bad inputs, in-process (click's CliRunner: a
subprocess a row would cost seconds of imports).

For each row: never a traceback, never exit 0 with a refused input, one ``Error:`` line, and no
file that existed before the command changed (bytes and mode). The rows need no training: a
refused input must be refused before any. Shared fixtures (a data folder, prediction files, an
ensemble file, a run directory without weights) are built once for the module.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import make_image_folder
from zoo.cli import main


def _predictions(path: Path, ids=("a", "b", "c", "d"), labels=(0, 1, 0, 1), classes=("x", "y"), **metadata) -> Path:
    from safetensors.numpy import save_file

    logits = np.random.default_rng(len(path.name)).normal(size=(len(ids), len(classes))).astype(np.float32)
    meta = {"ids": json.dumps(list(ids)), "classes": json.dumps(list(classes)), "format": "1", **metadata}
    save_file({"logits": logits, "labels": np.array(labels, np.int64)}, str(path), metadata=meta)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Everything a row may point at, under one folder whose files must come out unchanged."""
    root = tmp_path_factory.mktemp("table")
    make_image_folder(root / "data", per_class=(6, 2, 2))
    make_image_folder(root / "one_class", classes=("ant",), per_class=(6, 2, 0))
    (root / "empty").mkdir()
    (root / "a_file.txt").write_text("mine\n")
    (root / "users").mkdir()
    (root / "users" / "config.json").write_text("mine\n")
    (root / "users" / "notes.txt").write_text("mine\n")
    (root / "not_a_run").mkdir()
    (root / "not_a_run" / "readme.txt").write_text("mine\n")
    # A run directory as config.json describes it, without its weights (never finished an epoch).
    run = root / "no_weights"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"backbone": "test_resnet", "classes": ["ant", "bee", "cat"],
                                                 "options": {"data": str(root / "data")}}))
    (root / "broken_config").mkdir()
    (root / "broken_config" / "config.json").write_text("{not json")
    preds = root / "preds"
    preds.mkdir()
    _predictions(preds / "good1.safetensors")
    _predictions(preds / "good2.safetensors")
    _predictions(preds / "relabelled.safetensors", labels=(0, 0, 0, 1))
    _predictions(preds / "other_ids.safetensors", ids=("a", "b", "c", "e"))
    _predictions(preds / "other_classes.safetensors", classes=("x", "z"))
    _predictions(preds / "three_classes.safetensors", classes=("x", "y", "z"))
    _predictions(preds / "newer.safetensors", format="9")
    _predictions(preds / "unlabelled.safetensors", labels=(-1, -1, -1, -1))
    (preds / "text.safetensors").write_text("not a safetensors file")
    (preds / "empty.safetensors").write_bytes(b"")
    (preds / "preds.csv").write_text("id,prediction\na,x\n")
    ens = root / "ens"
    ens.mkdir()
    good = {"format": 1, "kind": "zoo-ensemble", "classes": ["x", "y"], "method": "slsqp", "metric": "log_loss",
            "combine": "arithmetic", "calibrate": True, "final_temperature": 1.0,
            "members": [{"name": "a", "backbone": "test_resnet", "weight": 0.5, "temperature": 1.0,
                         "predictions": str(preds / "good1.safetensors")},
                        {"name": "b", "backbone": "test_resnet", "weight": 0.5, "temperature": 1.0,
                         "predictions": str(preds / "good2.safetensors")}]}
    bad_ensembles = {
        "hot": {"final_temperature": "hot"}, "kind": {"kind": "something-else"}, "format": {"format": 9},
        "no_members": {"members": []}, "members_dict": {"members": {"a": 1}}, "classes_str": {"classes": "xy"},
        "method": {"method": "magic"}, "combine": {"combine": "median"}, "metric": {"metric": "auc"},
        "negative_weight": {"members": [{**good["members"][0], "weight": -0.5}, {**good["members"][1], "weight": 1.5}]},
        "weights_sum": {"members": [{**good["members"][0], "weight": 0.9}, {**good["members"][1], "weight": 0.9}]},
        "zero_temperature": {"members": [{**good["members"][0], "temperature": 0}, good["members"][1]]},
        "same_names": {"members": [good["members"][0], good["members"][0]]},
        "weight_text": {"members": [{**good["members"][0], "weight": "half"}, good["members"][1]]},
        "stacking_without_coef": {"method": "stacking"}, "options_list": {"options": [1, 2]},
    }
    (ens / "good.json").write_text(json.dumps(good))
    # Ensembles of the data's classes for zoo distill: members whose runs have no weights, and members whose runs are gone.
    for name, run_dir in (("data_classes", root / "no_weights"), ("gone_runs", root / "gone_run")):
        members_at = [{**m, "run": str(run_dir)} for m in good["members"]]
        (ens / f"{name}.json").write_text(json.dumps({**good, "classes": ["ant", "bee", "cat"], "members": members_at}))
    for name, change in bad_ensembles.items():
        (ens / f"{name}.json").write_text(json.dumps({**good, **change}))
    (ens / "not_json.json").write_text("{")
    (ens / "list.json").write_text("[1, 2]")
    zoo = root / "zoo"
    zoo.mkdir()
    members = '[[member]]\nbackbone = "test_resnet"\n[[member]]\nbackbone = "test_efficientnet"\n'
    zoo_files = {
        "single_bracket": '[member]\nbackbone = "test_resnet"\n',
        "epochs_text": members + 'epochs = "ten"\n',
        "unknown_option": members + "learning_rate = 0.1\n",
        "run_level": members + "folds = 3\n",
        "unknown_table": "[model]\nx = 1\n" + members,
        "no_backbone": '[[member]]\nname = "a"\n[[member]]\nbackbone = "test_resnet"\n',
        "bad_name": members + 'name = "a/b"\n',
        "same_names": '[[member]]\nbackbone = "test_resnet"\n[[member]]\nbackbone = "test_resnet"\n',
        "not_toml": "[[member]\nbackbone = \n",
        "missing_weights": members + 'weights = "nowhere.pth"\n',
        "defaults_value": "defaults = 3\n" + members,
        "one_member": '[[member]]\nbackbone = "test_resnet"\n',
        "unknown_backbone": members.replace("test_efficientnet", "test_efficientnett"),
        "bad_layer_decay": '[defaults]\nlayer_decay = 7\n' + members,
        "member_list_of_numbers": "member = [1, 2]\n",
        "bool_as_int": members + "ema = 1\n",
    }
    for name, text in zoo_files.items():
        (zoo / f"{name}.toml").write_text(text)
    (root / "text.onnx").write_text("not an onnx graph")
    (root / "weights").mkdir()
    (root / "weights" / "text.pth").write_text("not weights")
    (root / "weights" / "empty.safetensors").write_bytes(b"")
    return root


TINY = ["--no-pretrained", "--epochs", "1", "--batch-size", "4", "--input-size", "32", "--workers", "0", "--threads", "1",
        "--auto-augment", "none"]
FT = ["finetune", "test_resnet", "--data", "{data}", "--out", "{out}", *TINY]
RUN = ["run", "{data}", "--out", "{out}", "--backbones", "test_resnet,test_efficientnet", *TINY]
LR = ["lr-find", "test_resnet", "--data", "{data}", "--no-pretrained", "--out", "{out}/lr.png"]
P = "{world}/preds/"
DISTILL = ["distill", "--data", "{data}", "--student", "test_resnet", "--out", "{out}", *TINY]
E = "{world}/ens/"
Z = "{world}/zoo/"

# (the command line, a word its Error: line must hold); {data} the good data, {out} a new folder, {world} the fixtures.
ROWS: list[tuple[list[str], str]] = [
    # Paths.
    (["finetune", "test_resnet", "--data", "{world}/nowhere", "--out", "{out}", *TINY], "nowhere"),
    (["finetune", "test_resnet", "--data", "{world}/a_file.txt", "--out", "{out}", *TINY], "a_file.txt"),
    (["finetune", "test_resnet", "--data", "{world}/empty", "--out", "{out}", *TINY], "no train/ folder"),
    (["finetune", "test_resnet", "--data", "{world}/one_class", "--out", "{out}", *TINY], "at least 2"),
    ([*FT[:5], "{world}/a_file.txt", *TINY], "is a file"),
    ([*FT[:5], "{world}/users", *TINY], "users"),
    ([*FT[:5], "{world}/not_a_run", *TINY], "not_a_run"),
    ([*FT[:5], "{world}/a_file.txt/run", *TINY], "a_file.txt"),
    (["finetune", "--resume", "--out", "{world}/empty"], "nothing to resume"),
    (["finetune", "--resume", "--out", "{world}/users"], "users"),
    (["finetune", "--out", "{out}"], "--data"),
    (["finetune", "--data", "{data}", "--out", "{out}"], "BACKBONE"),
    (["run", "{world}/nowhere", "--out", "{out}", "--backbones", "test_resnet,test_efficientnet"], "nowhere"),
    (["run", "{world}/one_class", "--out", "{out}", "--backbones", "test_resnet,test_efficientnet", *TINY], "at least 2"),
    ([*RUN[:2], "--out", "{world}/a_file.txt", *RUN[4:]], "is a file"),
    ([*RUN[:2], "--out", "{world}/not_a_run", *RUN[4:]], "not_a_run"),
    ([*RUN[:2], "--out", "{world}/no_weights", *RUN[4:]], "no_weights"),
    (["run", "{data}", "--out", "{out}", "--backbones", "test_resnet", *TINY], "at least 2 members"),
    (["run", "{data}", "--out", "{out}", "--backbones", "test_resnet,test_resnet", *TINY], "--cv 5"),  # 4 validation rows
    (["run", "{data}", "--out", "{out}", "--backbones", "test_resnet,,", *TINY], "at least 2 members"),
    ([*RUN, "--launcher", "local", "--partition", "gpu"], "--partition: only with --launcher slurm"),
    ([*RUN, "--jobs", "4"], "need --launcher local or slurm"),
    ([*RUN, "--launcher", "slurm", "--slurm-extra", "account"], "expected KEY=VALUE"),
    ([*RUN, "--launcher", "local", "--jobs", "2", "--gpus-per-job", "1", "--device", "cuda"], "needs 2 GPUs"),
    (["lr-find", "test_resnet", "--data", "{world}/one_class", "--no-pretrained", "--out", "{out}/lr.png"], "at least 2"),
    ([*LR[:6], "{world}/a_file.txt/lr.png"], "a_file.txt"),
    ([*LR[:6], "{world}/empty"], "is a folder"),
    (["lr-find", "test_resnet", "--data", "{data}", "--no-pretrained", "--start-lr", "0"], "--start-lr"),
    (["lr-find", "test_resnet", "--data", "{data}", "--no-pretrained", "--start-lr", "1", "--end-lr", "0.1"], "--start-lr"),
    (["lr-find", "test_resnett", "--data", "{data}", "--no-pretrained", "--out", "{out}/lr.png"], "test_resnett"),
    (["predict", "{world}/not_a_run", "--data", "{data}", "--out", "{out}/p.csv"], "not a zoo run"),
    (["predict", "{world}/no_weights", "--data", "{data}", "--out", "{out}/p.csv"], "model.safetensors"),
    (["predict", "{world}/broken_config", "--data", "{data}", "--out", "{out}/p.csv"], "not valid JSON"),
    (["predict", "{world}/no_weights", "--data", "{data}", "--out", "{out}/p.txt"], ".txt"),
    (["predict", "{world}/no_weights", "--data", "{world}/nowhere", "--out", "{out}/p.csv"], "nowhere"),
    (["soup", "{world}/not_a_run", "{world}/no_weights", "--out", "{out}"], "not_a_run"),
    (["soup", "{world}/broken_config", "--out", "{out}"], "broken_config"),
    (["demo", "--out", "{world}/users"], "users"),
    # Options.
    ([*FT, "--epochs", "0"], "--epochs"),
    ([*FT, "--batch-size", "0"], "--batch-size"),
    ([*FT, "--lr", "-1"], "--lr"),
    ([*FT, "--layer-decay", "2"], "--layer-decay"),
    ([*FT, "--folds", "1"], "--folds"),
    ([*FT, "--folds", "2", "--fold", "3"], "--fold"),
    ([*FT, "--fold", "1"], "--fold"),
    ([*FT, "--folds", "4"], "--folds 4"),
    ([*FT, "--input-size", "0"], "--input-size"),
    ([*FT, "--input-size", "-32"], "--input-size"),
    ([*FT, "--mean", "0", "0", "0", "--std", "0", "0", "0"], "--std"),
    ([*FT, "--crop-pct", "2"], "--crop-pct"),
    ([*FT, "--val-fraction", "1.5"], "--val-fraction"),
    ([*FT, "--model-kwargs", "notjson"], "--model-kwargs"),
    ([*FT, "--model-kwargs", "[1]"], "--model-kwargs"),
    ([*FT, "--weights", "{world}/weights/text.pth"], "--weights"),
    ([*FT, "--snapshots"], "--snapshots"),
    ([*FT, "--probe-views", "-1"], "--probe-views"),
    ([*FT, "--linear-probe", "--head-init", "probe"], "--head-init"),
    ([*FT, "--pool", "train+val"], "--pool"),
    ([*FT, "--folds", "2", "--val-from-train"], "--val-from-train"),
    ([*FT, "--label-smoothing", "1"], "--label-smoothing"),
    ([*FT, "--ema-decay", "1"], "--ema-decay"),
    ([*FT, "--optimizer", "lamb"], "--optimizer"),
    ([*FT, "--warmup-epochs", "-1"], "--warmup-epochs"),
    (["finetune", "test_vit", "--data", "{data}", "--out", "{out}", "--no-pretrained", "--input-size", "33"], "--input-size 33"),
    (["finetune", "test_resnett", "--data", "{data}", "--out", "{out}", *TINY], "test_resnett"),
    (["finetune", "test_resnet", "--data", "{data}", "--out", "{out}", "--weights", "{world}/weights/text.pth", "--epochs", "1"],
     "text.pth"),
    (["finetune", "test_resnet", "--data", "{data}", "--out", "{out}", "--weights", "{world}/weights/empty.safetensors"],
     "empty.safetensors"),
    (["finetune", "test_resnet", "--data", "{data}", "--out", "{out}", "--weights", "{world}/weights/nowhere.pth"], "nowhere.pth"),
    ([*RUN, "--epochs", "0"], "--epochs"),
    ([*RUN, "--folds", "1"], "--folds"),
    ([*RUN, "--folds", "4"], "--folds 4"),
    (["run", "{data}", "--out", "{out}", "--backbones", "test_resnet", "--zoo", Z + "epochs_text.toml"], "not both"),
    # Prediction files.
    (["correlate", P + "good1.safetensors", P + "relabelled.safetensors"], "relabelled"),
    (["correlate", P + "good1.safetensors", P + "other_ids.safetensors"], "other_ids"),
    (["correlate", P + "good1.safetensors", P + "other_classes.safetensors"], "other_classes"),
    (["correlate", P + "good1.safetensors", P + "three_classes.safetensors"], "three_classes"),
    (["correlate", P + "good1.safetensors", P + "newer.safetensors"], "newer"),
    (["correlate", P + "good1.safetensors", P + "text.safetensors"], "text.safetensors"),
    (["correlate", P + "good1.safetensors", P + "empty.safetensors"], "empty.safetensors"),
    (["correlate", P + "good1.safetensors", P + "preds.csv"], "preds.csv"),
    (["correlate", P + "good1.safetensors", "{world}/nowhere.safetensors"], "nowhere"),
    (["correlate", P + "good1.safetensors", "{world}/not_a_run"], "not_a_run"),
    (["ensemble", "fit", P + "good1.safetensors", P + "relabelled.safetensors", "--out", "{out}/ens.json"], "relabelled"),
    (["ensemble", "fit", P + "good1.safetensors", P + "unlabelled.safetensors", "--out", "{out}/ens.json"], "unlabelled"),
    (["ensemble", "fit", P + "good1.safetensors", P + "other_ids.safetensors", "--out", "{out}/ens.json"], "other_ids"),
    (["ensemble", "fit", P + "good1.safetensors", P + "good2.safetensors", "--out", "{world}/a_file.txt/ens.json"], "a_file.txt"),
    (["ensemble", "fit", P + "good1.safetensors", P + "good2.safetensors", "--out", "{world}/empty"], "empty"),
    # Ensemble files.
    *[(["ensemble", "score", E + f"{name}.json", P + "good1.safetensors", P + "good2.safetensors"], f"{name}.json")
      for name in ("hot", "kind", "format", "no_members", "members_dict", "classes_str", "method", "combine", "metric",
                   "negative_weight", "weights_sum", "zero_temperature", "same_names", "weight_text", "stacking_without_coef",
                   "options_list", "not_json", "list")],
    (["ensemble", "predict", E + "hot.json", P + "good1.safetensors", P + "good2.safetensors", "--out", "{out}/p.csv"], "hot.json"),
    (["ensemble", "predict", E + "good.json", P + "good1.safetensors", P + "good2.safetensors", "--out", "{out}/p.txt"], ".txt"),
    (["ensemble", "predict", E + "good.json", P + "good1.safetensors", P + "other_classes.safetensors", "--out", "{out}/p.csv"],
     "other_classes"),
    (["ensemble", "score", E + "good.json", P + "unlabelled.safetensors", P + "unlabelled.safetensors"], "no prediction file"),
    (["ensemble", "score", "{world}/nowhere.json", P + "good1.safetensors"], "nowhere.json"),
    # Zoo files.
    *[(["run", "{data}", "--out", "{out}", "--zoo", Z + f"{name}.toml", *TINY], f"{name}.toml")
      for name in ("single_bracket", "epochs_text", "unknown_option", "run_level", "unknown_table", "no_backbone", "bad_name",
                   "same_names", "not_toml", "missing_weights", "defaults_value", "unknown_backbone", "bad_layer_decay",
                   "member_list_of_numbers", "bool_as_int")],
    (["run", "{data}", "--out", "{out}", "--zoo", Z + "one_member.toml", *TINY], "at least 2 members"),
    # Export and label issues.
    (["export", "{world}/not_a_run", "--out", "{out}/m.onnx"], "not_a_run"),
    (["export", "{world}/no_weights", "--out", "{out}/m.txt"], ".onnx"),
    (["export", E + "hot.json", "--out", "{out}/m.onnx"], "hot.json"),
    (["export", "{world}/no_weights", "--out", "{world}/a_file.txt/m.onnx"], "a_file.txt"),
    (["export", "{world}/nowhere", "--out", "{out}/m.onnx"], "nowhere"),
    (["predict", "{world}/text.onnx", "--data", "{data}", "--out", "{out}/p.csv"], "text.onnx"),
    (["label-issues", P + "good1.safetensors", P + "good2.safetensors"], "good1.safetensors"),
    (["label-issues", "{world}/no_weights"], "no_weights"),
    (["label-issues", E + "hot.json"], "hot.json"),
    (["label-issues", "{world}/nowhere"], "nowhere"),
    # Distillation.
    *[([*DISTILL[:1], ensemble, *DISTILL[1:]], word) for ensemble, word in (
        (E + "good.json", "differ from"), (E + "gone_runs.json", "gone_run"), (E + "hot.json", "hot.json"), ("{world}/nowhere.json", "nowhere.json"),
        (E + "not_json.json", "not_json.json"), (P + "good1.safetensors", "good1.safetensors"))],
    ([*DISTILL[:1], E + "data_classes.json", *DISTILL[1:], "--alpha", "1.5"], "--alpha"),
    ([*DISTILL[:1], E + "data_classes.json", *DISTILL[1:], "--temperature", "0"], "--temperature"),
    ([*DISTILL[:1], E + "data_classes.json", *DISTILL[1:], "--view-mixup", "-1"], "--view-mixup"),
    ([*DISTILL[:1], E + "data_classes.json", *DISTILL[1:], "--view-mixup", "1", "--alpha", "1"], "--view-mixup"),
    ([*DISTILL[:1], E + "data_classes.json", *DISTILL[1:], "--unlabeled", "{data}/val"], "holdout"),
    ([*DISTILL[:1], E + "data_classes.json", *DISTILL[1:], "--unlabeled", "{world}/nowhere"], "nowhere"),
    (["distill", E + "data_classes.json", "--data", "{data}", "--student", "no_such_net", "--out", "{out}", *TINY], "no_such_net"),
    (["distill", E + "data_classes.json", "--data", "{data}", "--student", "test_resnet", "--out", "{world}/users", *TINY], "users"),
    (["distill", E + "data_classes.json", "--data", "{data}", "--out", "{out}", *TINY], "--student"),
    (["distill", "--resume", "--out", "{world}/not_a_run"], "not_a_run"),
]


def _files(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_the_table_is_large_enough():
    assert len(ROWS) >= 80
    commands = {args[0] for args, _ in ROWS} | {" ".join(args[:2]) for args, _ in ROWS if args[0] == "ensemble"}
    every = set(main.commands) | {f"ensemble {name}" for name in main.commands["ensemble"].commands}
    assert commands >= every, f"no bad input for {sorted(every - commands)}"


@pytest.mark.parametrize("args, word", ROWS, ids=[f"{i:03d}-{' '.join(a[:2])}" for i, (a, _) in enumerate(ROWS)])
def test_a_bad_input_is_one_line_with_nothing_changed(world, tmp_path, monkeypatch, args, word):
    monkeypatch.chdir(tmp_path)  # a command that writes a default file name (lr-find's lr_find.png) writes it here
    data = world / "data"
    out = tmp_path / "out"
    filled = [a.format(world=world, data=data, out=out) for a in args]
    before = _files(world)
    result = CliRunner().invoke(main, filled)
    assert result.exit_code not in (0, None), f"exit 0 with a refused input: {filled}\n{result.output}"
    assert isinstance(result.exception, SystemExit), f"{filled}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert word.format(world=world) in errors[0], (filled, errors[0])
    assert _files(world) == before, f"{filled} changed a file that was there before"
