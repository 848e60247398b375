"""``zoo distill``: one student model trained on an ensemble's soft targets (``zoo.pipeline.distill``)."""

from __future__ import annotations

import click
from click.core import ParameterSource

from zoo.cli.options import config_options
from zoo.pipeline.distill import DEFAULTS, TEACHERS


@click.command("distill")
@click.argument("ensemble", required=False, type=click.Path())
@click.option("--data", default=None, type=click.Path(), help="the dataset the ensemble's members were trained on")
@click.option("--student", default=None, help="timm model name of the student, e.g. tf_efficientnet_lite0")
@click.option("--out", required=True, type=click.Path(), help="run directory of the student (an ordinary zoo run)")
@click.option("--alpha", default=DEFAULTS["alpha"], show_default=True, type=float,
              help="weight of the hard labels' loss (0: the teacher alone; 1: plain fine-tuning)")
@click.option("--temperature", default=DEFAULTS["temperature"], show_default=True, type=float,
              help="softmax temperature of teacher and student in the KL term (the loss is scaled by T^2)")
@click.option("--views", default=DEFAULTS["views"], show_default=True, type=click.IntRange(min=1),
              help="views per image (view 0: the centre crop; the others seeded random crops and flips), the teacher's "
                   "outputs computed once for each; the student's epochs cycle through them")
@click.option("--view-mixup", default=DEFAULTS["view_mixup"], show_default=True, type=click.FloatRange(min=0),
              help="mix each view (but the centre one) with another image's view by a Beta(A, A) weight, the teacher "
                   "labelling the mixed pixels (function matching); partners share their teaching fold models; 0: off")
@click.option("--teacher", default=DEFAULTS["teacher"], show_default=True, type=click.Choice(list(TEACHERS)),
              help="; ".join(f"{k}: {v}" for k, v in TEACHERS.items()))
@click.option("--unlabeled", multiple=True, type=click.Path(), help="folder of images without labels to distil on as well "
              "(repeatable; never the dataset's holdout)")
@config_options
@click.pass_context
def distill_command(ctx, ensemble, data, student, out, alpha, temperature, views, view_mixup, teacher, unlabeled, resume,
                    **options):
    """Distil an ensemble into one model: train a student on the ensemble's calibrated probabilities.

    The teacher's outputs are computed once for VIEWS views of every training image (and of the
    --unlabeled images), each member seeing the same crop of the photo at its own input size; with
    cross-fitted members each pool image is taught by the fold models that did not train on it. The
    student is fine-tuned with zoo's recipe (every `zoo finetune` option applies) for a fixed number
    of epochs on the KL divergence to the teacher (mixed with the hard labels by --alpha) and keeps its
    last epoch: nothing is chosen on val/. RUN is an ordinary run directory (zoo predict, ensemble
    score, soup, export take it); config.json records the ensemble file's sha256, teacher, views,
    temperature and alpha.

    \b
    zoo distill runs/ens.json --data data/ --student tf_efficientnet_lite0 --weights lite0.pth \\
        --epochs 30 --views 8 --out runs/student
    zoo distill --resume --out runs/student
    """
    from zoo.pipeline.distill import distill

    if not resume and (not ensemble or not student):
        raise click.UsageError("ENSEMBLE and --student are required, e.g. `zoo distill ens.json --data DIR --student "
                               "tf_efficientnet_lite0 --out RUN` (or --resume --out RUN)")
    given = [f"--{name.replace('_', '-')}" for name in ("alpha", "temperature", "views", "view_mixup", "teacher")
             if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]
    if resume and (ensemble or student or data or unlabeled or given):
        raise click.UsageError("--resume continues the student in --out with its own ensemble, data, student and teacher "
                               "settings; drop ENSEMBLE, --data, --student, --unlabeled" + "".join(f", {g}" for g in given))
    result = distill(ensemble, data, student, out, alpha=alpha, temperature=temperature, views=views, teacher=teacher,
                     view_mixup=view_mixup, unlabeled=unlabeled, resume=resume, **options)
    click.echo(result.summary)


COMMANDS = [distill_command]
