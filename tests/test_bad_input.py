"""Bad input, tried: every case ends in a skip-and-report, a correct read, or one clear line.

Never a traceback, never lost data, never a silent wrong answer. Images that cannot be
used are skipped and listed in skipped_images.txt; odd but valid images (grayscale,
CMYK, 16-bit, a PNG named .jpg) are read correctly; a bad dataset, prediction file,
ensemble file, weights file or resume state stops the command with exit status 1 and
one ``Error:`` line that names the file and the fix, before anything is written.

Over 400 lines on purpose: every bad-input case in one file, as tables a reader scans
for the case they worry about.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import make_image_folder
from zoo.cli import main
from zoo.data import check_image, check_images, load_rgb, read_dataset, Sample
from zoo.errors import UserInputError
from zoo.predictions import align_predictions, read_predictions

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

TINY = ["--no-pretrained", "--epochs", "1", "--batch-size", "8", "--input-size", "32", "--workers", "0", "--auto-augment", "none"]


def one_error_line(result, message: str) -> str:
    """The command failed with status 1 and exactly one ``Error:`` line, which says ``message``."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert message in errors[0], errors[0]
    return errors[0]


# --------------------------------------------------------------------------- images

def png_bomb(path: Path, width: int, height: int, with_data: bool = True) -> Path:
    """A valid 1-bit PNG of ``width`` x ``height`` zeros: a few kB that decode to ``width * height`` pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush() if with_data else zlib.compress(b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def _save(path: Path, image, format: str | None = None) -> Path:
    image.save(path, format=format)
    return path


def _pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (24, 32, 3)).astype(np.uint8)


def _truncated_jpeg(path: Path) -> Path:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_pixels()).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _truncated_png(path: Path) -> Path:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_pixels()).save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    return path


def _image(mode: str, color, size=(32, 24)):
    from PIL import Image

    return Image.new(mode, size, color)


def _sixteen_bit(path: Path) -> Path:
    from PIL import Image

    return _save(path, Image.fromarray(np.full((24, 32), 40 * 257, dtype=np.uint16)))


def _palette_with_transparency(path: Path) -> Path:
    from PIL import Image

    image = _image("RGB", (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    image.info["transparency"] = 0
    return _save(path, image)


# name -> (file name, how to make it, expected: a regex of the skip reason, or the RGB pixel it reads as)
IMAGE_CASES = {
    "truncated JPEG": ("cut.jpg", _truncated_jpeg, r"^OSError: .*[Tt]runcated"),
    "truncated PNG": ("cut.png", _truncated_png, r"^(OSError|SyntaxError|ValueError)"),
    "zero-byte file": ("empty.jpg", lambda p: (p.write_bytes(b""), p)[1], r"^empty file \(0 bytes\)$"),
    "text named .png": ("notes.png", lambda p: (p.write_text("not an image"), p)[1], r"^UnidentifiedImageError: cannot identify"),
    "file listed but missing": ("missing.png", lambda p: p, r"^FileNotFoundError"),
    "decompression bomb (144 Mpx from 18 kB)": ("bomb.png", lambda p: png_bomb(p, 12000, 12000),
                                                r"^DecompressionBombError: 12000x12000 = 144000000 pixels"),
    "decompression bomb (10 Gpx header)": ("huge.png", lambda p: png_bomb(p, 100000, 100000, with_data=False),
                                           r"^DecompressionBombError"),
    "PNG named .jpg": ("png.jpg", lambda p: _save(p, _image("RGB", (200, 10, 30)), "PNG"), (200, 10, 30)),
    "grayscale": ("gray.png", lambda p: _save(p, _image("L", 77)), (77, 77, 77)),
    "grayscale + alpha": ("gray_alpha.png", lambda p: _save(p, _image("LA", (77, 255))), (77, 77, 77)),
    "CMYK JPEG": ("cmyk.jpg", lambda p: _save(p, _image("CMYK", (0, 255, 255, 0))), (255, 0, 0)),
    "CMYK TIFF": ("cmyk.tif", lambda p: _save(p, _image("CMYK", (255, 0, 255, 0))), (0, 255, 0)),
    "16-bit grayscale PNG": ("deep.png", _sixteen_bit, (40, 40, 40)),  # 40 * 257 -> 40: scaled by bit depth
    "palette with transparency": ("palette.png", _palette_with_transparency, (10, 200, 30)),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_each_image_is_read_correctly_or_skipped_with_its_reason(tmp_path, case):
    name, make, expected = IMAGE_CASES[case]
    path = make(tmp_path / name)
    why = check_image(path)
    if isinstance(expected, str):
        assert why is not None and re.search(expected, why), why
    else:
        assert why is None
        image = load_rgb(path)
        assert image.mode == "RGB" and image.size == (32, 24)
        assert np.abs(np.asarray(image, dtype=int) - expected).max() <= 2  # JPEG may move a value by one or two


def test_bombs_are_refused_in_threads_without_decoding(tmp_path):
    # check_images decodes in threads; the pixel-count check does not rely on (thread-unsafe) warning filters.
    good = [_save(tmp_path / f"ok{i}.png", _image("RGB", (i, i, i))) for i in range(6)]
    bombs = [png_bomb(tmp_path / f"bomb{i}.png", 12000, 12000) for i in range(6)]
    samples = [Sample(p, p.name, 0) for pair in zip(good, bombs) for p in pair]
    kept, skipped = check_images(samples, workers=4)
    assert [s.path for s in kept] == good
    assert [sid for sid, _ in skipped] == [p.name for p in bombs]
    assert all(why.startswith("DecompressionBombError") for _, why in skipped)


def test_a_dataset_of_every_odd_image_trains_and_lists_exactly_the_unusable_ones(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=(6, 3, 0))
    expected_skipped = []
    for i, case in enumerate(IMAGE_CASES):
        name, make, expected = IMAGE_CASES[case]
        if case == "file listed but missing":
            continue  # an image folder lists only files that exist
        split, cls = ("train", "ant") if i % 2 == 0 else ("val", "bee")
        make(data / split / cls / name)
        if isinstance(expected, str):
            expected_skipped.append(f"{split}/{cls}/{name}")
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["finetune", "test_resnet", "--data", str(data), "--out", str(run), *TINY, "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert f"warning: skipped {len(expected_skipped)} unreadable image(s) (listed in skipped_images.txt)" in result.output
    listed = dict(line.split("\t") for line in (run / "skipped_images.txt").read_text().splitlines())
    assert sorted(listed) == sorted(expected_skipped)
    bomb = next(sid for sid in listed if sid.endswith("/bomb.png"))
    assert listed[bomb].startswith(f"{bomb.split('/')[0]}: DecompressionBombError: 12000x12000")
    used = json.loads((run / "splits.json").read_text())
    for case, (name, _, expected) in IMAGE_CASES.items():
        if not isinstance(expected, str):
            assert any(sid.endswith("/" + name) for sid in used["train"] + used["val"]), case
    assert json.loads((run / "config.json").read_text())["dataset"]["skipped"] == len(expected_skipped)


# --------------------------------------------------------------------------- datasets

def _images(folder: Path, names, color=(9, 9, 9)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        _save(folder / name, _image("RGB", color))


def _folder_with_empty_class(root: Path) -> Path:
    _images(root / "train" / "ant", ["a.png", "b.png"])
    (root / "train" / "bee").mkdir(parents=True)
    return root


def _folder_with_unreadable_class(root: Path) -> Path:
    _images(root / "train" / "ant", ["a.png", "b.png", "c.png"])
    (root / "train" / "bee").mkdir(parents=True)
    (root / "train" / "bee" / "x.jpg").write_bytes(b"")
    (root / "train" / "bee" / "y.png").write_text("no")
    return root


def _folder_with_unknown_val_class(root: Path) -> Path:
    _images(root / "train" / "ant", ["a.png", "b.png"])
    _images(root / "val" / "wasp", ["a.png"])
    return root


def _csv(root: Path, text: str | bytes, images=("a.png", "b.png", "c.png", "d.png")) -> Path:
    _images(root, images)
    path = root / "labels.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _csv_with_escaping_symlink(root: Path) -> Path:
    outside = root.parent / "outside"
    _images(outside, ["secret.png"])
    path = _csv(root, "path,label\na.png,x\nb.png,y\nlink.png,x\n")
    os.symlink(outside / "secret.png", root / "link.png")
    return path


# name -> (how to make --data under a folder, the message of the one Error: line)
DATASET_CASES = {
    "image folder with an empty class": (_folder_with_empty_class, "class 'bee' has no images; add images or remove the empty folder"),
    "class whose every image is unreadable": (_folder_with_unreadable_class, "class(es) ['bee'] have no readable train images"),
    "val class unknown to train": (_folder_with_unknown_val_class, "class 'wasp' is not among the train classes ['ant']"),
    "CSV missing the label column": (lambda r: _csv(r, "path,class\na.png,x\n"), "missing column(s) ['label']"),
    "CSV missing every column": (lambda r: _csv(r, ""), "missing column(s) ['path', 'label']"),
    "CSV with an unknown label": (lambda r: _csv(r, "path,label,split\na.png,x,train\nb.png,y,train\nc.png,wasp,val\n"),
                                  "labels.csv:4: label 'wasp' never appears in train rows; known labels are ['x', 'y']"),
    "CSV path escaping the root": (lambda r: _csv(r, "path,label\na.png,x\n../../etc/passwd,y\n"),
                                   "labels.csv:3: path '../../etc/passwd' is outside the dataset root"),
    "CSV absolute path": (lambda r: _csv(r, "path,label\na.png,x\n/etc/hosts,y\n"), "labels.csv:3: path '/etc/hosts' is outside the dataset root"),
    "CSV symlink escaping the root": (_csv_with_escaping_symlink, "labels.csv:4: path 'link.png' is outside the dataset root"),
    "CSV not UTF-8": (lambda r: _csv(r, "path,label\na.png,caf\xe9\n".encode("latin-1")), "not UTF-8 text"),
    "CSV listing an image twice": (lambda r: _csv(r, "path,label\na.png,x\nb.png,y\na.png,y\n"),
                                   "labels.csv:4: path 'a.png' is listed again in train (first on line 2)"),
    "CSV with an empty label": (lambda r: _csv(r, "path,label\na.png,x\nb.png,\n"), "labels.csv:3: empty path or label"),
    "--data a file that is not a CSV": (lambda r: (_images(r, ["a.png"]), r / "a.png")[1],
                                        "--data takes an image folder or a .csv file, got a .png file"),
}


@pytest.mark.parametrize("case", list(DATASET_CASES))
def test_each_bad_dataset_is_one_error_line_and_writes_nothing(tmp_path, case):
    make, message = DATASET_CASES[case]
    data = make(tmp_path / "data")
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["finetune", "test_resnet", "--data", str(data), "--out", str(run), *TINY])
    error = one_error_line(result, message)
    assert str(data) in error or str(data.parent) in error  # it names the file or folder
    assert not run.exists()


def test_csv_paths_outside_the_root_are_used_with_allow_outside_root(tmp_path):
    outside = tmp_path / "elsewhere"
    _images(outside, ["o.png"])
    path = _csv(tmp_path / "data", "path,label\na.png,x\nb.png,y\n../elsewhere/o.png,x\nc.png,y\n")
    with pytest.raises(UserInputError, match="outside the dataset root"):
        read_dataset(path)
    ds = read_dataset(path, allow_outside_root=True, val_fraction=0.5)
    ids = [s.id for s in ds.split("train") + ds.split("val")]
    assert str((outside / "o.png").resolve()) in ids and "a.png" in ids


def test_prediction_csv_paths_cannot_escape_the_root_either(tmp_path):
    from zoo.data import read_prediction_images

    path = _csv(tmp_path / "data", "path,label,split\na.png,x,test\n../../x.png,x,test\n")
    with pytest.raises(UserInputError, match=r"labels.csv:3: path '../../x.png' is outside the dataset root"):
        read_prediction_images(path, ["x"], split="test")


def test_an_image_in_two_csv_splits_is_a_warning_of_optimistic_scores(tmp_path):
    ds = read_dataset(_csv(tmp_path, "path,label,split\na.png,x,train\nb.png,y,train\na.png,x,val\nc.png,y,val\n"))
    assert any("'a.png' is in val and in train" in w and "optimistic" in w for w in ds.warnings)


# --------------------------------------------------------------------------- prediction files

def raw_predictions(path: Path, logits, labels, row_ids, classes=("x", "y"), **metadata) -> Path:
    """A prediction file written without zoo's checks, as a buggy or foreign tool might."""
    from safetensors.numpy import save_file

    meta = {"ids": json.dumps(list(row_ids)), "classes": json.dumps(list(classes)), "format": "1", **metadata}
    save_file({"logits": np.ascontiguousarray(logits), "labels": np.ascontiguousarray(labels)}, str(path), metadata=meta)
    return path


