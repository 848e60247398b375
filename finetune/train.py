"""``finetune``: train one backbone on one dataset and write its run directory.

Read top to bottom: data, model, frozen stages and learning rates, optimizer and
schedule, then the epoch loop (train, evaluate, keep the best, save resume state,
stop early). Under ``torchrun`` every rank runs the same loop on its own shard of each
epoch (``finetune.distributed``) and only rank 0 writes files. SIGINT or SIGTERM stops
at the next step boundary, saves resume state and raises ``TrainingInterrupted`` carrying
130 or 143, the status the CLI exits with; ``--resume`` continues exactly. A loss that
turns NaN or infinite stops the run with one line and keeps the files of the last good
epoch.

Over 400 lines on purpose: ``_train`` keeps the run readable top to bottom in one function
(nanoGPT's layout), and the small helpers beside it (stop flag, resume decision, reductions
over ranks, the start-up lines) serve only that loop. Checkpoints live in
``finetune.checkpoints``, config.json in ``finetune.run_config``, the step in ``finetune.engine``.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune import checkpoints, distributed, loaders
from finetune.config import FinetuneConfig, check_resume_options
from finetune.distributed import Dist
from finetune.engine import (EpochProgress, Hardware, Trainer, TrainingDiverged, create_ema, keep_cpu_heap, log_loss_and_accuracy,
                             predict_logits, quiet_log, resolve_hardware, seed_everything, stderr_log)
from finetune.freeze import count_parameters, freeze_stages, frozen_group_count, set_train_mode
from finetune.lpft import init_head_from_probe
from finetune.optim import create_schedule, current_rates, prepare_training
from finetune.report import format_report, plot_metrics, write_metrics
from finetune.run_config import run_config, start_model
from finetune.views import SoftTargets, ViewDataset, ViewRenderer, cycling_views
from zoo import atomic
from zoo.cpu import CpuBudget, apply_budget, cpu_budget
from zoo.data import Dataset, read_dataset, read_listing
from zoo.errors import Interrupted, UserInputError
from zoo.exclude import without_excluded
from zoo.folds import fold_dataset
from zoo.progress import progress
from zoo.rundir import RunDir, check_out_folder, hold_folder, is_finetune_run
from zoo.timelimit import TimeBudget
from zoo.tracking import Tracker, Tracking


@dataclass
class FinetuneResult:
    run: RunDir
    best_epoch: int
    best_val_loss: float
    best_val_accuracy: float
    epochs_run: int
    stopped: str  # finished | early-stopped | time-limit (an epoch would not have ended in time) | interrupted
    rank: int = 0  # under torchrun: this process's rank (only rank 0 should print the result)


class TrainingInterrupted(Interrupted):
    """SIGINT or SIGTERM stopped ``finetune`` at a step boundary, after its resume state was saved.

    An ordinary exception: ``exit_status`` (``zoo.errors.Interrupted``) is the status shells give
    a process stopped by that signal, 130 for SIGINT and 143 for SIGTERM, and the CLI exits with
    it so that a script or scheduler sees the run did not finish. ``--resume`` continues it.
    ``result`` holds what the run had reached; the run has already logged how to continue.
    """

    def __init__(self, result: FinetuneResult, signal_name: str):
        super().__init__(128 + int(signal.Signals[signal_name]),
                         f"{signal_name}: training of {result.run.root} stopped; resume state saved")
        self.result = result
        self.signal_name = signal_name


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it at step boundaries and saves resume state.

    A second SIGINT (Ctrl-C pressed again) quits at once with ``KeyboardInterrupt``;
    the files on disk stay whole because every write is atomic.
    """

    def __init__(self):
        self.signal_name: str | None = None

    def __call__(self) -> bool:
        return self.signal_name is not None

    @property
    def signum(self) -> int:
        return int(signal.Signals[self.signal_name]) if self.signal_name else 0

    def install(self, log=None):
        """Handle SIGINT/SIGTERM; off the main thread Python allows no handler, so say once that a stop
        will not save resume state (``log``)."""
        previous = {}

        def handler(signum, frame):
            if self.signal_name is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal_name = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                if log is not None:
                    log("note: finetune runs outside the main thread, where no signal handler can be installed: Ctrl-C or "
                        "SIGTERM will stop it without saving resume state (last.pt is still written after each epoch)")
                break
        return previous

    @staticmethod
    def uninstall(previous):
        for sig, h in previous.items():
            signal.signal(sig, h)


