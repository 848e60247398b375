"""Exported ONNX files (``zoo export``): their metadata, their preprocessing and ``zoo predict model.onnx``,
on onnxruntime, numpy and PIL alone. Nothing here imports torch, so a deployment needs neither torch nor timm.

The file (written by ``zoo.pipeline.export``) takes one float32 input ``[N, 3, H, W]`` per distinct
preprocessing of its members: RGB pixels in [0, 1] after timm's eval resize and crop (``ToTensor``'s
output). The graph applies each member's mean and std itself and returns calibrated class probabilities
``[N, C]``. Its ``metadata_props`` (all strings, JSON where structured) say what the caller must do:

- ``zoo.format``: ``FORMAT_VERSION``; ``zoo.kind``: member, cross-fit, cross-fit soup or ensemble;
- ``zoo.classes``: the class names, in output order; ``zoo.output``: the output's name (probabilities);
- ``zoo.inputs``: one entry per graph input: its ``name``, ``input_size`` [3, H, W], ``interpolation``,
  ``crop_pct``, ``crop_mode`` (what the caller applies), ``mean`` and ``std`` of each member it feeds (what
  the graph applies) and those ``members``;
- ``zoo.members`` (ensembles: name, backbone, weight, temperature, input), ``zoo.combine`` and
  ``zoo.final_temperature``; ``zoo.backbone``; ``zoo.version``; ``zoo.source`` and ``zoo.source_sha256`` (of the
  ensemble file, or of the run's weight files in order).
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from zoo.data import load_rgb, read_prediction_images, unreadable_reason
from zoo.errors import UserInputError
from zoo.predictions import Predictions

FORMAT_VERSION = 1
EXTRA = "pip install 'zoo-ensemble[export]'"
PREFIX = "zoo."
# timm's interpolation names -> PIL's resampling filters (timm.data.transforms' table; PIL's own numbers).
PIL_FILTERS = {"nearest": 0, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5, "lanczos": 1}
CROP_MODES = ("center", "squash")  # what `preprocess` reproduces exactly (timm's "border" pads: not exported)
DEFAULT_CROP_PCT = 0.875  # timm's, where a data config has none


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserInputError(f"running an ONNX file needs onnxruntime: {EXTRA}") from None
    return onnxruntime


# --------------------------------------------------------------------------- preprocessing


def check_preprocessing(data_config: dict[str, Any], where: str) -> None:
    """Refuse, in one line, a data config that ``preprocess`` cannot reproduce without torch."""
    mode = data_config.get("crop_mode") or "center"
    size = [int(v) for v in data_config["input_size"]]
    if mode not in CROP_MODES:
        raise UserInputError(f"{where}: crop_mode {mode!r} is not exported (only {', '.join(CROP_MODES)}); "
                             "fine-tune with a center crop to deploy it as ONNX")
    if mode == "center" and size[1] != size[2]:
        raise UserInputError(f"{where}: a non-square input size {size[1:]} with a center crop is not exported; "
                             "use a square --input-size")
    if data_config.get("interpolation") not in PIL_FILTERS:
        raise UserInputError(f"{where}: interpolation {data_config.get('interpolation')!r} is not one of {', '.join(PIL_FILTERS)}")


def preprocess(image, spec: dict[str, Any]) -> np.ndarray:
    """An RGB PIL image as the float32 [3, H, W] array in [0, 1] that timm's eval transform (torchvision's
    Resize and CenterCrop on PIL, then ToTensor) makes of it, before its Normalize."""
    _, height, width = (int(v) for v in spec["input_size"])
    crop_pct = float(spec.get("crop_pct") or DEFAULT_CROP_PCT)
    scale_h, scale_w = math.floor(height / crop_pct), math.floor(width / crop_pct)
    resample = PIL_FILTERS[spec["interpolation"]]
    w, h = image.size
    if (spec.get("crop_mode") or "center") == "squash":
        size = (scale_w, scale_h)
    else:  # the shorter side to scale_h, the longer one in proportion (torchvision's int() truncation)
        size = (scale_h, int(scale_h * h / w)) if w <= h else (int(scale_h * w / h), scale_h)
    if size != (w, h):
        image = image.resize(size, resample)
    w, h = image.size
    if w < width or h < height:  # torchvision pads with zeros before cropping
        from PIL import Image

        padded = Image.new("RGB", (max(w, width), max(h, height)))
        padded.paste(image, ((max(w, width) - w) // 2, (max(h, height) - h) // 2))
        image, (w, h) = padded, padded.size
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.float32)
    return (pixels / np.float32(255.0)).transpose(2, 0, 1)


# --------------------------------------------------------------------------- the file


@dataclass
class OnnxModel:
    """An exported file opened with onnxruntime: its session and zoo metadata."""

    path: Path
    session: Any
    metadata: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return self.metadata["classes"]

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self.metadata["inputs"]

    def run(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities [N, C] of one batch: ``arrays[i]`` feeds ``inputs[i]``."""
        feeds = {spec["name"]: a for spec, a in zip(self.inputs, arrays)}
        return self.session.run([self.metadata["output"]], feeds)[0]


