"""``zoo correlate`` and ``zoo ensemble fit|predict``: thin commands over the ``ensemble`` package.

Nothing here imports torch: only ``zoo ensemble predict|score --data`` does, inside
``zoo.pipeline.member_inference``, when it runs the members on images.
"""

from __future__ import annotations

import click

from ensemble.combine import COMBINE_RULES
from ensemble.diversity import PAIRWISE_MEASURES
from ensemble.metrics import SEARCHABLE_METRICS
from ensemble.weights import WEIGHT_SEARCHES
from zoo.rundir import check_out_file, check_out_folder


def _err(message: str) -> None:
    click.echo(message, err=True)


@click.command("correlate")
@click.argument("sources", nargs=-1, required=True, metavar="RUN_OR_PREDFILE...")
@click.option("--split", default="auto", show_default=True,
              help="Which predictions to read from a run directory: auto = oof (out-of-fold) when every run is cross-fitted, else val.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for members.csv, pairs.csv, matrix_<measure>.csv, correlation.json and heatmap.png.")
@click.option("--measure", type=click.Choice(list(PAIRWISE_MEASURES)), default="prob_corr", show_default=True,
              help="Which pairwise measure to print as a matrix (--out writes them all).")
@click.option("-k", "--subset-size", type=click.IntRange(min=1), default=3, show_default=True,
              help="Size of the suggested diverse subset.")
def correlate_command(sources, split, out, measure, subset_size):
    """Measure how alike members' predictions are, and suggest a diverse subset.

    Reads run directories (their validation predictions) or prediction files, aligns them
    by sample id, and prints each member's accuracy, log loss and calibration error, a
    matrix of one pairwise measure, the Kuncheva-Whitaker kappa of the set and a greedy
    subset of strong, complementary members.

    \b
    Pairwise measures (--measure):
      prob_corr     correlation of predicted probabilities (1 = same predictions)
      correct_corr  correlation of right/wrong (1 = wrong on the same samples)
      disagreement  fraction of samples with different predicted classes
      double_fault  fraction of samples both get wrong
      yule_q        Yule's Q of right/wrong (0 = independent errors)
      cohen_kappa   chance-corrected agreement of predicted classes

    \b
    zoo correlate runs/*
    zoo correlate runs/* --out reports/diversity --measure double_fault -k 4
    """
    from ensemble.diversity import correlate, write_correlation
    from ensemble.predict import load_prediction_sources
    from ensemble.report import format_correlation

    if len(sources) < 2:
        raise click.UsageError(f"need at least 2 runs or prediction files to compare, got {len(sources)}")
    if out is not None:
        check_out_folder(out, "an earlier `zoo correlate --out`", lambda folder: (folder / "correlation.json").is_file())
    report = correlate(load_prediction_sources(sources, split), k=subset_size)
    click.echo(format_correlation(report, measure))
    for note in report.notes:
        _err(f"note: {note}")
    if out is not None:
        written = write_correlation(report, out)
        _err(f"wrote {', '.join(p.name for p in written)} to {out}")


@click.group("ensemble")
def ensemble_group():
    """Fit a weighted ensemble on validation predictions, and apply it.

    \b
    zoo ensemble fit runs/* --out ens.json
    zoo ensemble predict ens.json --data new_images/ --out preds.csv
    """


@ensemble_group.command("fit")
@click.argument("sources", nargs=-1, required=True, metavar="RUN_OR_PREDFILE...")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The ensemble file to write (JSON).")
@click.option("--method", type=click.Choice(list(WEIGHT_SEARCHES)), default="slsqp", show_default=True,
              help="slsqp: optimal log-loss weights; greedy: Caruana ensemble selection; random: Dirichlet search; "
                   "stacking: logistic regression on the members' log-probabilities.")
@click.option("--metric", type=click.Choice(list(SEARCHABLE_METRICS)), default="log_loss", show_default=True,
              help="What the weights are chosen for (greedy and random can target any; slsqp and stacking: log_loss).")
@click.option("--combine", type=click.Choice(list(COMBINE_RULES)), default="arithmetic", show_default=True,
              help="arithmetic: weighted mean of probabilities; geometric: weighted mean of log-probabilities.")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True,
              help="In stages, on validation log loss: a temperature per member, then the weights on the calibrated "
                   "members, then one temperature for the blend with the weights fixed.")
@click.option("--cv", type=click.IntRange(min=0), default=5, show_default=True,
              help="Folds for the held-out scores (0: none). The whole fit, temperatures included, is repeated per fold.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the folds, bags and random search.")
@click.option("--split", default="auto", show_default=True,
              help="Which predictions to read from a run directory: auto = oof (out-of-fold) when every run is cross-fitted, else val.")
@click.option("--iterations", type=click.IntRange(min=0), default=None,
              help="greedy: selection steps (default 100); random: samples (default 1000).")
@click.option("--init", default=None, help="greedy: start from the N best members, or 'auto' (default) to choose N.")
@click.option("--use-best/--keep-last", default=None,
              help="greedy: keep the best prefix of the selection path (default) or its last step.")
@click.option("--bags", type=click.IntRange(min=0), default=None,
              help="greedy: bagged selection over this many random member subsets (default 0: off).")
