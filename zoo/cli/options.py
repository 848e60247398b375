"""Options more than one command shares, built from ``FinetuneConfig``'s fields so that each option's
default and help live in one place (``finetune/config.py``)."""

from __future__ import annotations

import dataclasses
import typing

import click

from finetune.config import FinetuneConfig

# `zoo finetune --threads` comes from the config field; predict, lr-find and demo take the same help.
THREADS_HELP = {f.name: f for f in dataclasses.fields(FinetuneConfig)}["threads"].metadata["help"]


def config_options(func):
    """Add one click option per FinetuneConfig field (except those marked cli=False)."""
    hints = typing.get_type_hints(FinetuneConfig)
    for f in reversed(dataclasses.fields(FinetuneConfig)):
        meta = f.metadata
        if meta.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        help_text = meta["help"] + (f"  [default: {f.default}]" if f.default is not None and base is not bool else "")
        if base is bool or hint == (bool | None):
            names = f"{flag}/--no-{flag[2:]}"
            func = click.option(names, f.name, default=f.default, help=meta["help"] + (" [default: on]" if f.default else ""))(func)
        elif typing.get_origin(base) is tuple:
            func = click.option(flag, f.name, type=float, nargs=3, default=None, help=help_text)(func)
        elif "choices" in meta:  # name -> description (finetune's registries, e.g. the schedules): all listed in --help
            described = meta["help"] + " (" + "; ".join(f"{name}: {text}" for name, text in meta["choices"].items()) + ")"
            func = click.option(flag, f.name, type=click.Choice(list(meta["choices"])), default=f.default,
                                help=help_text.replace(meta["help"], described, 1))(func)
        else:
            func = click.option(flag, f.name, type=base, default=f.default, help=help_text)(func)
    return func
