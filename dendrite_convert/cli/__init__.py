"""The umbrella `dendrite` command; each subcommand is also its own `dendrite-*` script."""

import typer

from . import convert as _convert, export as _export, train as _train
from ._common import Command, Group

app = typer.Typer(
    add_completion=False, rich_markup_mode="rich", no_args_is_help=True, pretty_exceptions_show_locals=False,
    help="Add dendrites to PyTorch models, train them, and export plain inference artifacts.", cls=Group,
)
app.command("convert", cls=Command)(_convert.convert)
app.command("inspect", cls=Command)(_convert.inspect)
app.command("train", cls=Command)(_train.train)
app.command("export", cls=Command)(_export.export)
