"""``zoo export``: a run, a cross-fit, a soup or an ensemble as one ONNX file (zoo/pipeline/export.py)."""

from __future__ import annotations

import click


@click.command("export")
@click.argument("source", type=click.Path(exists=True), metavar="RUN_OR_ENS_JSON")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="the .onnx file to write")
@click.option("--soup", is_flag=True, help="a cross-fit as the uniform soup of its fold models (one model) instead of "
                                           "the mean of their probabilities; they must share their starting weights")
def export_command(source, out, soup):
    """Export a run or a whole ensemble as one ONNX graph that serves without torch.

    A run directory (a fine-tune, a probe, a snapshot, a soup) becomes its model behind its
    own mean and std and a softmax; a cross-fit the mean of its fold models' probabilities
    (--soup: their uniform soup). An ensemble file (ens.json) becomes every member with a
    nonzero weight, its temperature, the weights, the combine rule and the final
    temperature, with one graph input per distinct input size and crop among the members.
    Inputs are RGB pixels in [0, 1] after timm's eval resize and crop (the file's metadata
    says which, per input); the output is class probabilities; the batch size is dynamic.
    Needs pip install 'zoo-ensemble[export]'.

    \b
    zoo export runs/lite0 --out lite0.onnx
    zoo export ens.json --out ensemble.onnx
    zoo predict ensemble.onnx --data new_images/ --split all --out preds.csv
    """
    from zoo.pipeline.export import export

    result = export(source, out, soup=soup, log=lambda message: click.echo(message, err=True))
    click.echo(result.summary)


COMMANDS = [export_command]
