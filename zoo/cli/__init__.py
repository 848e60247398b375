"""The ``zoo`` command line: the top layer, over ``zoo.pipeline``, ``finetune``, ``ensemble`` and the
``zoo`` core. Only this package imports click, and it holds no logic of its own.

Each command parses its options, calls one library function that works without click,
and prints. Library code raises ``UserInputError`` for bad input; ``ZooGroup`` turns
it into a one-line message (no traceback) and exit status 1. Training stopped by a
signal raises ``Interrupted`` (resume state saved); ``ZooGroup`` exits with its status
(130 for SIGINT, 143 for SIGTERM), so a shell or a scheduler sees the run did not finish.
"""

from __future__ import annotations

import os
import warnings

import click

from zoo import __version__
from zoo.errors import Interrupted, UserInputError


class ZooGroup(click.Group):
    def invoke(self, ctx):
        try:
            with warnings.catch_warnings():  # restores showwarning afterwards (CliRunner runs many commands in one process)
                warnings.showwarning = _warning_line(set())
                return super().invoke(ctx)
        except UserInputError as e:
            if os.environ.get("RANK", "0") != "0":
                raise SystemExit(1) from None  # under torchrun, rank 0 alone says what went wrong
            raise click.ClickException(str(e)) from None
        except Interrupted as e:
            ctx.exit(e.exit_status)


def _warning_line(seen: set[str]):
    """Python warnings from the libraries underneath (scikit-learn, matplotlib, torch) as one line each, once."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = f"warning: {str(message).splitlines()[0] if str(message) else ''} ({category.__name__})"
        if text not in seen:
            seen.add(text)
            click.echo(text, err=True)
    return show


@click.group(cls=ZooGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="zoo")
def main():
    """Fine-tune diverse timm backbones, measure how alike their predictions are, and
    fit a weighted ensemble of them.

    \b
    zoo finetune convnext_tiny.fb_in22k --data data/ --out runs/convnext
    zoo finetune efficientnet_b2        --data data/ --out runs/effb2
    zoo correlate runs/*
    zoo ensemble fit runs/* --out ens.json
    zoo ensemble predict ens.json --data new_images/ --out preds.csv
    """


def _register() -> None:
    # Imported here so that each module's commands attach to ``main`` once.
    from zoo.cli import (clean_commands, distill_commands, ensemble_commands, export_commands, finetune_commands,  # noqa: F401
                         run_commands, soup_commands)

    for module in (finetune_commands, ensemble_commands, clean_commands, soup_commands, export_commands, run_commands,
                   distill_commands):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