def _read_data(cfg: FinetuneConfig, log, dist: Dist, budget: CpuBudget, show_progress: bool | None = None) -> Dataset:
    """Read the dataset and decode every image once; under torchrun each rank checks its share."""
    if cfg.folds:  # one fold model of a cross-fit: folds are assigned on the listed ids, before any image is read
        dataset = fold_dataset(read_listing(cfg.data, allow_outside_root=cfg.allow_outside_root), cfg.folds,
                               cfg.fold_seed, cfg.fold, cfg.pool, cfg.exclude)
    else:
        dataset = without_excluded(read_dataset(cfg.data, val_fraction=cfg.val_fraction, val_from_train=cfg.val_from_train,
                                                seed=cfg.seed, allow_outside_root=cfg.allow_outside_root), cfg.exclude)
    for warning in dataset.warnings:
        log(f"warning: {warning}")
    skipped = []
    for split in list(dataset.splits):
        samples = dataset.splits[split]
        shard = samples[dist.rank::dist.world_size]
        with progress(len(shard), f"checking {split} images", unit="images", enabled=show_progress) as bar:
            _, bad = loaders.check_images(cfg, dataset.root, shard, workers=budget.share, progress=lambda done, _: bar.set(done))
        why = dict(b for part in dist.gather(bad) for b in part)
        dataset.splits[split] = [s for s in samples if s.id not in why]
        skipped += [(split, s.id, why[s.id]) for s in samples if s.id in why]
    dataset.skipped = [(sid, f"{split}: {why}") for split, sid, why in skipped]
    if skipped:
        log(f"warning: skipped {len(skipped)} unreadable image(s) (listed in skipped_images.txt), e.g. {skipped[0][1]}: {skipped[0][2]}")
    for split in ("train", "val"):
        if not dataset.split(split):
            raise UserInputError(f"{cfg.data}: no readable {split} images left after skipping {len(skipped)} unreadable ones")
    empty = [c for c, n in zip(dataset.classes, dataset.class_counts("train")) if n == 0]
    if empty:
        raise UserInputError(f"{cfg.data}: class(es) {empty} have no readable train images; add images or remove the class")
    return dataset


