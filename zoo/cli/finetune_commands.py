"""``zoo finetune``, ``zoo predict`` and ``zoo lr-find``.

``finetune``'s options are built from ``FinetuneConfig``'s fields (``zoo.cli.options``), so
each option's default and help live in one place (``finetune/config.py``).
"""

from __future__ import annotations

from pathlib import Path

import click

from finetune.config import OPTIMIZERS, FinetuneConfig
from zoo.cli.options import THREADS_HELP, config_options

@click.command("finetune")
@click.argument("backbone", required=False, default="")
@click.option("--data", "data", type=click.Path(), default="", help="image folder (train/<class>/..., val/, test/) or CSV path,label[,split]")
@click.option("--out", "out", type=click.Path(), required=True, help="run directory to write (or to resume)")
@config_options
def finetune_command(**options):
    """Fine-tune one pretrained timm backbone on an image dataset.

    BACKBONE is any timm model name (weights from the hub; --weights FILE for a local
    file). The first stage groups are frozen and the rest train at rates that fall from
    the head (--lr) toward the stem (--layer-decay). The run directory gets config.json,
    model.safetensors (the best epoch, loadable with plain timm), metrics.csv and
    metrics.png, predictions/val.safetensors, and a report of the best epoch.

    \b
    zoo finetune convnext_tiny.fb_in22k --data data/ --out runs/convnext
    zoo finetune tf_efficientnet_lite0 --weights lite0.pth --data data/ --out runs/lite0
    zoo finetune --resume --out runs/convnext
    zoo finetune tf_efficientnet_lite0 --weights lite0.pth --data data/ --folds 5 --out runs/lite0

    \b
    With --folds K the run is cross-fitted: RUN/fold-1 ... RUN/fold-K are fold models, each
    trained on K-1 folds of train/ and picking its epoch on the fold it holds out;
    RUN/predictions/oof.safetensors holds every train/ image once, predicted by the model
    that did not train on it (what `zoo ensemble fit` fits weights on), and
    RUN/predictions/val.safetensors the fold models' mean on the untouched val/.
    """
    from finetune.member import train_member

    cfg = FinetuneConfig(**options)
    if not cfg.resume and not cfg.data:
        raise click.UsageError("--data is required (an image folder or a CSV)")
    if not cfg.resume and not cfg.backbone:
        raise click.UsageError("BACKBONE is required, e.g. `zoo finetune resnet50 --data DIR --out RUN`")
    result = train_member(cfg)  # a linear probe, a cross-fit or one run, as the options say
    if result.rank == 0:  # under torchrun, rank 0 alone prints the result
        click.echo(result.summary)


@click.command("predict")
@click.argument("source", type=click.Path(exists=True))
@click.argument("images", nargs=-1)
@click.option("--data", default=None, type=click.Path(exists=True), help="dataset folder, CSV, or any folder of images "
              "(instead of IMAGES)")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test", "all", "run-val"]),
              help="which split of --data; 'all' predicts every image under it; 'run-val' the run's own validation images "
                   "(also when split from train/; a cross-fit: out-of-fold), to fit an ensemble on predictions with the same --tta")
@click.option("--out", default=None, type=click.Path(), help="prediction file (.safetensors) or CSV (.csv) to write "
              "(default: the CSV on stdout)")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0),
              help="add the K most probable classes and their probabilities to the CSV (top1_class, top1_prob, ...)")