def _good(path: Path, ids=("a", "b", "c"), classes=("x", "y"), labels=(0, 1, 0)) -> Path:
    logits = np.random.default_rng(0).normal(size=(len(ids), len(classes))).astype(np.float32)
    return raw_predictions(path, logits, np.array(labels, np.int64), ids, classes)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def _pickle_renamed(path: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"logits": _Payload()}, f)
    return path


f32 = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
i64 = lambda *values: np.array(values, np.int64)  # noqa: E731

# name -> (how to make the bad file, the message reading it gives)
PREDICTION_FILE_CASES = {
    "logits of the wrong shape": (lambda p: raw_predictions(p, f32(3), i64(0, 1, 0), "abc"), "logits must be 2-D [N, C], got shape (3,)"),
    "labels of the wrong length": (lambda p: raw_predictions(p, f32(3, 2), i64(0, 1), "abc"), "labels must have shape (3,)"),
    "fewer ids than rows": (lambda p: raw_predictions(p, f32(3, 2), i64(0, 1, 0), "ab"), "2 ids for 3 rows of logits"),
    "more classes than columns": (lambda p: raw_predictions(p, f32(3, 2), i64(0, 1, 0), "abc", ("x", "y", "z")),
                                  "3 classes for 2 columns of logits"),
    "NaN logits": (lambda p: raw_predictions(p, np.array([[0, 1], [0, 1], [np.nan, 1]], np.float32), i64(0, 1, 0), "abc"),
                   "logits contain NaN or infinity (first at row 2, id 'c')"),
    "infinite logits": (lambda p: raw_predictions(p, np.array([[np.inf, 1], [0, 1], [0, 1]], np.float32), i64(0, 1, 0), "abc"),
                        "logits contain NaN or infinity (first at row 0, id 'a')"),
    "duplicated ids": (lambda p: raw_predictions(p, f32(3, 2), i64(0, 1, 0), ["a", "b", "a"]), "sample id 'a' appears more than once"),
    "label outside the classes": (lambda p: raw_predictions(p, f32(3, 2), i64(0, 2, 0), "abc"), "label 2 at row 1 is outside -1..1"),
    "float64 logits": (lambda p: raw_predictions(p, np.zeros((3, 2)), i64(0, 1, 0), "abc"), "expected float32 logits and int64 labels"),
    "no ids metadata": (lambda p: _drop_metadata(_good(p), "ids"), "not a zoo prediction file (metadata 'ids' missing)"),
    "ids not JSON": (lambda p: raw_predictions(p, f32(3, 2), i64(0, 1, 0), "abc", ids="a,b,c"), "metadata ids/classes are not JSON"),
    "a newer format": (lambda p: raw_predictions(p, f32(3, 2), i64(0, 1, 0), "abc", format="9"), "format 9 is newer than this zoo"),
    "a pickle renamed to .safetensors": (_pickle_renamed, "not a readable safetensors file"),
    "a truncated file": (lambda p: (p.write_bytes(_good(p).read_bytes()[:40]), p)[1], "not a readable safetensors file"),
    "safetensors without logits": (lambda p: _other_tensors(p), "not a zoo prediction file (missing tensors ['labels', 'logits']"),
}


