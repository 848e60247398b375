"""``zoo label-issues``: a thin command over ``zoo.pipeline.label_issues``."""

from __future__ import annotations

import click

from zoo.pipeline.label_issues import FILTERS


@click.command("label-issues")
@click.argument("sources", nargs=-1, required=True, metavar="RUNS... | ENS.json")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="CSV to write (default: print it): rank,id,given_label,suggested_label,self_confidence,label_quality.")
@click.option("--filter-by", type=click.Choice(list(FILTERS)), default="prune_by_noise_rate", show_default=True,
              help="cleanlab's rule for which images to flag: " + "; ".join(f"{k}: {v}" for k, v in FILTERS.items()))
def label_issues_command(sources, out, filter_by):
    """Find the training images whose given label looks wrong (confident learning, cleanlab).

    Reads the out-of-fold probabilities of an ensemble file's members (combined as the
    ensemble predicts), of one cross-fitted run, or of several (their equal-weight
    average), and lists the pool images cleanlab flags as label issues, most suspect first
    (lowest label quality: the normalized margin of the given label). Runs without
    out-of-fold predictions are refused: a single-split model trained on the images it would
    judge. Needs `pip install 'zoo-ensemble[clean]'`.

    \b
    zoo label-issues runs/zoo/ensemble.json --out issues.csv
    zoo label-issues runs/zoo/members/lp2
    zoo finetune tf_efficientnet_lite2 --data data/ --folds 5 --exclude issues.csv --out runs/lite2-clean

    Review the list, keep the rows you agree with, and train again without them with
    `zoo finetune --exclude issues.csv` (or `exclude = "issues.csv"` in a zoo file's [defaults]).
    """
    from zoo.pipeline.label_issues import label_issues, write_label_issues

    issues = label_issues(sources, filter_by)
    if out is None:
        click.echo(issues.csv_text(), nl=False)
    else:
        write_label_issues(out, issues)
    click.echo(issues.summary() + (f"; wrote {out}" if out else ""), err=True)


COMMANDS = [label_issues_command]
