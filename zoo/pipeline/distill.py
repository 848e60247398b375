"""``zoo distill``: one student model trained on an ensemble's calibrated probabilities.

The teacher's targets are made here, from the ensemble file and its members' run directories: every
member renders each of V views of every training image (``finetune.views``: a seeded crop box in source
pixels and a flip, at the member's own input size and normalisation), its fold models predict them, and
``Ensemble.predict_log_proba`` combines the members with the file's temperatures and weights. With
cross-fitted members and ``teacher="oof"`` (the default) an image of the pool gets, from each member,
only the fold model that held it out, so the targets carry no memorised labels, and its centre view
(view 0, the evaluation transform) is the ensemble's out-of-fold prediction for it; ``teacher="all"``
averages every fold model. Images of ``unlabeled`` folders (never the holdout) get the mean of every fold
model. The targets are computed once and cached in the student's run directory
(``RunDir.teacher_targets``); ``finetune`` then trains the student on them (``finetune.views.SoftTargets``)
without knowing of ensembles.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ensemble.file import open_ensemble
from ensemble.model import Ensemble
from zoo import atomic
from zoo.data import Dataset, Sample, list_images, read_dataset
from zoo.errors import UserInputError
from zoo.exclude import without_excluded
from zoo.folds import read_folds
from zoo.pipeline.member_inference import check_member_runs
from zoo.predictions import log_loss_and_accuracy
from zoo.progress import progress as progress_bar
from zoo.progress import write as stderr_log
from zoo.rundir import RunDir, check_out_folder, hold_folder, is_finetune_run

TEACHERS = {"oof": "each pool image from the fold models that did not train on it (cross-fitted members)",
            "all": "every fold model of every member"}
DEFAULTS = {"alpha": 0.0, "temperature": 1.0, "views": 8, "teacher": "oof", "view_mixup": 0.0}


@dataclass
class DistillResult:
    run: RunDir
    teacher_images: int  # labelled + unlabeled images with targets
    unlabeled: int
    finetune: Any  # finetune.train.FinetuneResult
    summary: str  # the line `zoo distill` prints


def distill(ensemble: str | os.PathLike, data: str | os.PathLike | None, student: str | None, out: str | os.PathLike, *,
            alpha: float = DEFAULTS["alpha"], temperature: float = DEFAULTS["temperature"], views: int = DEFAULTS["views"],
            teacher: str = DEFAULTS["teacher"], view_mixup: float = DEFAULTS["view_mixup"],
            unlabeled: Sequence[str | os.PathLike] = (), resume: bool = False,
            teacher_batch_size: int = 64, log: Callable[[str], None] = stderr_log, progress: bool | None = None,
            stop_after_epoch: int | None = None, **options: Any) -> DistillResult:
    """Train ``student`` (a timm name) into ``out`` on the teacher targets of ``ensemble`` (an ensemble file).

    ``alpha``: the hard labels' weight (0: the teacher alone; 1: plain fine-tuning); ``temperature``: both
    distributions are softened by it in the KL term; ``views``: V views per image (view 0 the centre crop);
    ``teacher``: ``oof`` or ``all`` (``TEACHERS``); ``view_mixup``: views 1.. mixed with a partner image by a
    Beta(view_mixup, view_mixup) weight (0: none; ``finetune.views``); ``unlabeled``: folders of images without labels to
    distil on too. ``options``: any ``zoo finetune`` option (``epochs=30``, ``weights=...``). ``resume``:
    continue the student in ``out`` (its teacher targets are read back from the run directory).
    """
    from finetune import train
    from finetune.config import FinetuneConfig

    if resume:
        run = RunDir(out)
        config = run.read_config()
        if not config.get("distill"):
            raise UserInputError(f"{run.root}: not a `zoo distill` student (its config.json has no distill record); "
                                 f"continue it with `zoo finetune --resume --out {run.root}`")
        targets = read_teacher_targets(run)
        cfg = FinetuneConfig(out=str(out), resume=True, **options)
        result = train.finetune(cfg, log=log, progress=progress, stop_after_epoch=stop_after_epoch, soft_targets=targets)
        return _result(run, targets, result)

    cfg = FinetuneConfig(backbone=student or "", data=str(data or ""), out=str(out), **options)
    cfg.distill = {"alpha": alpha, "temperature": temperature, "views": views, "teacher": teacher}
    if view_mixup:  # recorded only when used: configs and caches from before it existed still match
        cfg.distill["view_mixup"] = view_mixup
    if teacher not in TEACHERS:
        raise UserInputError(f"--teacher must be one of {list(TEACHERS)}, got {teacher!r}")
    if not (isinstance(view_mixup, (int, float)) and math.isfinite(view_mixup) and view_mixup >= 0):
        raise UserInputError(f"--view-mixup must be a Beta concentration >= 0 (0: no mixing; 1: a uniform weight), got {view_mixup!r}")
    if view_mixup and alpha == 1:
        raise UserInputError("--view-mixup with --alpha 1: a mixed view has no one hard label, and --alpha 1 trains on the "
                             "hard labels alone; lower --alpha or drop --view-mixup")
    if not data:
        raise UserInputError("--data is required: the dataset the ensemble's members were trained on")
    cfg.validate()  # options first: they need no file read
    run = RunDir(check_out_folder(out, "a zoo distill run", is_finetune_run))
    if run.is_run():
        raise UserInputError(f"{run.root}: already holds a run; pass --resume to continue it, or choose another --out")
    from zoo.backbones import check_model_name

    check_model_name(cfg.backbone)
    ens, where = open_ensemble(ensemble)
    ens = ens.without_zero_weights()
    dataset = without_excluded(read_dataset(cfg.data, val_fraction=cfg.val_fraction, val_from_train=cfg.val_from_train,
                                            seed=cfg.seed, allow_outside_root=cfg.allow_outside_root), cfg.exclude)
    if ens.classes != dataset.classes:
        raise UserInputError(f"{where}: the ensemble's classes {ens.classes} differ from {cfg.data}'s {dataset.classes}; "
                             "distil an ensemble fitted on this dataset")
    runs = check_member_runs(ens.members, ens.classes, where, instead="the teacher needs every member's fold models")
    extra = unlabeled_samples(unlabeled, dataset)
    from finetune.views import ViewSpec

    spec = ViewSpec(views, cfg.seed, cfg.crop_scale, cfg.hflip, float(view_mixup))
    cfg.distill.update(ensemble=str(Path(ensemble).resolve()), ensemble_sha256=atomic.sha256_of_files([ensemble]), views_spec=spec.to_dict(),
                       unlabeled=[str(Path(u).resolve()) for u in unlabeled], unlabeled_images=len(extra),
                       members=[m.name for m in ens.members])
    key = {k: cfg.distill[k] for k in ("ensemble_sha256", "teacher", "views_spec", "unlabeled")}
    if spec.mix:  # partners are drawn among the images taught: targets made for other images (another split) do not fit
        ids = "\n".join(sorted(s.id for s in dataset.split("train") + extra))
        key["images_sha256"] = hashlib.sha256(ids.encode()).hexdigest()

    with hold_folder(run.root):  # one writer; released before training, which takes it again
        targets = read_teacher_targets(run, key) if run.teacher_targets.is_file() else None
        if targets is None:
            samples = _readable(dataset.split("train") + extra, log)
            log(f"teacher: {len(ens.members)} member(s) of {where}, {teacher} fold models, {views} view(s) of "
                f"{len(samples)} image(s) ({sum(s.label < 0 for s in samples)} unlabeled)")
            mixing = view_mixing(runs, samples, spec, teacher)
            log_probs = teacher_log_probs(ens, runs, samples, spec, teacher, device=cfg.device, threads=cfg.threads,
                                          batch_size=teacher_batch_size, log=log, progress=progress, mixing=mixing)
            _log_teacher_scores(log_probs, samples, log, mixing)
            targets = write_teacher_targets(run, samples, log_probs, spec, key, mixing)
    result = train.finetune(cfg, log=log, progress=progress, stop_after_epoch=stop_after_epoch, soft_targets=targets)
    return _result(run, targets, result)


def _result(run: RunDir, targets, result) -> DistillResult:
    summary = (f"{run.root}\tepochs={result.epochs_run}\tval_loss={result.best_val_loss:.4f}\t"
               f"val_accuracy={result.best_val_accuracy:.4f}\tteacher_images={len(targets.ids)}\t"
               f"unlabeled={len(targets.unlabeled)}\t{result.stopped}")
    return DistillResult(run, len(targets.ids), len(targets.unlabeled), result, summary)




def unlabeled_samples(folders: Sequence[str | os.PathLike], dataset: Dataset) -> list[Sample]:
    """The images of ``folders`` (recursively) as unlabelled samples, each id its absolute path.

    The dataset's holdout (its val/ and test/ images, or the CSV's val and test rows) is refused: a student
    that trained on the teacher's view of them would score on what it was taught. Images already in train
    are left out (they have targets already)."""
    holdout = {s.path.resolve(): split for split in ("val", "test") for s in dataset.split(split)}
    train = {s.path.resolve() for s in dataset.split("train")}
    out: dict[Path, Sample] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise UserInputError(f"--unlabeled {folder}: no such folder; name a folder of images without labels")
        images = list_images(folder)
        if not images:
            raise UserInputError(f"--unlabeled {folder}: no images found in this folder")
        held = [p for p in images if p.resolve() in holdout]
        if held:
            raise UserInputError(f"--unlabeled {folder}: holds {len(held)} image(s) of the dataset's holdout "
                                 f"({holdout[held[0].resolve()]}: {held[0]}); the holdout is never trained on, not even "
                                 "unlabeled: name folders of other images")
        for p in images:
            if p.resolve() not in train:
                out.setdefault(p.resolve(), Sample(p, p.resolve().as_posix(), -1))
    return list(out.values())


def _readable(samples: list[Sample], log) -> list[Sample]:
    from zoo.data import check_images

    good, bad = check_images(samples)
    if bad:
        log(f"warning: skipped {len(bad)} unreadable image(s), e.g. {bad[0][0]}: {bad[0][1]}")
    return good


# ----------------------------------------------------------------------------- the teacher's outputs

def fold_masks(run: RunDir, samples: Sequence[Sample], fold_models: int, teacher: str) -> np.ndarray:
    """[N, K]: which of the member's K fold models teach each sample. ``oof``: a pool image its own fold's model (the
    one that did not train on it); an image outside the pool, and every image with ``all``: every fold model."""
    mask = np.ones((len(samples), fold_models), dtype=bool)
    record = read_folds(run.root) if fold_models > 1 else None
    if teacher == "oof" and record is not None:
        folds = record["folds"]
        for i, s in enumerate(samples):
            if s.id in folds:
                mask[i] = False
                mask[i, int(folds[s.id]) - 1] = True
    return mask


def teaching_groups(runs: Sequence[str | os.PathLike], samples: Sequence[Sample], teacher: str) -> list[bytes]:
    """Per sample, which fold models of every member teach it (``fold_masks``), as one key: images of one key may be
    mixed into one view (``finetune.views.mix_partners``) and their mix is still taught only by models that held
    out both (with ``oof``: images of the same fold; with ``all``: any two)."""
    masks = []
    for r in runs:
        run_dir = RunDir(r)
        masks.append(fold_masks(run_dir, samples, len(run_dir.fold_runs()) or 1, teacher))
    together = np.concatenate(masks, axis=1)
    return [row.tobytes() for row in together]


def view_mixing(runs: Sequence[str | os.PathLike], samples: Sequence[Sample], spec, teacher: str):
    """The mixed views' partners and weights (``finetune.views.ViewMixing``, partners as indices into ``samples``), None
    without ``spec.mix``: partners only among images the same fold models teach (``teaching_groups``)."""
    from finetune.views import mix_partners

    return mix_partners(spec, [s.id for s in samples], teaching_groups(runs, samples, teacher)) if spec.mix else None


def member_view_log_probs(run: str | os.PathLike, samples: Sequence[Sample], spec, teacher: str, hardware,
                          batch_size: int, log=None, progress: bool | None = None, mixing=None) -> np.ndarray:
    """One member's log-probabilities [N, V, C] of every view of every sample: the log of the mean probability of the
    fold models ``fold_masks`` picks (a cross-fit whose fold models share their backbone: one pass and K heads).
    ``mixing`` (``finetune.views.ViewMixing``, partners as indices into ``samples``): the views mixed with a partner."""
    from functools import lru_cache

    import torch

    from finetune.inference import load_run, shared_backbone
    from finetune.views import ViewRenderer, render_view
    from zoo.data import load_rgb

    run_dir = RunDir(run)
    model_runs = run_dir.fold_runs() or [run_dir]
    config = model_runs[0].read_config()
    k, c, n, v = len(model_runs), len(config["classes"]), len(samples), spec.count
    if teacher == "oof" and k == 1 and log is not None:
        log(f"warning: member {run_dir.root.name} is not cross-fitted: its targets for the images it trained on are not "
            "out of fold (cross-fit it with --folds for an out-of-fold teacher)")
    mask = fold_masks(run_dir, samples, k, teacher)
    renderer = ViewRenderer(config["data_config"], spec)
    shared = shared_backbone(model_runs, hardware.device)
    if shared is not None:  # [B, K, C] in one pass
        passes = [(lambda: shared[0].fold_logits, np.arange(n), list(range(k)))]
    else:  # one fold model at a time (K need not fit in memory together), on the rows it teaches
        def fold_pass(r):
            model = load_run(r.root, hardware.device)[0]
            return lambda x: model(x).float().unsqueeze(1)
        passes = [(lambda r=r: fold_pass(r), np.flatnonzero(mask[:, j]), [j]) for j, r in enumerate(model_runs)]
    log_probs = np.full((n, v, k, c), -np.inf, dtype=np.float32)
    total = sum(len(rows) for _, rows, _ in passes) * v
    per_batch = max(1, batch_size // v)
    image_of = lru_cache(maxsize=512)(lambda i: load_rgb(samples[i].path))  # partners come back often

    with progress_bar(total, f"teacher {run_dir.root.name}", unit="views", enabled=progress) as bar, torch.inference_mode():
        for load, rows, columns in passes:
            forward = load()
            for start in range(0, len(rows), per_batch):
                chunk = rows[start:start + per_batch]
                images = [render_view(renderer, image_of, lambda j: samples[j].id, i, view, mixing)
                          for i in chunk for view in range(v)]
                x = torch.stack(images).to(hardware.device)
                if hardware.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with hardware.autocast():
                    out = forward(x).float().log_softmax(-1).cpu().numpy().reshape(len(chunk), v, len(columns), c)
                log_probs[np.ix_(chunk, np.arange(v), columns)] = out
                bar.update(len(chunk) * v)
    log_probs[~np.broadcast_to(mask[:, None, :, None], log_probs.shape)] = -np.inf
    # The log of the mean probability over the teaching fold models: the others are -inf, which logaddexp ignores
    # (one teaching model: its own log-probability, exactly).
    return (np.logaddexp.reduce(log_probs, axis=2) - np.log(mask.sum(1))[:, None, None]).astype(np.float32)


def teacher_log_probs(ens: Ensemble, runs: Sequence[Path], samples: Sequence[Sample], spec, teacher: str, *,
                      device: str | None = None, threads: int | None = None, batch_size: int = 64, log=None,
                      progress: bool | None = None, mixing=None) -> np.ndarray:
    """The ensemble's log-probabilities [N, V, C] for every view of every sample (``runs``: its members' run
    directories, in ``ens.members`` order), with the file's temperatures, weights and combine rule. ``threads``:
    torch's CPU threads (default: the measured CPU budget, ``zoo.cpu``)."""
    from finetune.engine import resolve_hardware
    from zoo.cpu import apply_budget, cpu_budget

    hardware = resolve_hardware(device, None, None)
    apply_budget(cpu_budget(threads, 0, hardware.device.type))
    mixing = view_mixing(runs, samples, spec, teacher) if mixing is None else mixing
    members = [member_view_log_probs(r, samples, spec, teacher, hardware, batch_size, log, progress, mixing) for r in runs]
    return np.stack([ens.predict_log_proba([m[:, view] for m in members]) for view in range(spec.count)], 1).astype(np.float32)


