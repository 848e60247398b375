"""``zoo run`` (the whole pipeline over a zoo of backbones, in one resumable command) and ``zoo demo``."""

from __future__ import annotations

import click
from click.core import ParameterSource

from zoo.cli.options import THREADS_HELP, config_options
from zoo.pipeline.launch import LAUNCHERS, LaunchOptions, parse_slurm_extra
from zoo.pipeline.leaderboard import LATENCY_BACKENDS

# FinetuneConfig fields that zoo run sets itself (or that its own options replace): not options of
# zoo run (removed from its parameters below), so they never reach ``given``.
_NOT_SHARED = ("resume", "fold", "val_from_train", "linear_probe", "probe_views", "pool")


@click.command("run")
@click.argument("data", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder for everything (re-run to continue)")
@click.option("--backbones", default=None, help="comma-separated timm model names, sharing the finetune options given here")
@click.option("--zoo", "zoo_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="zoo file (TOML): [[member]] tables with backbone, optional weights and name, and any finetune option")
@click.option("--max-latency", default=None, type=click.FloatRange(min=0), help="pick the best member subset within MS "
              "milliseconds per image (batch 64, this device)")
@click.option("--cv", default=5, show_default=True, type=click.IntRange(min=0), help="cross-validation folds of the ensemble fit")
@click.option("--latency-repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="timed forward passes per batch size (median)")
@click.option("--latency-backend", default="torch", show_default=True, type=click.Choice(list(LATENCY_BACKENDS)),
              help="what the latency columns time: " + "; ".join(f"{k}: {v}" for k, v in LATENCY_BACKENDS.items()))
@click.option("--time-limit", default=None, metavar="DURATION", help="training budget, e.g. 2h, 90m, 1h30m: epochs and "
              "members that would not end in it are not started (estimated from each member's first epoch); the ensemble is "
              "fitted on the members that finished and the report names the others")
@click.option("--launcher", default="sequential", show_default=True, type=click.Choice(list(LAUNCHERS)),
              help="how the members' folds are trained: " + "; ".join(f"{k}: {v}" for k, v in LAUNCHERS.items()))
@click.option("--jobs", default=None, type=click.IntRange(min=0), help="training jobs at once (local: processes, "
              "default 1; slurm: the array's parallelism, default no cap)")
@click.option("--gpus-per-job", default=None, type=click.IntRange(min=0), help="GPUs each job gets (default: 1 where "
              "there are GPUs, else 0)")
@click.option("--partition", default=None, help="Slurm partition of the jobs")
@click.option("--cpus-per-job", default=None, type=click.IntRange(min=1), help="Slurm: CPUs per job (--cpus-per-task)")
@click.option("--time-min", default=240, show_default=True, type=click.IntRange(min=1), help="Slurm: minutes per job; a job "
              "that reaches it (or is pre-empted) is requeued and continues from its resume state")
@click.option("--slurm-extra", multiple=True, metavar="KEY=VALUE", help="any other sbatch option, e.g. account=mylab "
              "(repeatable)")
@click.option("--wait/--no-wait", default=True, help="Slurm: wait for the jobs (default), or return once they are "
              "submitted; the same command later collects them and runs the rest")
@click.option("--distill", "distill_backbone", default=None, metavar="BACKBONE", help="after the ensemble, distil it into "
              "this timm model (zoo distill's defaults; a zoo file's [distill] table sets its weights and options): a "
              "\"student\" row in the leaderboard and report")
@config_options
@click.pass_context
def run_command(ctx, data, out, backbones, zoo_file, max_latency, cv, latency_repeats, latency_backend, time_limit, launcher,
                jobs, gpus_per_job, partition, cpus_per_job, time_min, slurm_extra, wait, distill_backbone, **options):
    """Fine-tune a zoo of backbones, correlate them, fit and score the ensemble, and report.

    \b
    zoo run data/ --out runs/zoo --zoo zoo.toml --folds 5
    zoo run data/ --out runs/zoo --backbones resnet18.a1_in1k,tf_efficientnet_lite0.in1k --epochs 6
    zoo run data/ --out runs/zoo --max-latency 20
    zoo run data/ --out runs/zoo --zoo zoo.toml --folds 5 --time-limit 2h --mlflow
    zoo run data/ --out runs/zoo --zoo zoo.toml --folds 5 --launcher local --jobs 8
    zoo run data/ --out runs/zoo --zoo zoo.toml --folds 5 --launcher slurm --partition gpu --gpus-per-job 1

    Each member is fine-tuned into OUT/members/NAME (with --folds K, cross-fitted); finished
    members are skipped and an interrupted one continues from its resume state, so re-running
    the command after Ctrl-C, a kill or adding a member does only the new work. Weights and
    member subsets are chosen on out-of-fold (--folds) or validation rows (taken from train/);
    the dataset's val/ (else test/) is the untouched holdout. Writes OUT/leaderboard.csv
    (parameters, ms per image at batch 1 and 64 on this device, accuracy, log loss, ECE,
    weight), OUT/pareto.csv, OUT/ensemble.json and OUT/report.html (self-contained).

    \b
    Finetune options given here apply to every member and win over the zoo file's. Without
    --backbones or --zoo a default zoo for the device is used (printed; weights from the
    Hugging Face hub; offline, give weights in a zoo file).
    """
    from zoo.pipeline.run import run_zoo
    from zoo.pipeline.zoo_file import parse_backbones, read_distill_table, read_zoo_file

    if backbones and zoo_file:
        raise click.UsageError("pass --backbones or --zoo, not both")
    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) is ParameterSource.COMMANDLINE}
    folds, fold_seed = given.pop("folds", None), given.pop("fold_seed", None)
    shared, members, distill = {}, None, None
    if zoo_file:
        if given.get("weights"):
            raise click.UsageError("--weights with --zoo: give each member its weights in the zoo file (weights = FILE)")
        members, shared = read_zoo_file(zoo_file)
        distill = read_distill_table(zoo_file)
    elif backbones:
        members = parse_backbones(backbones, given.pop("weights", None))
    elif given.get("weights"):
        raise click.UsageError("--weights needs --backbones NAME (the backbone those weights are for)")
    if distill_backbone:  # the command line names the student; the zoo file's [distill] table may still set the rest
        distill = {**(distill or {}), "backbone": distill_backbone}
    result = run_zoo(data, out, members, shared=shared, given=given, folds=folds, fold_seed=fold_seed, cv=cv,
                     max_latency=max_latency, latency_repeats=latency_repeats, latency_backend=latency_backend,
                     log=lambda m: click.echo(m, err=True), time_limit=time_limit, distill=distill,
                     launch=LaunchOptions(launcher, jobs if jobs is not None else (0 if launcher == "slurm" else 1),
                                          gpus_per_job, partition, cpus_per_job, time_min, parse_slurm_extra(slurm_extra), wait))
    if result.status == "submitted":
        click.echo(f"jobs submitted to Slurm; run the same command again to collect them and finish ({out})")
        return
    if result.status != "finished":
        raise click.ClickException(f"stopped before the end; run the same command again to continue ({out})")
    click.echo(result.summary)


run_command.params = [p for p in run_command.params if p.name not in _NOT_SHARED]


@click.command("demo")
@click.option("--out", default="zoo-demo", show_default=True, type=click.Path(file_okay=False), help="new folder for everything")
@click.option("--epochs", default=None, type=int, help="epochs per backbone (default: 8)")
@click.option("--threads", default=None, type=click.IntRange(min=1), help=THREADS_HELP)
def demo_command(out, epochs, threads):
    """Run `zoo run` on built-in data: three backbones, correlation, ensemble, report.

    Builds an image folder from scikit-learn's handwritten digits (no download),
    fine-tunes a ResNet, an EfficientNet and a ViT (small timm test models), measures
    how alike their predictions are, fits ensemble weights on validation predictions
    (taken from train/), scores everything on the untouched val/ and test/ splits,
    measures latency and writes the leaderboard and report.html to --out. Running it
    again into the same --out continues it (finished members are skipped).
    """
    from zoo.pipeline.demo import run_demo

    result = run_demo(out, epochs=epochs, threads=threads, log=lambda m: click.echo(m, err=True))
    click.echo(result.summary)
    click.echo(f"report: {result.report}")


COMMANDS = [run_command, demo_command]
