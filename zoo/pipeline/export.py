"""``zoo export``: a run, a cross-fit, a soup or a whole ensemble as one ONNX graph, served without torch.

What the graph holds, so that a deployment cannot feed a member another member's preprocessing:

- a run (a fine-tune, a probe, a snapshot, a soup): its model, its mean and std, a softmax;
- a cross-fit: the mean of its K fold models' probabilities (one backbone pass and K heads where the fold
  models share their backbone, as ``zoo predict`` runs it), or with ``soup=True`` the uniform soup of its fold
  models (one model; refused unless they were fine-tuned from the same starting weights);
- an ensemble file: each kept member as above, at its temperature, combined with the weights by the
  ensemble's rule (arithmetic or geometric), at the final temperature. One graph input per distinct
  preprocessing (input size, interpolation, crop) among the members: a resize inside the graph cannot match
  the PIL resize-and-crop the members were trained and scored on.

Every input is RGB pixels in [0, 1] after that resize and crop, batch size dynamic; the output is calibrated
class probabilities. The file's metadata (``zoo.onnx_predict``) says which preprocessing each input takes.
After writing, the file is run with onnxruntime on random pixels and compared with the PyTorch module
(``CHECK_TOLERANCE``): a graph that disagrees is refused, never kept.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from zoo import __version__, atomic
from zoo.errors import UserInputError
from zoo.onnx_predict import EXTRA, FORMAT_VERSION, PREFIX, check_preprocessing, import_onnxruntime
from zoo.rundir import RunDir, check_out_file

OUTPUT = "probabilities"
CHECK_TOLERANCE = 1e-4  # largest absolute difference in probability between the file and PyTorch, on random pixels
PREPROCESSING_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode")  # what the caller applies, per input


class Normalized(torch.nn.Module):
    """``model`` behind its own mean and std: takes pixels in [0, 1]."""

    def __init__(self, model: torch.nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)


class LogSoftmax(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).float().log_softmax(-1)


class Probabilities(torch.nn.Module):
    """One member's graph: pixels in [0, 1] -> class probabilities."""

    def __init__(self, member: torch.nn.Module):
        super().__init__()
        self.member = member

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.member(pixels).softmax(-1)


class EnsembleGraph(torch.nn.Module):
    """Members (pixels -> log-probabilities), each fed input ``feeds[j]``: ``ensemble.model.Ensemble``'s
    ``predict_log_proba`` (temperatures, combine rule, final temperature) as probabilities."""

    def __init__(self, members: Sequence[torch.nn.Module], feeds: Sequence[int], weights: Sequence[float],
                 temperatures: Sequence[float], final_temperature: float, combine: str):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.feeds = list(feeds)
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        self.temperatures = [float(t) for t in temperatures]
        self.final_temperature = float(final_temperature)
        self.combine = combine

    def forward(self, *pixels: torch.Tensor) -> torch.Tensor:
        parts = [(member(pixels[feed]) / t).log_softmax(-1)
                 for member, feed, t in zip(self.members, self.feeds, self.temperatures)]
        if self.combine == "arithmetic":  # log of the weighted mean probability, floored as ensemble.combine does
            mixed = sum(w * part.exp() for w, part in zip(self.weights, parts))
            z = mixed.clamp_min(float(np.finfo(np.float32).tiny)).log()
        else:  # geometric: the weighted mean of log-probabilities, renormalised below
            z = sum(w * part for w, part in zip(self.weights, parts))
        return (z / self.final_temperature).softmax(-1)


@dataclass
class ExportResult:
    path: Path
    kind: str
    inputs: list[dict[str, Any]]
    max_difference: float  # the check: largest |ONNX - PyTorch| probability on random pixels
    seconds: float

    @property
    def summary(self) -> str:
        feeds = "; ".join(f"{i['name']} {i['input_size'][1]}x{i['input_size'][2]} ({i['interpolation']}, crop_pct "
                          f"{i['crop_pct']}, {i['crop_mode']}) -> {', '.join(i['members'])}" for i in self.inputs)
        return (f"{self.path}\t{self.kind}\tinputs: {feeds}\tmax |onnx - torch| {self.max_difference:.1e} on random "
                f"pixels\t{self.seconds:.1f} s")


# --------------------------------------------------------------------------- members