def _drop_metadata(path: Path, key: str) -> Path:
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        meta = {k: v for k, v in f.metadata().items() if k != key}
    save_file(load_file(str(path)), str(path), metadata=meta)
    return path


def _other_tensors(path: Path) -> Path:
    from safetensors.numpy import save_file

    save_file({"weight": np.zeros((2, 2), np.float32)}, str(path))
    return path


@pytest.mark.parametrize("case", list(PREDICTION_FILE_CASES))
def test_each_bad_prediction_file_is_refused_by_the_reader_and_by_zoo_correlate(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    make, message = PREDICTION_FILE_CASES[case]
    bad = make(tmp_path / "bad.safetensors")
    with pytest.raises(UserInputError, match=re.escape(message)) as info:
        read_predictions(bad)
    assert str(bad) in str(info.value)
    result = CliRunner().invoke(main, ["correlate", str(_good(tmp_path / "good.safetensors")), str(bad)])
    assert str(bad) in one_error_line(result, message)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


# name -> (the second file's ids, classes, labels; the message aligning it with the first gives)
PAIR_CASES = {
    "different classes": (("a", "b", "c"), ("x", "z"), (0, 1, 0), "classes ['x', 'z'] differ from"),
    "classes in another order": (("a", "b", "c"), ("y", "x"), (0, 1, 0), "classes ['y', 'x'] differ from"),
    "different samples": (("a", "b", "d"), ("x", "y"), (0, 1, 0), "hold different samples (3 vs 3 ids; first differing id 'c')"),
    "fewer samples": (("a", "b"), ("x", "y"), (0, 1), "hold different samples (2 vs 3 ids"),
    "same ids, other labels": (("c", "b", "a"), ("x", "y"), (1, 1, 0), "id 'c' is labelled 'y' there but 'x' in"),
    "same ids in the same order, other labels": (("a", "b", "c"), ("x", "y"), (0, 0, 0), "id 'b' is labelled 'x' there but 'y' in"),
}


@pytest.mark.parametrize("case", list(PAIR_CASES))
def test_prediction_files_that_do_not_match_are_refused_naming_which(tmp_path, case):
    ids, classes, labels, message = PAIR_CASES[case]
    first = _good(tmp_path / "first.safetensors")
    second = _good(tmp_path / "second.safetensors", ids=ids, classes=classes, labels=labels)
    with pytest.raises(UserInputError, match=re.escape(message)):
        align_predictions([read_predictions(first), read_predictions(second)])
    result = CliRunner().invoke(main, ["correlate", str(first), str(second)])
    assert str(second) in one_error_line(result, message)


# --------------------------------------------------------------------------- ensemble files

def test_an_ensemble_file_naming_a_missing_run_is_refused_before_any_inference(tmp_path):
    from ensemble.file import write_ensemble
    from ensemble.model import Ensemble, Member

    present = tmp_path / "runs" / "present"
    present.mkdir(parents=True)
    (present / "config.json").write_text(json.dumps({"backbone": "test_resnet", "classes": ["ant", "bee"]}))
    gone = tmp_path / "runs" / "gone"
    ens = tmp_path / "ens.json"
    write_ensemble(ens, Ensemble(classes=["ant", "bee"], members=[
        Member("present", "test_resnet", 0.5, run=str(present)), Member("gone", "test_resnet", 0.5, run=str(gone))]))
    data = make_image_folder(tmp_path / "data", classes=("ant", "bee"), per_class=(2, 2, 2))
    out = tmp_path / "preds.csv"
    result = CliRunner().invoke(main, ["ensemble", "predict", str(ens), "--data", str(data), "--out", str(out)])
    error = one_error_line(result, f"member 'gone': run directory {gone} is missing")
    assert str(ens) in error and not out.exists()


# --------------------------------------------------------------------------- weights and resume state (no pickle)

def _pickled_module(path: Path) -> Path:
    import torch

    torch.save(torch.nn.Linear(2, 2), path)  # a whole pickled object, not a state dict
    return path


# name -> (file name, how to make it, the message)
WEIGHTS_CASES = {
    "a malicious pickle": ("evil.pth", _pickle_renamed, "never pickled objects"),
    "a malicious pickle renamed .safetensors": ("evil.safetensors", _pickle_renamed, "cannot be read as weights"),
    "a pickled nn.Module": ("module.pt", _pickled_module, "never pickled objects"),
    "an empty file": ("empty.pth", lambda p: (p.write_bytes(b""), p)[1], "cannot be read as weights"),
    "a folder": ("folder.pth", lambda p: (p.mkdir(), p)[1], "weights file not found"),
}


@pytest.mark.parametrize("case", list(WEIGHTS_CASES))
def test_weights_never_unpickle_objects_and_bad_ones_are_one_line(tmp_path, monkeypatch, image_folder, case):
    monkeypatch.chdir(tmp_path)
    name, make, message = WEIGHTS_CASES[case]
    weights = make(tmp_path / name)
    run = tmp_path / "run"
    args = ["finetune", "test_resnet", "--data", str(image_folder), "--out", str(run), "--weights", str(weights), *TINY[1:]]
    assert str(weights) in one_error_line(CliRunner().invoke(main, args), message)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists() and not run.exists()


@pytest.mark.parametrize("case", ["a malicious pickle", "a truncated file", "another kind of torch file"])
def test_bad_resume_state_is_one_line_and_nothing_runs(tmp_path, monkeypatch, image_folder, case):
    import torch

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["finetune", "test_resnet", "--data", str(image_folder), "--out", str(run), *TINY])
    assert result.exit_code == 0, result.output
    good = (run / "last.pt").read_bytes()
    if case == "a malicious pickle":
        _pickle_renamed(run / "last.pt")
    elif case == "a truncated file":
        (run / "last.pt").write_bytes(good[: len(good) // 3])
    else:
        torch.save({"state_dict": {}}, run / "last.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    result = CliRunner().invoke(main, ["finetune", "--resume", "--out", str(run)])
    message = "not zoo resume state" if case == "another kind of torch file" else "cannot be read as zoo resume state"
    assert str(run / "last.pt") in one_error_line(result, message)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing lost or changed



def test_zoo_predict_takes_csv_paths_outside_the_root_only_with_the_flag(tmp_path, image_folder):
    from click.testing import CliRunner

    from finetune.train import finetune
    from tests.conftest import tiny_config
    from zoo.cli import main

    run = tmp_path / "run"
    finetune(tiny_config(image_folder, run, epochs=1), progress=False, log=lambda m: None)
    listing = tmp_path / "lists" / "new.csv"
    listing.parent.mkdir()
    listing.write_text(f"path,label,split\n{image_folder / 'val' / 'ant' / 'ant_0.png'},ant,test\n")
    out = tmp_path / "p.safetensors"
    refused = CliRunner().invoke(main, ["predict", str(run), "--data", str(listing), "--out", str(out)])
    assert refused.exit_code == 1 and "outside the dataset root" in refused.output and not out.exists()
    allowed = CliRunner().invoke(main, ["predict", str(run), "--data", str(listing), "--out", str(out), "--allow-outside-root"])
    assert allowed.exit_code == 0, allowed.output
    assert out.is_file()