@click.option("--tta", default=1, show_default=True, help="test-time augmentation views (1: none; 2: + flip; up to 6 with zooms)")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--device", default=None, help="cuda, cpu ... (default: cuda when present)")
@click.option("--allow-outside-root", is_flag=True, help="allow CSV paths outside the CSV's folder")
@click.option("--threads", default=None, type=click.IntRange(min=1), help=THREADS_HELP)
def predict_command(source, images, data, split, out, top_k, tta, batch_size, device, allow_outside_root, threads):
    """Predict images with a run's best model (a cross-fit: the mean of its fold models), an ensemble
    file, a zoo run folder (its ensemble), or an ONNX file of `zoo export` (on onnxruntime, without
    torch), and write a prediction file (.safetensors) or a CSV of id,prediction,<class
    probabilities> (.csv, or stdout without --out).

    \b
    zoo predict runs/lite0 photo.jpg more/*.jpg --top-k 2
    zoo predict ens.json "photos/**/*.jpg" --out preds.csv
    zoo predict runs/lite0 --data data/ --split test --out test.safetensors
    zoo predict ensemble.onnx --data new_images/ --split all --out preds.csv
    """
    from zoo.predictions import check_output_path, log_loss_and_accuracy, predictions_csv, write_output
    from zoo.progress import write as stderr_log

    if images and data:
        raise click.UsageError("pass IMAGES or --data, not both")
    if not images and not data:
        raise click.UsageError("pass image files, globs or folders after SOURCE, or --data DIR")
    if out:
        check_output_path(out, top_k)
    if Path(source).suffix.lower() == ".onnx":  # an exported graph: onnxruntime, numpy and PIL only; torch is never imported
        from zoo.onnx_predict import predict_onnx

        if images or tta != 1 or split == "run-val" or device not in (None, "cpu"):
            raise click.UsageError(f"{source}: an ONNX file predicts --data DIR on the CPU, without --tta, on "
                                   "--split train|val|test|all")
        preds = predict_onnx(source, data, split=split, batch_size=batch_size, threads=threads,
                             allow_outside_root=allow_outside_root, log=stderr_log)
    else:
        from zoo.pipeline.api import predict

        preds = predict(source, list(images) or None, data=data, split=split, tta=tta, batch_size=batch_size,
                        device=device, threads=threads, allow_outside_root=allow_outside_root, log=stderr_log, progress=None)
    if out:
        write_output(out, preds, top_k)
    else:
        click.echo(predictions_csv(preds, top_k), nl=False)
    loss, acc = log_loss_and_accuracy(preds.logits, preds.labels)
    known = int((preds.labels >= 0).sum())
    scores = f"\tlog_loss={loss:.4f}\taccuracy={acc:.4f} ({known} labelled)" if known else ""
    click.echo(f"{out or 'stdout'}\t{len(preds.ids)} images{scores}", err=not out)


@click.command("lr-find")
@click.argument("backbone")
@click.option("--data", required=True, type=click.Path(exists=True), help="image folder or CSV")
@click.option("--out", "plot", default="lr_find.png", show_default=True, type=click.Path(), help="PNG of the curve")
@click.option("--start-lr", default=1e-7, show_default=True)
@click.option("--end-lr", default=10.0, show_default=True)
@click.option("--steps", default=100, show_default=True, help="number of updates in the sweep")
@click.option("--weights", default=None, type=click.Path(), help="local weights file instead of the hub")
@click.option("--pretrained/--no-pretrained", default=True)
@click.option("--freeze", default=FinetuneConfig.freeze, show_default=True, help="stage groups frozen, as in finetune")
@click.option("--layer-decay", default=FinetuneConfig.layer_decay, show_default=True)
@click.option("--batch-size", default=FinetuneConfig.batch_size, show_default=True)
@click.option("--input-size", default=None, type=int)
@click.option("--optimizer", default=FinetuneConfig.optimizer, type=click.Choice(list(OPTIMIZERS)), show_default=True)
@click.option("--weight-decay", default=FinetuneConfig.weight_decay, show_default=True, help="as in finetune")
@click.option("--label-smoothing", default=FinetuneConfig.label_smoothing, show_default=True, help="as in finetune")
@click.option("--workers", default=None, type=int)
@click.option("--threads", default=None, type=click.IntRange(min=1), help=THREADS_HELP)
@click.option("--device", default=None)
@click.option("--seed", default=0, show_default=True)
def lr_find_command(backbone, data, plot, start_lr, end_lr, steps, **options):
    """Learning-rate range test: sweep the head's rate, plot the loss, suggest a rate."""
    from finetune.lr_find import lr_find

    cfg = FinetuneConfig(backbone=backbone, data=data, **options)
    result = lr_find(cfg, start_lr=start_lr, end_lr=end_lr, steps=steps, plot=plot)
    click.echo(f"suggested --lr {result.suggestion:.2g} (valley); steepest {result.steepest:.2g}; "
               f"minimum/10 {result.minimum_over_10:.2g}; {len(result.lrs)} steps; plot: {plot}")


COMMANDS = [finetune_command, predict_command, lr_find_command]