def member_module(run: str | os.PathLike, soup: bool = False) -> tuple[torch.nn.Module, dict, str, list[Path]]:
    """A run as pixels-in-[0, 1] -> log-probabilities (eval mode, CPU), its config, its kind and its weight files."""
    from finetune.inference import FoldMean, load_run, shared_backbone

    run_dir = RunDir(run)
    model_runs = run_dir.fold_runs()
    config = (model_runs or [run_dir])[0].read_config()  # a cross-fit's own config.json has no data config
    if soup and not model_runs:
        raise UserInputError(f"{run_dir.root}: --soup takes a cross-fitted run (zoo finetune --folds K); to soup single "
                             "runs, `zoo soup RUN... --out SOUP`, then export SOUP")
    for model_run in model_runs or [run_dir]:
        if not model_run.model.is_file():
            raise UserInputError(f"{model_run.model}: missing; the run has no finished epoch to export (finish it first)")
    check_preprocessing(config["data_config"], str(run_dir.config))
    if not model_runs:
        module, kind = LogSoftmax(load_run(run_dir.root)[0]), "member"
    elif soup:
        from finetune.soup import average_states, check_compatible, load_states
        from zoo.backbones import architecture_kwargs, load_run_model

        check_compatible(model_runs, [r.read_config() for r in model_runs])
        model = load_run_model(config["backbone"], len(config["classes"]), model_runs[0].model, **architecture_kwargs(config))
        model.load_state_dict(average_states(load_states(model_runs)))
        module, kind = LogSoftmax(model.eval()), "cross-fit soup"
    else:
        shared = shared_backbone(model_runs)
        module = shared[0] if shared is not None else FoldMean([load_run(r.root)[0] for r in model_runs])
        kind = "cross-fit"
    files = [r.model for r in model_runs or [run_dir]]
    data = config["data_config"]
    return Normalized(module, data["mean"], data["std"]).eval(), config, kind, files


def _input_spec(data_config: dict[str, Any]) -> dict[str, Any]:
    spec = {key: data_config.get(key) for key in PREPROCESSING_KEYS}
    spec["input_size"] = [int(v) for v in spec["input_size"]]
    spec["crop_mode"] = spec["crop_mode"] or "center"
    return spec


def _name_inputs(specs: list[dict[str, Any]]) -> None:
    """``image`` for one input; else ``image_HxW`` (``_2``, ... where two inputs share a size)."""
    if len(specs) == 1:
        specs[0]["name"] = "image"
        return
    seen: dict[str, int] = {}
    for spec in specs:
        base = f"image_{spec['input_size'][1]}x{spec['input_size'][2]}"
        seen[base] = seen.get(base, 0) + 1
        spec["name"] = base if seen[base] == 1 else f"{base}_{seen[base]}"


# --------------------------------------------------------------------------- the file