def _rate_table(model, groups, frozen: int, rates, lr: float) -> str:
    rows = [("group", "stage", "params", "state", "peak lr")]
    for g, r in zip(groups, rates):
        state = "frozen" if g.index < frozen else "train"
        rows.append((str(g.index), g.name, f"{count_parameters(model, g.param_names):,}", state, f"{lr * r.lr_scale:.3g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  " + "  ".join(c.ljust(w) if i in (1, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def _epoch_progress(epoch: int, epochs: int, batches: int, enabled: bool | None):
    """The epoch's progress (``zoo.progress``) and the callback ``Trainer.train_epoch`` reports to."""
    bar = progress(batches, f"epoch {epoch + 1}/{epochs}", unit="batches", enabled=enabled)
    return bar, lambda done, total, loss, ips: bar.set(done, f"loss {loss:.4f}, {ips:.1f} img/s")


def finetune(cfg: FinetuneConfig, *, log=stderr_log, progress: bool | None = None,
             stop_after_epoch: int | None = None, tracking: Tracking | None = None,
             time_budget: TimeBudget | None = None, soft_targets: SoftTargets | None = None) -> FinetuneResult:
    """Fine-tune ``cfg.backbone`` on ``cfg.data`` and write the run directory ``cfg.out``.

    Under torchrun (``RANK``/``WORLD_SIZE`` in the environment) every process runs this:
    each trains on its own shard of every epoch in DistributedDataParallel, and only
    rank 0 writes files, logs and shows the progress bar.

    SIGINT or SIGTERM stops the run at the next step boundary, saves its resume state and
    raises :class:`TrainingInterrupted` (``exit_status`` 130 or 143); ``cfg.resume`` continues
    it exactly. A loss that becomes NaN or infinite stops the run with a
    ``UserInputError``; the files of the last good epoch are kept. ``stop_after_epoch``
    ends the session after that many epochs (resume state saved) and returns, as if it
    had been interrupted there.

    ``tracking`` (default: ``--mlflow`` as ``cfg`` says, nested under nothing) reports every epoch to
    TensorBoard and MLflow (``zoo.tracking``). ``time_budget``: an epoch that would not end within it
    (estimated from the first epoch) is not started; the run ends with its best epoch (``time-limit``).

    ``soft_targets`` (with ``cfg.distill``: alpha, temperature) makes the run a distillation's student: it trains on
    its train images and ``soft_targets.unlabeled``, each epoch on the views ``finetune.views.cycling_views`` picks,
    with ``distillation_loss`` against the teacher's output for that very view, and keeps its last epoch (a fixed
    schedule: nothing is chosen on the validation images, which are only scored).
    """
    run = RunDir(check_out_folder(cfg.out, "a zoo finetune run", is_finetune_run))
    if not cfg.resume:
        cfg.validate()
    with hold_folder(run.root):  # decided under the lock: a second process on this --out refuses
        cfg, resume_state, note = _start_or_resume(cfg, run)
        cfg.validate()
        dist = distributed.setup(cfg.device)
        try:
            if not dist.is_main:
                log = quiet_log
            if note:
                log(note)
            for warning in cfg.warnings():
                log(warning)
            return _train(cfg, run, resume_state, dist, log=log, progress=progress, stop_after_epoch=stop_after_epoch,
                          tracking=tracking or Tracking(mlflow=cfg.mlflow), time_budget=time_budget, soft_targets=soft_targets)
        finally:
            dist.cleanup()


def _start_or_resume(cfg: FinetuneConfig, run: RunDir) -> tuple[FinetuneConfig, dict | None, str | None]:
    """The config to run and the resume state to start from (None: a fresh run).

    Checked before any process writes anything (under torchrun, before the ranks meet),
    so every rank takes the same decision.
    """
    if cfg.resume:
        if not run.resume_state.is_file():
            raise UserInputError(f"{run.resume_state}: nothing to resume (no resume state: the run in {run.root} stopped "
                                 "before its first save, or --out names another folder); start it again without --resume")
        saved = FinetuneConfig.from_dict(run.read_config()["options"])
        check_resume_options(cfg, saved, run.root)
        state = checkpoints.load_resume_state(run)
        saved.resume = True
        return saved, state, None
    if run.is_cross_fit() and not cfg.folds:
        raise UserInputError(f"{run.root}: holds a cross-fit (zoo finetune --folds); continue it with "
                             f"`zoo finetune --resume --out {run.root}`, or choose another --out")
    if run.is_run():
        if run.resume_state.is_file() or run.model.is_file():
            raise UserInputError(f"{run.root}: already holds a run; pass --resume to continue it, or choose another --out")
        return cfg, None, f"{run.root}: holds only the config of a run that stopped before its first save; starting it again"
    return cfg, None, None


def _train(cfg: FinetuneConfig, run: RunDir, resume_state: dict | None, dist: Dist, *, log, progress: bool | None,
           stop_after_epoch: int | None, tracking: Tracking, time_budget: TimeBudget | None,
           soft_targets: SoftTargets | None = None) -> FinetuneResult:
    world = dist.world_size
    if bool(cfg.distill) != (soft_targets is not None):
        raise UserInputError(f"{run.root}: a distillation's student trains on its teacher's targets: continue it with "
                             f"`zoo distill --resume --out {run.root}`" if cfg.distill else
                             "soft targets were given to a run without cfg.distill (alpha, temperature)")
    check_distributed_options(cfg, dist)
    hardware = resolve_hardware(str(dist.device) if dist.enabled else cfg.device, cfg.amp, cfg.channels_last)
    if hardware.device.type == "cpu":
        keep_cpu_heap()
    # Measured per call (each fold of a cross-fit measures again): threads that outnumber the free cores busy-wait.
    # A resumed run keeps the threads and workers it started with: they decide its float sums and augmentation
    # draws, so another split would not continue it exactly.
    recorded = run.read_config().get("cpu_budget", {}) if resume_state is not None else {}
    budget = cpu_budget(cfg.threads if cfg.threads is not None else recorded.get("threads"),
                        cfg.workers if cfg.workers is not None else recorded.get("workers"), hardware.device.type)
    apply_budget(budget)
    show_progress = progress if dist.is_main else False  # None: on unless ZOO_PROGRESS=0 (zoo.progress)
    lr = cfg.lr * world if cfg.scale_lr else cfg.lr  # linear scaling rule: the batch of a step is `world` times larger
    effective_batch = cfg.batch_size * cfg.accum_steps * world

    # Data.
    dataset = _read_data(cfg, log, dist, budget, show_progress)
    classes, num_classes = dataset.classes, len(dataset.classes)
    train_counts = dataset.class_counts("train")
    train_samples = dataset.split("train") + (soft_targets.unlabeled if soft_targets is not None else [])
    teacher_rows = soft_targets.rows_for(train_samples) if soft_targets is not None else None
    view_mixing = soft_targets.mixing_for(train_samples) if soft_targets is not None else None
    log(f"data: {len(dataset.split('train'))} train, {len(dataset.split('val'))} val"
        f"{' (split from train)' if dataset.val_source == 'from-train' else ''}, {num_classes} classes"
        + (f"; {len(dataset.excluded)} left out (--exclude {cfg.exclude})" if dataset.excluded else "")
        + (f"; {len(soft_targets.unlabeled)} unlabeled" if soft_targets is not None and soft_targets.unlabeled else ""))

    # Model, its stage groups and its data config.
    model, _, start_hash, dcfg = start_model(cfg, num_classes)
    if cfg.head_init == "probe" and resume_state is None:  # LP-FT; after start_hash, so every fold's start hash agrees
        log(init_head_from_probe(model, dataset.split("train"), dcfg, cfg, hardware, budget.workers))
    if cfg.sync_bn and dist.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same tensor names: checkpoints stay plain timm
    elif cfg.sync_bn:
        log("note: --sync-bn has no effect in a single process")

    # Frozen stages, differential learning rates, optimizer, schedule.
    setup = prepare_training(model, cfg, hardware, lr)
    groups, frozen, frozen_norms, rates, optimizer = setup.groups, setup.frozen, setup.frozen_norms, setup.rates, setup.optimizer
    for warning in setup.warnings:
        log(f"warning: {warning}")
    workers = budget.workers
    pin = hardware.device.type == "cuda"
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=num_classes)
    train_tf = loaders.train_transform(dcfg, auto_augment=cfg.auto_augment, crop_scale=cfg.crop_scale, hflip=cfg.hflip)
    eval_tf = loaders.eval_transform(dcfg)
    images = loaders.image_sources(cfg.cache, dataset.root, dcfg, cfg.crop_scale, workers=budget.share)  # --cache
    train_images = images.train(dataset.split("train"))  # once: filling the cache checks every file

    def make_train_loader(generator, epoch):
        views = None
        if soft_targets is not None:  # the views the teacher saw, each with the teacher's output for it
            views = ViewDataset(train_samples, ViewRenderer(dcfg, soft_targets.spec),
                                cycling_views(soft_targets.spec.count, epoch), teacher_rows, mixing=view_mixing)
        return loaders.train_loader(train_samples, train_tf, batch_size=cfg.batch_size, workers=workers,
                                    generator=generator, num_classes=num_classes, balanced=cfg.balance == "sampler",
                                    drop_last=mixup is not None, pin_memory=pin,
                                    shard=(dist.rank, world) if dist.enabled else None, seed=cfg.seed, epoch=epoch,
                                    images=train_images, dataset=views)

    # Validation is split across ranks (rank r takes samples r, r+W, ...) and gathered, so every rank
    # sees the same scores and takes the same best-epoch and early-stopping decisions.
    val_samples = dataset.split("val")
    val_shard = val_samples[dist.rank::world]
    val_loader = loaders.eval_loader(val_shard, eval_tf, batch_size=cfg.batch_size * 2, workers=workers, pin_memory=pin,
                                     images=images.eval(val_shard))
    updates_per_epoch = -(-len(make_train_loader(torch.Generator(), 0)) // cfg.accum_steps)
    scheduler = create_schedule(optimizer, cfg.schedule, lr=lr, epochs=cfg.epochs, updates_per_epoch=updates_per_epoch,
                                warmup_epochs=cfg.warmup_epochs, min_lr_ratio=cfg.min_lr_ratio, restarts=cfg.restarts)
    ema = create_ema(model, cfg.ema_decay) if cfg.ema else None  # after freezing: it pairs tensors by position
    trainer = Trainer(model, optimizer, scheduler, hardware, num_classes, label_smoothing=cfg.label_smoothing,
                      class_weights=loaders.class_loss_weights(train_counts).to(hardware.device) if cfg.balance == "loss" else None,
                      mixup=mixup, accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad, ema=ema,
                      sync_flags=dist.max if dist.enabled else None,
                      distill=(cfg.distill["alpha"], cfg.distill["temperature"]) if cfg.distill else None)

    # Resume state, or a fresh run whose config is written before step 0.
    history: list[dict] = []
    best = {"epoch": -1, "val_loss": float("inf"), "val_accuracy": -1.0}
    start_epoch, bad_epochs, partial, last_saved = 0, 0, None, None
    if resume_state is not None:
        checkpoints.restore(resume_state, model, optimizer, trainer, ema)
        start_epoch, bad_epochs = resume_state["epoch"], resume_state["bad_epochs"]
        history, best = list(resume_state["history"]), dict(resume_state["best"])
        partial = _partial_for_this_rank(resume_state, dist, log)
        last_saved = f"epoch {start_epoch + 1}, batch {partial.batches}" if partial else f"after epoch {start_epoch}"
        log(f"resuming {run.root} at epoch {start_epoch + 1}" + (f", batch {partial.batches + 1}" if partial else ""))
    elif dist.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        atomic.write_json(run.config, run_config(cfg, dataset, dcfg, model, groups, rates, start_hash=start_hash,
                                                 hardware=hardware, dist=dist, lr=lr, updates_per_epoch=updates_per_epoch,
                                                 budget=budget))
        atomic.write_json(run.splits, {s: [x.id for x in v] for s, v in dataset.splits.items() if s in ("train", "val")})
        if dataset.skipped:
            atomic.write_text(run.skipped_images, "".join(f"{sid}\t{why}\n" for sid, why in dataset.skipped))
    log(f"{cfg.backbone}: {len(groups)} stage groups, first {frozen} frozen; head lr {lr:g}, layer decay "
        f"{cfg.layer_decay:g}, backbone x{cfg.backbone_lr_mult:g}; {cfg.optimizer}, {cfg.schedule}; {hardware.describe()}")
    log(_batch_and_rate_line(cfg, world, lr, effective_batch, dist))
    if cfg.snapshots:
        log(f"snapshots: {cfg.restarts + 1} cosine cycles of {cfg.cycle_epochs()} epoch(s) after warmup, one snapshot at the end "
            f"of each; early stopping is off so that no cycle is cut short")
    log(budget.describe())
    log(_rate_table(model, groups, frozen, rates, lr))

    # The epoch loop, reported to TensorBoard / MLflow by rank 0.
    tracker = tracking.open(run, run_name(run), cfg.to_dict(), resume_step=start_epoch if resume_state else None) \
        if dist.is_main else Tracker()
    stop = StopFlag()
    previous_handlers = stop.install(log)
    status, epoch, wrapped_for = "finished", start_epoch, None
    eval_model = ema.module if ema is not None else model
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if time_budget is not None and epoch > start_epoch and dist.max([int(not time_budget.fits_epoch())])[0]:
                log(f"time limit: epoch {epoch + 1} would not end in time ({time_budget.describe()}); keeping the best epoch")
                status = "time-limit"
                break
            epoch_start = time_budget.clock() if time_budget is not None else 0.0
            now_frozen = frozen_group_count(cfg.freeze, cfg.unfreeze_at, epoch, len(groups))
            if now_frozen != frozen:
                # The newly unfrozen group gets no warmup of its own: it trains at once at the scheduled rate for its
                # depth, the smallest of the trained groups (layer decay), and past --warmup-epochs that rate is
                # already decaying. A per-group warmup would need each group's unfreeze step in the schedule and in
                # the resume state; a loss jump after unfreezing calls for a lower --backbone-lr-mult instead.
                frozen = now_frozen
                frozen_norms = freeze_stages(model, groups, frozen)
                log(f"epoch {epoch + 1}: unfreezing; first {frozen} group(s) stay frozen")
            if wrapped_for != frozen:
                # DDP registers the parameters that train when it is built: wrap again when that set
                # changes, after dropping the old wrapper (and its gradient hooks).
                trainer.model = model
                trainer.model = torch.compile(dist.wrap(model)) if cfg.compile else dist.wrap(model)
                wrapped_for = frozen
            generator = seed_everything(cfg.seed, epoch, dist.rank)
            set_train_mode(trainer.model, frozen_norms)
            train_loader = make_train_loader(generator, epoch)
            bar, update = _epoch_progress(epoch, cfg.epochs, len(train_loader), show_progress)
            with bar:
                stats = trainer.train_epoch(train_loader, progress=update, stop_requested=stop, resume_from=partial)
            partial = None
            if stats.stopped_at is not None:
                partials = dist.gather_state(vars(stats.stopped_at))
                if dist.is_main:
                    checkpoints.save_resume(run, model, optimizer, trainer, ema, epoch, bad_epochs, history, best, partials, world)
                _interrupted(run, best, history, dist, stop, log, f"at epoch {epoch + 1}, batch {stats.stopped_at.batches}")
            train = _reduce_epoch(stats, dist)
            dist.broadcast_buffers(model)
            if ema is not None:
                dist.broadcast_buffers(ema.module)
            logits, labels = _evaluate(eval_model, val_loader, val_shard, hardware, num_classes, dist)
            val_loss, val_acc = log_loss_and_accuracy(logits, labels)
            row = {"epoch": epoch + 1, "train_loss": train["loss"], "train_accuracy": train["accuracy"], "val_loss": val_loss,
                   "val_accuracy": val_acc, "seconds": round(stats.seconds, 3),
                   "images_per_second": round(train["images"] / stats.seconds, 2) if stats.seconds > 0 else float("nan"),
                   **{f"lr/{k}": v for k, v in current_rates(optimizer).items()},
                   "train_images": train["train_images"], "shard_overlap": train["shard_overlap"]}
            if train["shard_overlap"]:
                log(f"warning: {train['shard_overlap']} train image(s) were trained on by more than one process this epoch")
            history.append(row)
            tracker.log_epoch(epoch + 1, row)
            improved = True if cfg.distill else (val_loss < best["val_loss"]) if cfg.monitor == "loss" else \
                (val_acc > best["val_accuracy"] or (val_acc == best["val_accuracy"] and val_loss < best["val_loss"]))
            if improved:
                best, bad_epochs = {"epoch": epoch + 1, "val_loss": val_loss, "val_accuracy": val_acc}, 0
                if dist.is_main:
                    checkpoints.save_best(run, cfg, eval_model, classes, dataset, logits, labels, epoch + 1)
            else:
                bad_epochs += 1
            snapshot = cfg.snapshot_at(epoch + 1)
            if snapshot and dist.is_main:  # before the resume state: a kill in between redoes the epoch and this save
                checkpoints.save_snapshot(run, cfg, eval_model, classes, dataset, logits, labels, epoch + 1, snapshot,
                                          val_loss, val_acc)
                log(f"epoch {epoch + 1}: end of cosine cycle {snapshot}/{cfg.restarts + 1}; snapshot -> {run.snapshot(snapshot).root}")
            if dist.is_main:
                checkpoints.save_resume(run, model, optimizer, trainer, ema, epoch + 1, bad_epochs, history, best, None, world)
                write_metrics(run.metrics_csv, history)
                plot_metrics(run.metrics_png, history, f"{cfg.backbone} on {Path(cfg.data).name}")
            last_saved = f"after epoch {epoch + 1}"
            if time_budget is not None:
                time_budget.measured(time_budget.clock() - epoch_start)
            log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train['loss']:.4f} acc {train['accuracy']:.3f} | val loss "
                f"{val_loss:.4f} acc {val_acc:.3f}{' *' if improved else ''} | {stats.seconds:.1f}s, "
                f"{row['images_per_second']:.1f} img/s")
            # With snapshots every cycle is run to its end: each one's last epoch is a member.
            if cfg.patience and not cfg.snapshots and bad_epochs >= cfg.patience and epoch + 1 < cfg.epochs:
                log(f"early stop: no improvement in val {cfg.monitor} for {bad_epochs} epochs")
                status = "early-stopped"
                break
            if dist.max([stop.signum])[0] and epoch + 1 < cfg.epochs:  # collective: all ranks stop after the same epoch
                _interrupted(run, best, history, dist, stop, log, f"after epoch {epoch + 1}")
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < cfg.epochs:
                status = "interrupted"
                break
    except TrainingDiverged as e:
        kept = ([f"model.safetensors: best epoch {best['epoch']}"] if best["epoch"] > 0 else []) + \
            ([f"last.pt: {last_saved}"] if last_saved else [])
        fix = f"a lower --lr (this one used {lr:g}) or --clip-grad 1.0"
        if kept:
            raise UserInputError(f"{run.root}: {e} in epoch {epoch + 1}; the last good checkpoint is kept "
                                 f"({'; '.join(kept)}). Start a new run (another --out) with {fix}") from None
        raise UserInputError(f"{run.root}: {e} in epoch {epoch + 1}, before anything was saved. Start again with {fix}") from None
    finally:
        StopFlag.uninstall(previous_handlers)
        if sys.exc_info()[1] is not None:
            tracker.close(sys.exc_info()[1])

    if best["epoch"] > 0 and status != "interrupted" and dist.is_main:
        report = json.loads(run.report.read_text())
        log(format_report(report, classes))
        log(f"best epoch {best['epoch']}: val loss {best['val_loss']:.4f}, val accuracy {best['val_accuracy']:.4f} -> {run.root}")
        atomic.write_json(run.result, {"status": status, "best_epoch": best["epoch"], "val_loss": best["val_loss"],
                                       "val_accuracy": best["val_accuracy"], "epochs_run": len(history)})
        tracker.log_artifacts([run.config, run.metrics_csv, run.metrics_png, run.report])
    tracker.close(stopped=status == "interrupted")
    dist.barrier()  # the others wait until rank 0 has written the last files
    return _result(run, best, history, status, dist.rank)


def run_name(run: RunDir) -> str:
    """A run's name in MLflow: its folder, with the member's for a fold or snapshot (``lite0/fold-2``)."""
    return f"{run.root.parent.name}/{run.root.name}" if run.root.name.startswith(("fold-", "snapshot-")) else run.root.name


def _interrupted(run: RunDir, best: dict, history: list, dist: Dist, stop: StopFlag, log, where: str):
    """After a signal, once the resume state is saved: say how to continue, and raise ``TrainingInterrupted``."""
    signal_name = signal.Signals(dist.max([stop.signum])[0] or signal.SIGTERM).name  # some rank got it
    log(f"{signal_name}: stopped {where}; resume state saved. Continue with: zoo finetune --resume --out {run.root}")
    dist.barrier()  # no rank exits (and makes torchrun stop the others) before rank 0 has saved
    raise TrainingInterrupted(_result(run, best, history, "interrupted", dist.rank), signal_name)


def check_distributed_options(cfg: FinetuneConfig, dist: Dist) -> None:
    """Refuse options that cannot work with this many processes, in one line each."""
    if dist.world_size > 1 and cfg.balance == "sampler":
        raise UserInputError(f"--balance sampler does not work with torchrun ({dist.world_size} processes): its weighted draws "
                             "with replacement cannot be split into disjoint shards; use --balance loss")
    if cfg.sync_bn and dist.enabled and dist.device.type != "cuda":
        raise UserInputError("--sync-bn needs CUDA (torch's SyncBatchNorm runs on GPUs only); leave it out on the CPU")


def _result(run: RunDir, best: dict, history: list, status: str, rank: int) -> FinetuneResult:
    return FinetuneResult(run, best["epoch"], best["val_loss"], best["val_accuracy"], len(history), status, rank)


def _batch_and_rate_line(cfg: FinetuneConfig, world: int, lr: float, effective_batch: int, dist: Dist) -> str:
    procs = f" x {world} processes" if dist.enabled else ""
    line = (f"{dist.describe()}: effective batch size {effective_batch} ({cfg.batch_size} per step"
            f"{f' x {cfg.accum_steps} accumulated' if cfg.accum_steps > 1 else ''}{procs}); head lr {lr:g}")
    if cfg.scale_lr and dist.enabled:
        line += f" (--lr {cfg.lr:g} x {world} processes, --scale-lr)"
    elif world > 1:
        line += " (as given; --scale-lr multiplies it by the number of processes)"
    return line


def _partial_for_this_rank(state: dict, dist: Dist, log) -> EpochProgress | None:
    """This rank's progress through the interrupted epoch, or None to start the epoch from its first batch."""
    saved_world = int(state.get("world_size", 1))
    partials = state.get("partials") or ([state["partial"]] if state.get("partial") else [])
    if saved_world != dist.world_size:
        log(f"warning: the run was saved by {saved_world} process(es) and resumes with {dist.world_size}; data order and "
            "schedule differ from an unbroken run" + (", and the interrupted epoch starts again from its first batch" if partials else ""))
        return None
    return EpochProgress(**partials[dist.rank]) if partials else None


def _reduce_epoch(stats, dist: Dist) -> dict:
    """Train loss and accuracy over all ranks, the images trained on, and how many more than one rank saw."""
    loss_sum, correct, seen, images = dist.sum([stats.loss_sum, stats.correct, stats.seen, stats.images])
    per_rank = dist.gather(np.asarray(stats.indices, dtype=np.int64))
    return {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1), "images": images,
            "train_images": sum(len(r) for r in per_rank), "shard_overlap": distributed.shard_overlap(per_rank)}


def _evaluate(model, loader, shard, hardware, num_classes: int, dist: Dist):
    """Validation logits and labels of every sample, in the dataset's order, on every rank."""
    if shard:
        logits, labels = predict_logits(model, loader, hardware)
    else:  # more ranks than validation images
        logits, labels = np.zeros((0, num_classes), np.float32), np.zeros((0,), np.int64)
    if not dist.enabled:
        return logits, labels
    parts = dist.gather((logits, labels))
    return distributed.interleave([p[0] for p in parts]), distributed.interleave([p[1] for p in parts])


__all__ = ["finetune", "FinetuneResult", "TrainingInterrupted", "Hardware"]
