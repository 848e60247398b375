"""Datasets and weights files: what is read, what is refused, and how it is said."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import make_image_folder
from zoo.backbones import create_backbone, read_weights_file, remap_to_model, stage_groups
from zoo.data import read_dataset
from zoo.errors import UserInputError


def test_classes_are_sorted_folder_names_and_ids_are_relative_paths(tmp_path):
    data = make_image_folder(tmp_path / "d", classes=("b", "A", "c10", "c2"), per_class=(3, 2, 1))
    ds = read_dataset(data)
    assert ds.classes == ["A", "b", "c10", "c2"]  # code-point order, recorded as "sorted"
    assert {s.id.split("/")[0] for s in ds.split("train")} == {"train"}
    assert ds.split("train")[0].id.count("/") == 2 and len(ds.split("test")) == 4


def test_validation_split_from_train_is_stratified_and_fixed_by_seed(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=(10, 0, 0))
    a, b, c = read_dataset(data, seed=0), read_dataset(data, seed=0), read_dataset(data, seed=1)
    assert a.val_source == "from-train" and len(a.split("val")) == 6
    assert [s.id for s in a.split("val")] == [s.id for s in b.split("val")] != [s.id for s in c.split("val")]
    assert sorted(s.label for s in a.split("val")) == [0, 0, 1, 1, 2, 2]
    assert not {s.id for s in a.split("val")} & {s.id for s in a.split("train")}


def test_val_from_train_keeps_val_folder_as_untouched_test_set(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=(10, 4, 0))
    ds = read_dataset(data, val_from_train=True, val_fraction=0.3)
    assert all(s.id.startswith("train/") for s in ds.split("val"))
    assert len(ds.split("test")) == 12 and all(s.id.startswith("val/") for s in ds.split("test"))


@pytest.mark.parametrize("layout,message", [
    ({"train/ant": 2, "train/bee": 0}, "class 'bee' has no images"),
    ({"val/ant": 2}, "no train/ folder"),
    ({"train/ant": 2, "val/wasp": 1}, "'wasp' is not among the train classes"),
    ({"train": 0}, "no class folders"),
])
def test_bad_image_folders_get_one_clear_error(tmp_path, layout, message):
    from PIL import Image

    for folder, n in layout.items():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / folder / f"{i}.png")
    with pytest.raises(UserInputError, match=message):
        read_dataset(tmp_path)


def test_val_split_missing_a_class_is_a_warning(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=(3, 2, 0))
    for p in (data / "val" / "cat").iterdir():
        p.unlink()
    ds = read_dataset(data)
    assert any("no images of class 'cat'" in w or "['cat']" in w for w in ds.warnings)


def _csv(tmp_path, text):
    from PIL import Image

    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_csv_dataset(tmp_path):
    path = _csv(tmp_path, "path,label,split\na.png,x,train\nb.png,x,\nc.png,y,train\nd.png,y,train\na.png,y,val\nb.png,x,val\n")
    ds = read_dataset(path)
    assert ds.classes == ["x", "y"] and len(ds.split("train")) == 4 and ds.split("val")[0].id == "a.png"


@pytest.mark.parametrize("text,message", [
    ("file,label\na.png,x\n", r"missing column\(s\) \['path'\]"),
    ("path,label,split\na.png,x,train\nb.png,z,val\n", "label 'z' never appears in train"),
    ("path,label\n../outside.png,x\n", "outside the dataset root"),
    ("path,label,split\na.png,x,holdout\n", "split 'holdout' is not one of"),
])
def test_bad_csv_gets_one_clear_error_naming_the_line(tmp_path, text, message):
    with pytest.raises(UserInputError, match=message):
        read_dataset(_csv(tmp_path, text))


def test_weights_with_other_tensor_names_load_by_order_and_shape(tmp_path):
    source = create_backbone("test_efficientnet", 1000, pretrained=False)
    renamed = {f"_t{i}": v.clone() for i, v in enumerate(source.state_dict().values())}
    path = tmp_path / "foreign.pth"
    torch.save(renamed, path)
    model = create_backbone("test_efficientnet", 4, weights=str(path))
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)
    assert torch.equal(model.blocks[-1][0].conv_pw.weight, source.blocks[-1][0].conv_pw.weight)
    assert model.get_classifier().out_features == 4


def test_weights_by_name_in_safetensors_and_wrapped_checkpoints(tmp_path):
    source = create_backbone("test_resnet", 1000, pretrained=False)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model = create_backbone("test_resnet", 2, weights=str(tmp_path / name))
        assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(create_backbone("test_vit", 1000, pretrained=False).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(UserInputError, match="for another architecture"):
        create_backbone("test_resnet", 2, weights=str(tmp_path / "vit.pth"))
    model = create_backbone("test_resnet", 2, pretrained=False)
    with pytest.raises(UserInputError, match="tensors but the model's backbone needs"):
        remap_to_model({"x": torch.zeros(1)}, model, "tiny.pth")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_a_malicious_pickle_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pth", "wb") as f:
        pickle.dump({"conv1.weight": _Payload()}, f)
    with pytest.raises(UserInputError, match="never pickled objects"):
        read_weights_file("evil.pth")
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_unknown_model_and_missing_weights_say_what_to_do(tmp_path):
    with pytest.raises(UserInputError, match="unknown timm model 'resnet_nope'"):
        create_backbone("resnet_nope", 2)
    with pytest.raises(UserInputError, match="weights file not found"):
        create_backbone("test_resnet", 2, weights=str(tmp_path / "missing.pth"))


def test_hub_failure_names_the_weights_option(monkeypatch):
    import timm

    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        raise AssertionError("unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserInputError, match="could not download pretrained weights.*--weights FILE"):
        create_backbone("test_resnet", 2)


def test_stage_groups_cover_every_parameter_once_with_the_head_last():
    for name in ("test_resnet", "test_efficientnet", "test_convnext", "test_vit"):
        model = create_backbone(name, 3, pretrained=False)
        groups = stage_groups(model)
        names = [n for g in groups for n in g.param_names]
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())
        assert groups[-1].is_head and not any(g.is_head for g in groups[:-1])
        classifier = model.pretrained_cfg["classifier"]
        assert any(n.startswith(classifier) for n in groups[-1].param_names)