def export_module(module: torch.nn.Module, input_sizes: Sequence[Sequence[int]], input_names: Sequence[str], path: Path,
                  metadata: dict[str, str] | None = None, output: str = OUTPUT) -> float:
    """Write ``module`` (float32 inputs [N, *size], N dynamic) to ``path`` with torch's ONNX exporter, atomically, with
    ``metadata`` as ``metadata_props``; run the file on random pixels and return its largest difference from
    ``module``'s output, refusing the file (removed) beyond ``CHECK_TOLERANCE``."""
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is None or importlib.util.find_spec("onnxscript") is None:  # torch's exporter needs onnxscript: said in zoo's words
        raise UserInputError(f"zoo export needs onnx and onnxscript: {EXTRA}")
    ort = import_onnxruntime()
    generator = torch.Generator().manual_seed(0)
    examples = tuple(torch.rand(3, *size, generator=generator) for size in input_sizes)  # batch 3: not specialised
    module = module.eval()
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} for _ in examples)
    if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(module.forward).parameters.values()):
        dynamic = (dynamic,)  # forward(*pixels): torch.export sees one argument, a tuple
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used")  # one Dim shared by the inputs: meant
        program = torch.onnx.export(module, examples, None, input_names=list(input_names), output_names=[output],
                                    dynamic_shapes=dynamic, dynamo=True, verbose=False)
        expected = module(*examples).numpy()
    proto = program.model_proto
    proto.producer_name, proto.producer_version = "zoo", __version__
    onnx.helper.set_model_props(proto, metadata or {})

    def write(tmp: Path) -> None:
        onnx.save_model(proto, str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run([output], {name: x.numpy() for name, x in zip(input_names, examples)})[0]
        difference = float(np.abs(got - expected).max())
        if not difference <= CHECK_TOLERANCE:
            raise UserInputError(f"{path}: the exported graph's outputs differ from PyTorch's by {difference:.2e} "
                                 f"(> {CHECK_TOLERANCE}) on random pixels; not written (please report it with the run's config.json)")
        checked.append(difference)

    checked: list[float] = []
    atomic.write_with(path, write)
    return checked[0]


def _metadata(kind: str, classes: list[str], inputs: list[dict], source: Path, files: Sequence[Path],
              **extra: Any) -> dict[str, str]:
    values = {"format": FORMAT_VERSION, "kind": kind, "classes": classes, "inputs": inputs, "output": OUTPUT,
              "version": __version__, "source": str(source.resolve()), "source_sha256": atomic.sha256_of_files(files), **extra}
    return {PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def check_out(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise UserInputError(f"{out}: --out must end in .onnx, got {out.suffix or 'no suffix'!r}")
    return check_out_file(out)


def export_run(run: str | os.PathLike, out: str | os.PathLike, soup: bool = False) -> ExportResult:
    """``zoo export RUN --out model.onnx``: a run (a cross-fit: its fold models' mean, or ``soup``) as one graph."""
    start, out = time.perf_counter(), check_out(out)
    module, config, kind, files = member_module(run, soup)
    spec = {"name": "image", **_input_spec(config["data_config"]), "mean": config["data_config"]["mean"],
            "std": config["data_config"]["std"], "members": [Path(run).resolve().name]}
    metadata = _metadata(kind, config["classes"], [spec], Path(run), files, backbone=config["backbone"])
    difference = export_module(Probabilities(module), [spec["input_size"]], ["image"], out, metadata)
    return ExportResult(out, kind, [spec], difference, time.perf_counter() - start)


def export_ensemble(ensemble_file: str | os.PathLike, out: str | os.PathLike,
                    log: Callable[[str], None] | None = None) -> ExportResult:
    """``zoo export ENS.json --out ensemble.onnx``: every member with a nonzero weight in one graph."""
    from ensemble.file import read_ensemble

    from zoo.pipeline.member_inference import check_member_runs

    start, out, where = time.perf_counter(), check_out(out), str(ensemble_file)
    ens = read_ensemble(ensemble_file)
    if ens.stacking is not None or ens.method == "stacking":
        raise UserInputError(f"{where}: a stacking ensemble is not exported (its logistic-regression combiner is fitted on "
                             "the members' stacked outputs); fit it with --method slsqp, greedy or random to export it")
    ens = ens.without_zero_weights()
    runs = check_member_runs(ens.members, ens.classes, where, instead="an export needs every member's model")
    modules, specs, feeds, files, members = [], [], [], [Path(ensemble_file)], []
    for m, run in zip(ens.members, runs):
        if log is not None:
            log(f"loading {m.name} ({m.backbone}) from {run}")
        module, config, kind, _ = member_module(run)
        spec = _input_spec(config["data_config"])
        if spec not in specs:
            specs.append(spec)
        feeds.append(specs.index(spec))
        modules.append(module)
        members.append({"name": m.name, "backbone": m.backbone, "kind": kind, "run": str(run), "weight": m.weight,
                        "temperature": m.temperature, "mean": config["data_config"]["mean"], "std": config["data_config"]["std"]})
    _name_inputs(specs)
    inputs = [{**spec, "members": [m["name"] for m, f in zip(members, feeds) if f == i],
               "mean": [m["mean"] for m, f in zip(members, feeds) if f == i],
               "std": [m["std"] for m, f in zip(members, feeds) if f == i]} for i, spec in enumerate(specs)]
    for m, feed in zip(members, feeds):
        m["input"] = specs[feed]["name"]
    graph = EnsembleGraph(modules, feeds, [m.weight for m in ens.members], [m.temperature for m in ens.members],
                          ens.final_temperature, ens.combine).eval()
    metadata = _metadata("ensemble", ens.classes, inputs, Path(ensemble_file), files, members=members,
                         combine=ens.combine, final_temperature=ens.final_temperature, backbone="ensemble")
    difference = export_module(graph, [s["input_size"] for s in specs], [s["name"] for s in specs], out, metadata)
    return ExportResult(out, "ensemble", inputs, difference, time.perf_counter() - start)


def export(source: str | os.PathLike, out: str | os.PathLike, soup: bool = False,
           log: Callable[[str], None] | None = None) -> ExportResult:
    """``zoo export``: an ensemble file (a ``.json`` file) or a run directory, as one ONNX graph at ``out``."""
    source = Path(source)
    if source.is_file():
        if soup:
            raise UserInputError(f"{source}: --soup takes a cross-fitted run directory, not an ensemble file")
        return export_ensemble(source, out, log)
    if not source.is_dir():
        raise UserInputError(f"{source}: no such run directory or ensemble file")
    return export_run(source, out, soup)