def _log_teacher_scores(log_probs: np.ndarray, samples: Sequence[Sample], log, mixing=None) -> None:
    labels = np.array([s.label for s in samples])
    if (labels >= 0).any():  # log_loss_and_accuracy leaves the unlabelled rows out
        centre_loss, centre_accuracy = log_loss_and_accuracy(log_probs[:, 0], labels)
        view_labels = np.repeat(labels[:, None], log_probs.shape[1], 1)
        if mixing is not None:  # a mixed view has no one label to score against
            view_labels[mixing.partners >= 0] = -1
        all_views_loss, _ = log_loss_and_accuracy(log_probs.reshape(-1, log_probs.shape[-1]), view_labels.reshape(-1))
        log(f"teacher on the {int((labels >= 0).sum())} labelled training images: centre view log loss "
            f"{centre_loss:.4f}, accuracy {centre_accuracy:.4f}; all {'unmixed ' if mixing is not None else ''}views "
            f"log loss {all_views_loss:.4f}")


# ----------------------------------------------------------------------------- the cache in the run directory

def write_teacher_targets(run: RunDir, samples: Sequence[Sample], log_probs: np.ndarray, spec, key: dict[str, Any],
                          mixing=None):
    """Write the targets (and the mixed views' partners and weights) into ``run`` (atomically); return ``SoftTargets``."""
    from safetensors.numpy import save_file

    from finetune.views import SoftTargets

    unlabeled = [s for s in samples if s.label < 0]
    metadata = {"ids": json.dumps([s.id for s in samples]), "key": json.dumps(key, sort_keys=True),
                "unlabeled": json.dumps([[str(s.path), s.id] for s in unlabeled]), "format": "1"}
    tensors = {"log_probs": np.ascontiguousarray(log_probs, dtype=np.float32)}
    if mixing is not None:
        tensors.update(mix_partners=mixing.partners, mix_weights=mixing.weights)
    atomic.write_with(run.teacher_targets, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return SoftTargets([s.id for s in samples], log_probs, spec, unlabeled, mixing)


def read_teacher_targets(run: RunDir, key: dict[str, Any] | None = None):
    """The run's cached ``SoftTargets``; with ``key``: None when they were made for another teacher or views."""
    from safetensors import safe_open

    from finetune.views import SoftTargets, ViewMixing, ViewSpec

    path = run.teacher_targets
    if not path.is_file():
        raise UserInputError(f"{path}: missing; the student's teacher targets are gone: run `zoo distill` again into a new --out")
    with safe_open(str(path), "np") as f:
        metadata, log_probs = f.metadata(), f.get_tensor("log_probs")
        mixing = ViewMixing(f.get_tensor("mix_partners"), f.get_tensor("mix_weights")) if "mix_partners" in f.keys() else None
    saved = json.loads(metadata["key"])
    if key is not None and saved != json.loads(json.dumps(key, sort_keys=True)):
        return None
    unlabeled = [Sample(Path(p), sample_id, -1) for p, sample_id in json.loads(metadata["unlabeled"])]
    return SoftTargets(json.loads(metadata["ids"]), log_probs, ViewSpec(**saved["views_spec"]), unlabeled, mixing)
