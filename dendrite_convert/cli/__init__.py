"""The umbrella `dendrite` command; each subcommand is also its own `dendrite-*` script."""

import typer

from .convert import convert, inspect
from .export import export
from .train import train

app = typer.Typer(
    add_completion=False, rich_markup_mode="rich", no_args_is_help=True, pretty_exceptions_show_locals=False,
    help="Add dendrites to PyTorch models, train them, and export plain inference artifacts.",
)
app.command("convert")(convert)
app.command("inspect")(inspect)
app.command("export")(export)
app.command("train")(train)
