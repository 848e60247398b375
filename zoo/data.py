"""Datasets: image folders and CSV files, their splits, and the images in them.

An image folder is ``DATA/train/<class>/*``, ``DATA/val/<class>/*`` and optionally
``DATA/test/<class>/*``; a CSV has columns ``path,label[,split]`` with paths relative
to the CSV's folder. Classes are the sorted (by code point, Python's ``sorted``) folder
names or labels of the train split. A sample's id is its path relative to the dataset
root, with ``/`` separators.

Over 400 lines on purpose: both dataset kinds (folders, CSV), the validation split taken
from train and the image checks build the same ``Sample`` and ``Dataset``; one file keeps
the rules a listing follows in one place.
"""

from __future__ import annotations

import csv
import glob
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from zoo.errors import UserInputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"})
SPLITS = ("train", "val", "test")
CLASS_ORDER = "sorted"  # recorded in each run's config: classes = sorted(train class names)


@dataclass(frozen=True)
class Sample:
    path: Path
    id: str
    label: int  # -1 where unknown


@dataclass
class Dataset:
    """A dataset's classes and the samples of each split."""

    root: Path
    kind: str  # a key of READERS
    classes: list[str]
    splits: dict[str, list[Sample]]
    val_source: str = "folder"  # folder | csv | from-train
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, why)
    warnings: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # ids left out by --exclude (zoo.exclude), recorded in config.json

    def split(self, name: str) -> list[Sample]:
        return self.splits.get(name, [])

    def class_counts(self, name: str = "train") -> list[int]:
        counts = [0] * len(self.classes)
        for s in self.split(name):
            counts[s.label] += 1
        return counts


# --------------------------------------------------------------------------- images

_PIL_WARNING_OFF = False


def _pil_image():
    from PIL import Image

    global _PIL_WARNING_OFF
    if not _PIL_WARNING_OFF:
        # load_rgb refuses oversized images itself (thread-safe); PIL's warning about them would only repeat it.
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _PIL_WARNING_OFF = True
    return Image


def load_rgb(path: str | os.PathLike):
    """Open an image as 8-bit RGB, whatever its mode (grayscale, CMYK, 16-bit, palette).

    An image of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (about 89 million) is
    refused with ``DecompressionBombError`` from its header, before anything is decoded
    (a check of our own: the warnings machinery PIL uses below twice that size is not
    thread-safe, and images are checked in threads). 16-bit images are scaled by their
    bit depth (65535 -> 255), so a pixel value means the same brightness in every image.
    """
    import numpy as np

    Image = _pil_image()
    with Image.open(path) as img:
        limit = Image.MAX_IMAGE_PIXELS
        if limit and img.width * img.height > limit:
            raise Image.DecompressionBombError(
                f"{img.width}x{img.height} = {img.width * img.height} pixels, more than the limit of {limit} "
                "(PIL.Image.MAX_IMAGE_PIXELS); could be a decompression bomb")
        img.load()
        if img.mode.startswith("I;16") or img.mode == "I":
            arr = np.asarray(img).astype(np.float64).clip(0, 65535)
            img = Image.fromarray(np.rint(arr / 257.0).astype(np.uint8), mode="L")
        elif img.mode == "F":
            arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
            lo, hi = (0.0, 1.0) if arr.size == 0 or (arr.min() >= 0 and arr.max() <= 1) else (arr.min(), arr.max())
            img = Image.fromarray(np.rint((arr - lo) / ((hi - lo) or 1.0) * 255).astype(np.uint8), mode="L")
        return img.convert("RGB")


def check_image(path: Path) -> str | None:
    """None if the image decodes completely, else why it cannot be used."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        load_rgb(path)
        return None
    except Exception as e:  # PIL raises many types for broken files; every one means skip
        return unreadable_reason(e)


def unreadable_reason(error: Exception) -> str:
    """Why an image was skipped, in one short line: the same words wherever it was read (check, cache, ONNX)."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:200]