def decode_metadata(props: dict[str, str], where: str) -> dict[str, Any]:
    """zoo's metadata from an ONNX file's ``metadata_props``, JSON values decoded; refuses a file zoo did not write."""
    if PREFIX + "format" not in props:
        raise UserInputError(f"{where}: not an ONNX file written by `zoo export` (no {PREFIX}format metadata); "
                             "export the run or ensemble with `zoo export`")
    try:
        fmt = int(props[PREFIX + "format"])
        out = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        for key in ("classes", "inputs", "members", "final_temperature"):
            if key in out:
                out[key] = json.loads(out[key])
    except (ValueError, json.JSONDecodeError) as e:
        raise UserInputError(f"{where}: its zoo metadata is damaged ({e}); export it again with `zoo export`") from None
    if fmt > FORMAT_VERSION:
        raise UserInputError(f"{where}: zoo export format {fmt} is newer than this zoo reads ({FORMAT_VERSION}); upgrade zoo")
    missing = [k for k in ("classes", "inputs", "output") if k not in out]
    if missing:
        raise UserInputError(f"{where}: its zoo metadata lacks {', '.join(missing)}; export it again with `zoo export`")
    return out


def open_onnx(path: str | os.PathLike, threads: int | None = None) -> OnnxModel:
    """Open an exported file, refusing in one line a file onnxruntime cannot read or that zoo did not write."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such file; write it with `zoo export RUN --out {path.name}`")
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for unreadable files
        text = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserInputError(f"{path}: not a readable ONNX file ({text}); export it again with `zoo export`") from None
    metadata = decode_metadata(dict(session.get_modelmeta().custom_metadata_map), str(path))
    graph_inputs = [i.name for i in session.get_inputs()]
    if graph_inputs != [spec["name"] for spec in metadata["inputs"]]:
        raise UserInputError(f"{path}: its graph inputs {graph_inputs} differ from its metadata's "
                             f"{[spec['name'] for spec in metadata['inputs']]}; export it again with `zoo export`")
    return OnnxModel(path, session, metadata)


# --------------------------------------------------------------------------- zoo predict model.onnx


def _load(sample, specs) -> tuple[list[np.ndarray] | None, str | None]:
    """One image preprocessed for every input, or (None, why it cannot be read)."""
    try:
        image = load_rgb(sample.path)
    except Exception as e:  # PIL raises many types for broken files; every one means skip (as zoo.data.check_image)
        return None, unreadable_reason(e)
    return [preprocess(image, spec) for spec in specs], None


def predict_onnx(model_path: str | os.PathLike, data: str | os.PathLike, split: str = "test", batch_size: int = 64,
                 threads: int | None = None, allow_outside_root: bool = False,
                 log: Callable[[str], None] | None = None) -> Predictions:
    """``zoo predict model.onnx``: the exported file's probabilities on ``split`` of ``data`` (as ``zoo predict
    RUN``: ``all`` for every image), as a prediction set whose logits are log-probabilities. Unreadable images
    are skipped and listed through ``log``. ``threads``: onnxruntime's intra-op threads (default: the free cores)."""
    from zoo.cpu import cpu_budget
    from zoo.progress import progress

    if batch_size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {batch_size}")
    budget = cpu_budget(threads, 0)
    model = open_onnx(model_path, budget.threads)
    root, samples = read_prediction_images(data, model.classes, split, allow_outside_root=allow_outside_root)
    probs, kept, bad = [], [], []
    with ThreadPoolExecutor(max_workers=max(1, budget.threads)) as pool, \
            progress(len(samples), f"predicting with {Path(model_path).name}", unit="images") as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            rows = []
            for sample, (arrays, why) in zip(batch, pool.map(lambda s: _load(s, model.inputs), batch)):
                if arrays is None:
                    bad.append((sample.id, why))
                else:
                    rows.append(arrays)
                    kept.append(sample)
            if rows:
                probs.append(model.run([np.stack([r[i] for r in rows]) for i in range(len(model.inputs))]))
            bar.update(len(batch))
    if bad and log is not None:
        log(f"warning: skipped {len(bad)} unreadable image(s) of {len(samples)}; {len(kept)} predicted:"
            + "".join(f"\n  {sample_id}: {why}" for sample_id, why in bad[:20]))
    if not kept:
        raise UserInputError(f"{data}: no readable images to predict")
    p = np.concatenate(probs).astype(np.float64)
    return Predictions(logits=np.log(np.clip(p, 1e-30, None)), labels=[s.label for s in kept], ids=[s.id for s in kept],
                       classes=model.classes, backbone=str(model.metadata.get("backbone", model.metadata.get("kind", ""))),
                       run=str(model.metadata.get("source", "")), split=split, tta=1)