@click.option("--bag-fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="greedy: fraction of the members in each bag (default 0.5).")
@click.option("--stacking-c", "stacking_c", type=click.FloatRange(0, min_open=True), default=None,
              help="stacking: inverse L2 regularisation strength (default: chosen by an inner 3-fold CV, 0.001..1).")
def fit_command(sources, out, method, metric, combine, calibrate, cv, seed, split, iterations, init, use_best, bags,
                bag_fraction, stacking_c):
    """Search ensemble weights on validation predictions and write an ensemble file.

    Members are run directories (their validation predictions) or prediction files,
    aligned by sample id. The report compares the ensemble with the best single member
    and the equal-weight average, in-sample and cross-validated: only the cross-validated
    scores say what the weights are worth on data they were not fitted to. Members whose
    weight is 0 are left out of the file.

    \b
    zoo ensemble fit runs/* --out ens.json
    zoo ensemble fit runs/* --method greedy --bags 20 --metric accuracy --out ens.json
    zoo ensemble fit runs/*/predictions/val.safetensors --combine geometric --cv 10 --out ens.json
    """
    from ensemble.file import write_ensemble
    from ensemble.fit import fit_ensemble, read_members
    from ensemble.report import format_fit_report
    from ensemble.weights import search_kwargs

    check_out_file(out)
    options = search_kwargs(method, iterations=iterations, init=init, use_best=use_best, bags=bags,
                            bag_fraction=bag_fraction, C=stacking_c)
    members = read_members(sources, split)  # one file at a time into one stack
    ens = fit_ensemble(members, method=method, metric=metric, combine=combine, calibrate=calibrate, cv=cv, seed=seed,
                       options=options, log=_err)
    click.echo(format_fit_report(ens))
    for message in ens.warnings:
        _err(f"warning: {message}")
    write_ensemble(out, ens)
    _err(f"wrote {out}")


def _member_predictions(sources, data, split: str, which: str = ""):
    """The members' prediction files, or None when --data will run their checkpoints; one of the two."""
    from ensemble.predict import load_prediction_sources

    if data is not None and sources:
        raise click.UsageError("pass --data or prediction files, not both")
    if data is None and not sources:
        raise click.UsageError(f"pass --data DIR to predict images, or the members' prediction files{which}")
    return load_prediction_sources(sources, split) if sources else None


def _member_sources(data_help: str, split_help: str):
    """The options of commands that take members' predictions from images (--data) or from files."""
    options = [
        click.option("--data", type=click.Path(), default=None, help=data_help),
        click.option("--split", default="test", show_default=True, help=split_help),
        click.option("--tta", type=click.IntRange(min=1), default=1, show_default=True, help="With --data: test-time augmentation views."),
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="With --data."),
        click.option("--device", default=None, help="With --data: cpu, cuda, cuda:1 ... (default: the best available)."),
    ]

    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


@ensemble_group.command("predict")
@click.argument("ensemble_file", type=click.Path(dir_okay=False), metavar="ENSEMBLE_JSON")
@click.argument("sources", nargs=-1, metavar="[RUN_OR_PREDFILE...]")
@_member_sources("Dataset (image folder or CSV) to run every member's checkpoint on.",
                 "With --data: the split to predict ('all' for every image); with runs: which predictions to read.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="OUT.safetensors (a prediction file) or OUT.csv (id,prediction,<probability per class>).")
def predict_command(ensemble_file, sources, data, split, tta, batch_size, device, out):
    """Apply an ensemble file to images or to members' prediction files.

    With --data every member with a nonzero weight runs its own checkpoint, data config
    and --tta views on the images; with prediction files (or run directories) those are
    combined, matched to members by run directory, backbone or the order given. Files of
    other classes, members trained on other classes and missing member runs are refused.

    \b
    zoo ensemble predict ens.json --data new_images/ --split all --tta 2 --out preds.csv
    zoo ensemble predict ens.json runs/*/predictions/test.safetensors --out test.safetensors
    """
    from ensemble.metrics import score_table
    from zoo.pipeline.member_inference import ensemble_predict
    from zoo.predictions import check_output_path, write_output

    check_output_path(out)
    preds = _member_predictions(sources, data, split)
    result = ensemble_predict(ensemble_file, predictions=preds, data=data, split=split, tta=tta, batch_size=batch_size,
                              device=device, log=_err)
    write_output(out, result)
    known = result.labels >= 0
    if known.all() and len(result.labels):
        scores = score_table(result.probabilities(), result.labels)
        _err("labelled samples: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    _err(f"wrote {len(result.ids)} predictions to {out}")


@ensemble_group.command("score")
@click.argument("ensemble_file", type=click.Path(dir_okay=False), metavar="ENSEMBLE_JSON")
@click.argument("sources", nargs=-1, metavar="[RUN_OR_PREDFILE...]")
@_member_sources("Dataset (image folder or CSV) to run every member's checkpoint on, dropped members too.",
                 "The labelled holdout: with --data the split to predict; with runs, which predictions to read.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also save the table: FILE.csv or FILE.json.")
def score_command(ensemble_file, sources, data, split, tta, batch_size, device, out):
    """Score an ensemble, each member and equal weights on a labelled holdout.

    Prints accuracy, log loss and ECE of every member (kept and dropped, each at its raw
    probabilities), of the equal-weight average (the plain mean of all members' raw
    probabilities) and of the fitted ensemble, and marks the best single member. Score it
    on rows no weight, temperature or setting was chosen on (a test/ folder): the
    validation rows the ensemble was fitted on would flatter it.

    \b
    zoo ensemble score ens.json --data data/ --split test
    zoo ensemble score ens.json runs/* --split test --out holdout.csv
    """
    from ensemble.score import format_score_table, write_score_table
    from zoo.pipeline.member_inference import ensemble_score

    if out is not None:
        check_out_file(out)
    preds = _member_predictions(sources, data, split, " (dropped members too)")
    table = ensemble_score(ensemble_file, predictions=preds, data=data, split=split, tta=tta, batch_size=batch_size,
                           device=device, log=_err)
    click.echo(format_score_table(table))
    for note in table.notes:
        _err(f"note: {note}")
    if out is not None:
        write_score_table(out, table)
        _err(f"wrote {out}")


COMMANDS = [correlate_command, ensemble_group]