def check_images(samples: Sequence[Sample], workers: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Decode every image once, before training; return the good ones and (id, why) for the rest."""
    if not workers:  # callers pass their CPU budget's share; this default splits the cores over torchrun's local processes too
        from zoo.cpu import processes_on_this_machine

        workers = max(1, min(8, (os.cpu_count() or 1) // processes_on_this_machine()))
    good, bad = [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, (sample, why) in enumerate(zip(samples, pool.map(lambda s: check_image(s.path), samples))):
            if why is None:
                good.append(sample)
            else:
                bad.append((sample.id, why))
            if progress is not None:
                progress(i + 1, len(samples))
    return good, bad


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted, hidden files left out.

    A link to nothing is listed too, so that the image check reports it as skipped instead of it vanishing."""
    return sorted(
        p for p in folder.rglob("*")
        if (p.is_file() or (p.is_symlink() and not p.exists())) and p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _sample_id(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


# --------------------------------------------------------------------------- readers

def _class_folders(split_dir: Path) -> list[Path]:
    return sorted((p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def read_image_folder(root: Path, allow_outside_root: bool = False) -> Dataset:
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise UserInputError(
            f"{root}: no train/ folder; expected {root}/train/<class>/<image> "
            "(and optionally val/ and test/), or a CSV file with columns path,label[,split]"
        )
    folders = _class_folders(train_dir)
    if not folders:
        raise UserInputError(f"{train_dir}: no class folders; put each class's images in {train_dir}/<class>/")
    classes = [p.name for p in folders]
    warns: list[str] = []
    splits: dict[str, list[Sample]] = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        samples = []
        for class_dir in _class_folders(split_dir):
            if class_dir.name not in classes:
                raise UserInputError(
                    f"{class_dir}: class {class_dir.name!r} is not among the train classes {classes}; "
                    f"rename it or add {train_dir / class_dir.name}/"
                )
            images = list_images(class_dir)
            if not images:
                if split == "train":
                    raise UserInputError(f"{class_dir}: class {class_dir.name!r} has no images; add images or remove the empty folder")
                warns.append(f"{class_dir}: no images of class {class_dir.name!r} in {split}/")
                continue
            label = classes.index(class_dir.name)
            samples += [Sample(p, _sample_id(p, root), label) for p in images]
        present = {s.label for s in samples}
        if samples and split != "train":
            missing = [c for i, c in enumerate(classes) if i not in present]
            if missing:
                warns.append(f"{split_dir}: no images of class(es) {missing}; their {split} accuracy cannot be measured")
        if not samples:
            if split == "train":
                raise UserInputError(f"{train_dir}: no images found (extensions {sorted(IMAGE_EXTENSIONS)})")
            warns.append(f"{split_dir}: folder holds no images; ignored")
            continue
        splits[split] = samples
    return Dataset(root=root, kind="folder", classes=classes, splits=splits, warnings=warns)


def _read_csv_rows(csv_path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """The rows of a UTF-8 CSV file as dicts of stripped strings; one clear error if it cannot be read."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in required if c not in columns]
            if missing:
                raise UserInputError(f"{csv_path}: missing column(s) {missing}; expected a header "
                                     f"{','.join(required)}[,...], got {columns}")
            return [{k.strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str)} for row in reader]
    except UnicodeDecodeError as e:
        raise UserInputError(f"{csv_path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
                             "save it as UTF-8 (in Excel: CSV UTF-8)") from None
    except csv.Error as e:
        raise UserInputError(f"{csv_path}: not a readable CSV file ({e}); expected a header line and one row per image") from None


def read_csv_dataset(csv_path: Path, allow_outside_root: bool = False) -> Dataset:
    root = csv_path.parent.resolve()
    rows = _read_csv_rows(csv_path, required=("path", "label"))
    if not rows:
        raise UserInputError(f"{csv_path}: no rows under the header")
    by_split: dict[str, list[tuple[int, dict]]] = {}
    for line, row in enumerate(rows, start=2):
        split = row.get("split") or "train"
        if split not in SPLITS:
            raise UserInputError(f"{csv_path}:{line}: split {split!r} is not one of {list(SPLITS)}")
        if not row["path"] or not row["label"]:
            raise UserInputError(f"{csv_path}:{line}: empty path or label")
        by_split.setdefault(split, []).append((line, row))
    if "train" not in by_split:
        raise UserInputError(f"{csv_path}: no train rows (rows with split empty or 'train')")
    classes = sorted({row["label"] for _, row in by_split["train"]})
    splits: dict[str, list[Sample]] = {}
    warns: list[str] = []
    listed: dict[Path, tuple[str, int]] = {}  # image -> (split, line) where first listed
    for split, items in by_split.items():
        samples = []
        for line, row in items:
            if row["label"] not in classes:
                raise UserInputError(f"{csv_path}:{line}: label {row['label']!r} never appears in train rows; known labels are {classes}")
            path = Path(row["path"])
            full = (path if path.is_absolute() else root / path).resolve()
            try:
                sample_id = full.relative_to(root).as_posix()
            except ValueError:
                if not allow_outside_root:
                    raise UserInputError(
                        f"{csv_path}:{line}: path {row['path']!r} is outside the dataset root {root}; "
                        "move the image under it or pass --allow-outside-root"
                    ) from None
                sample_id = full.as_posix()
            if full in listed:
                first_split, first_line = listed[full]
                if first_split == split:
                    raise UserInputError(f"{csv_path}:{line}: path {row['path']!r} is listed again in {split} (first on line "
                                         f"{first_line}); list each image once per split")
                warns.append(f"{csv_path}:{line}: {row['path']!r} is in {split} and in {first_split} (line {first_line}); "
                             f"scores on {split} will be optimistic")
            listed.setdefault(full, (split, line))
            samples.append(Sample(full, sample_id, classes.index(row["label"])))
        if split != "train":
            present = {s.label for s in samples}
            missing = [c for i, c in enumerate(classes) if i not in present]
            if missing:
                warns.append(f"{csv_path}: {split} rows have no images of class(es) {missing}")
        splits[split] = samples
    return Dataset(root=root, kind="csv", classes=classes, splits=splits, val_source="csv", warnings=warns)


# One registry of dataset readers, chosen by what --data points at.
READERS: dict[str, Callable[..., Dataset]] = {"folder": read_image_folder, "csv": read_csv_dataset}


def split_from_train(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """Take a stratified validation split of ``fraction`` from train, with a fixed seed."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < fraction < 1.0:
        raise UserInputError(f"--val-fraction must be between 0 and 1, got {fraction}")
    train = sorted(dataset.split("train"), key=lambda s: s.id)
    labels = [s.label for s in train]
    counts = dataset.class_counts("train")
    if min(counts) < 2:
        small = [c for c, n in zip(dataset.classes, counts) if n < 2]
        raise UserInputError(f"{dataset.root}: class(es) {small} have fewer than 2 train images; cannot take a stratified validation split")
    n_val = max(int(round(fraction * len(train))), len(dataset.classes))
    keep, val = train_test_split(train, test_size=n_val, stratify=labels, random_state=seed)
    splits = dict(dataset.splits)
    if "val" in splits and dataset.val_source != "from-train":
        # The dataset's own val/ becomes an untouched test set when no test/ exists.
        splits.setdefault("test", splits["val"])
    splits["train"] = sorted(keep, key=lambda s: s.id)
    splits["val"] = sorted(val, key=lambda s: s.id)
    return Dataset(root=dataset.root, kind=dataset.kind, classes=dataset.classes, splits=splits,
                   val_source="from-train", skipped=dataset.skipped, warnings=dataset.warnings)


def _reader_for(path: Path) -> str:
    """Which reader --data needs: "csv" for a .csv file, "folder" for a folder."""
    if not path.exists():
        raise UserInputError(f"{path}: no such file or folder; --data takes an image folder (train/<class>/...) or a CSV")
    if path.is_file() and path.suffix.lower() != ".csv":
        raise UserInputError(f"{path}: --data takes an image folder or a .csv file, got a {path.suffix or 'extensionless'} file")
    return "csv" if path.is_file() else "folder"


def read_listing(data: str | os.PathLike, *, allow_outside_root: bool = False) -> Dataset:
    """The dataset's splits as listed (image folders or CSV rows), with no validation split taken."""
    path = Path(data)
    dataset = READERS[_reader_for(path)](path, allow_outside_root=allow_outside_root)
    if len(dataset.classes) < 2:
        raise UserInputError(f"{path}: train has {len(dataset.classes)} class ({dataset.classes[0]!r}); a classifier needs at "
                             "least 2: add a folder (or CSV label) per class")
    return dataset


def read_dataset(data: str | os.PathLike, *, val_fraction: float = 0.2, val_from_train: bool = False,
                 seed: int = 0, allow_outside_root: bool = False) -> Dataset:
    """Read an image folder or CSV dataset, with a validation split.

    With no val split (or with ``val_from_train``) a stratified ``val_fraction`` of
    train becomes the validation split; the dataset's own ``val/`` then becomes the
    test split if it has no ``test/``.
    """
    dataset = read_listing(data, allow_outside_root=allow_outside_root)
    if val_from_train or not dataset.split("val"):
        dataset = split_from_train(dataset, val_fraction, seed)
    return dataset


def image_files(patterns: Sequence[str | os.PathLike]) -> tuple[Path, list[Sample]]:
    """Images named one by one: files, globs (``photos/*.jpg``; ``**`` reaches into subfolders) or folders (every
    image under them), in the order given, each once; unlabelled, each one's id the path as given. Returns
    their common folder and the samples."""
    if not patterns:
        raise UserInputError("no images given: name image files, globs or folders")
    found: dict[Path, str] = {}
    for pattern in patterns:
        text = os.fspath(pattern)
        if glob.has_magic(text):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            paths = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_EXTENSIONS]
            if not paths:
                raise UserInputError(f"{text}: no image file matches this pattern ({len(matches)} other match(es)); "
                                     f"images end in {', '.join(sorted(IMAGE_EXTENSIONS))}")
        elif Path(text).is_dir():
            paths = list_images(Path(text))
            if not paths:
                raise UserInputError(f"{text}: no images found in this folder")
        elif Path(text).is_file():
            if Path(text).suffix.lower() not in IMAGE_EXTENSIONS:
                raise UserInputError(f"{text}: not an image file (images end in {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                                     "a dataset folder or CSV goes to --data")
            paths = [Path(text)]
        else:
            raise UserInputError(f"{text}: no such image file or folder")
        for path in paths:
            found.setdefault(path.resolve(), path.as_posix())
    root = Path(os.path.commonpath([p.parent for p in found]))
    return root, [Sample(path, sample_id, -1) for path, sample_id in found.items()]


def read_prediction_images(data: str | os.PathLike | Sequence[str | os.PathLike], classes: Sequence[str],
                           split: str = "test", allow_outside_root: bool = False) -> tuple[Path, list[Sample]]:
    """Images to predict: a split of a dataset, any folder of images, or a list of image files and globs
    (``image_files``; ``split`` does not apply to them).

    CSV paths must stay under the CSV's folder unless ``allow_outside_root``.

    ``split`` is ``train``, ``val`` or ``test`` (that folder of an image-folder dataset, or
    those rows of a CSV), or ``all`` (every image under ``data``). Labels come from the
    class folder (or CSV label) where it names one of ``classes``, else -1.
    """
    if isinstance(data, (list, tuple)):
        return image_files(data)
    path = Path(data)
    if _reader_for(path) == "csv":
        root = path.parent.resolve()
        rows = _read_csv_rows(path, required=("path",))
        samples, listed = [], {}
        for line, row in enumerate(rows, start=2):
            if split != "all" and (row.get("split") or "train") != split:
                continue
            if not row.get("path"):
                raise UserInputError(f"{path}:{line}: empty path")
            full = (root / row["path"]).resolve()
            if not allow_outside_root and not full.is_relative_to(root):
                raise UserInputError(f"{path}:{line}: path {row['path']!r} is outside the dataset root {root}; "
                                     "move the image under it")
            row_split = row.get("split") or "train"
            if full in listed:
                first_split, first_line = listed[full]
                if first_split == row_split:
                    raise UserInputError(f"{path}:{line}: path {row['path']!r} is listed again in {row_split} (first on line "
                                         f"{first_line}); list each image once per split")
                continue  # --split all: an image in two splits is predicted once
            listed[full] = (row_split, line)
            label = classes.index(row["label"]) if row.get("label") in classes else -1
            samples.append(Sample(full, _safe_id(full, root), label))
        return root, samples
    root = path
    folder = path / split if split in SPLITS and (path / split).is_dir() else path
    if split in SPLITS and folder == path and (path / "train").is_dir():
        raise UserInputError(f"{path}: has no {split}/ folder; choose --split from the folders that exist, or --split all")
    images = list_images(folder)
    if not images:
        raise UserInputError(f"{folder}: no images found")
    samples = []
    for p in images:
        rel = p.relative_to(folder).parts
        label = classes.index(rel[0]) if len(rel) > 1 and rel[0] in classes else -1
        if split == "all" and len(rel) > 2 and rel[0] in SPLITS and rel[1] in classes:
            label = classes.index(rel[1])
        samples.append(Sample(p, _sample_id(p, root), label))
    return root, samples


def _safe_id(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


class ImageDataset:
    """A torch-style map dataset over ``samples``: returns (image tensor, label, index).

    ``images(index)`` gives sample ``index``'s RGB image (``zoo.cache``: size-capped, or from a
    decoded-image cache); by default the file is decoded as it is.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable, images: Callable[[int], object] | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.images = images

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int):
        """Sample ``index``'s RGB image, from ``images`` or decoded from its file."""
        return self.images(index) if self.images is not None else load_rgb(self.samples[index].path)

    def __getitem__(self, index: int):
        return self.transform(self.image(index)), self.samples[index].label, index
