"""``zoo soup``: average the weights of runs into one model (finetune/soup.py)."""

from __future__ import annotations

import click

from finetune.soup import BN_MODES, METHODS, SCORE_SPLITS
from zoo.cli.options import THREADS_HELP


@click.command("soup")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False), metavar="RUN...")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="run directory to write the soup to")
@click.option("--method", type=click.Choice(list(METHODS)), default="uniform", show_default=True,
              help="uniform: average all; greedy: add runs best-first while the selection log loss does not worsen")
@click.option("--bn", type=click.Choice(list(BN_MODES)), default="average", show_default=True,
              help="BatchNorm statistics: average them (measured better), or re-estimate the differing ones on training images")
@click.option("--score-split", type=click.Choice(list(SCORE_SPLITS)), default=None,
              help="greedy's selection rows: val for single-split runs (the default); holdout only on purpose, for fold models")
@click.option("--bn-images", type=click.IntRange(min=1), default=512, show_default=True,
              help="training images the BatchNorm statistics are re-estimated on")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default=None, help="cuda, cpu ... (default: cuda when present)")
@click.option("--threads", default=None, type=click.IntRange(min=1), help=THREADS_HELP)
def soup_command(runs, out, method, bn, score_split, bn_images, batch_size, device, threads):
    """Average the weights of runs fine-tuned from the same starting weights (a model soup).

    RUN... are run directories of one backbone, one class list and one starting point
    (start_weights_sha256); a cross-fitted run (--folds K) stands for its K fold models,
    souped uniformly into one deployable model scored on the untouched holdout. The soup
    is an ordinary run directory (model.safetensors loads with plain timm) with its
    validation predictions recomputed.

    \b
    zoo soup runs/lite0-lr1e-3 runs/lite0-lr3e-3 --method greedy --out runs/lite0-soup
    zoo soup runs/lite0-folds --out runs/lite0-foldsoup
    """
    from finetune.soup import make_soup

    result = make_soup(runs, out, method=method, bn=bn, score_split=score_split, bn_images=bn_images,
                       batch_size=batch_size, device=device, threads=threads,
                       log=lambda message: click.echo(message, err=True))
    click.echo(f"{result.run.root}\t{method}\tkept={len(result.kept)}/{len(result.ingredients)}\t"
               f"val_loss={result.scores['log_loss']:.4f}\tval_accuracy={result.scores['accuracy']:.4f}")


COMMANDS = [soup_command]
