"""What `dendrite-train` checks and shows around the library call: option combinations, progress, results."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import typer

from ..core.errors import UsageError
from ..core.words import plural
from ._common import console, print_json


def run_directory(converted: Path | None, adapter: str | None, output: Path | None, resume: Path | None,
                  compare: bool) -> Path:
    """The run directory the options name, after checking that they go together."""
    if resume is not None:
        if output is not None and output.resolve() != resume.resolve():
            raise UsageError("--resume RUN continues RUN in place; leave out -o/--output.")
        if converted is not None:
            raise UsageError("--resume RUN continues with the model recorded in RUN/checkpoint; leave out CONVERTED.")
        if compare:
            raise UsageError("--seeds/--baseline start new runs; they cannot be combined with --resume.")
        return resume
    if converted is None:
        raise UsageError("give a converted-model directory: dendrite-train CONVERTED --adapter adapter.py -o RUN.")
    if adapter is None:
        raise UsageError("--adapter is required (dendrite-train --adapter-template prints one to start from).")
    if output is None:
        raise UsageError("-o/--output is required: the run directory to write.")
    from ..core.outputs import check_output_location

    check_output_location(output)
    return output


def config_options(arguments: dict) -> dict:
    """The command's `arguments` that are TrainConfig options, by TrainConfig's names, leaving out those not
    given (None), so TrainConfig's defaults apply to them."""
    from dataclasses import fields

    from ..training.config import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    options = {_CONFIG_NAME.get(name, name): value for name, value in arguments.items() if value is not None}
    return {name: value for name, value in options.items() if name in names}


_CONFIG_NAME = {"grow_samples": "correlation_samples"}  # options the command spells otherwise than TrainConfig


def print_template() -> None:
    """--adapter-template: a commented adapter.py on stdout."""
    from ..training.adapter import TEMPLATE

    sys.stdout.write(TEMPLATE)


@contextlib.contextmanager
def resume_hint(run_dir: Path):
    """Ctrl-C: the next step becomes the interrupt's argument, which handle_errors prints."""
    try:
        yield
    except KeyboardInterrupt:
        if (run_dir / "checkpoint").is_dir():
            raise KeyboardInterrupt(f"continue from the last completed epoch: dendrite-train --resume {run_dir}") from None
        raise KeyboardInterrupt("no epoch had finished, so there is nothing to resume") from None


def compare_seeds(converted, adapter, run_dir, config, seeds, baseline, jobs, force, json_out, quiet, allowed) -> None:
    """K seeds with (and without) dendrites: comparison.csv/.json/.png and a table with the significance."""
    from ..conversion.consent import Consent
    from ..training.compare import compare, render

    result = compare(converted, adapter, run_dir, config, seeds=seeds, baseline=baseline, jobs=jobs, force=force,
                     consent=Consent(**allowed))
    if not quiet:
        render(result, console)
        console.print(f"wrote {run_dir / 'comparison.csv'}, comparison.json, comparison.png and one run per seed")
    if json_out:
        print_json(result.to_dict())


def report(summary: dict, run_dir: Path, quiet: bool, json_out: bool) -> None:
    """The summary as JSON on stdout with --json; exit 1 when training stopped on a non-finite loss."""
    _say(summary, run_dir, quiet)
    if json_out:
        print_json(summary)
    if summary.get("nonfinite"):
        raise typer.Exit(1)


def _say(summary: dict, run_dir: Path, quiet: bool) -> None:
    """One sentence on stderr: the result, or why training stopped and where the best model so far is."""
    if summary.get("already_finished"):
        if not quiet:
            console.print(f"{run_dir} is already finished ({summary['stop_reason']}); nothing to do. Raise --max-epochs "
                          "or --max-dendrites to continue it.", highlight=False, soft_wrap=True)
        return
    if summary.get("nonfinite"):
        kept = (f"the best model so far (epoch {summary['best_epoch']}, val {summary['best_val']:.6g}) is in {run_dir / 'best'}"
                if summary["best_val"] is not None else "no epoch finished with a finite score, so there is no best model")
        console.print(f"[red]error:[/red] training stopped: {summary['stop_reason']}; {kept}. Lower the learning rate "
                      "or check the loss in the adapter.", highlight=False, soft_wrap=True)
        return
    if quiet:
        return
    test = "" if summary["test_at_best"] is None else f", test {summary['test_at_best']:.6g}"
    console.print(
        f"done: {summary['stop_reason']}. Best val {summary['best_val']:.6g}{test} at epoch {summary['best_epoch']} "
        f"with {plural(summary['dendrites'], 'dendrite')} per target, {summary['params']:,} params "
        f"(base {summary['base_params']:,}); wrote {run_dir}", highlight=False, soft_wrap=True,
    )


class Progress:
    """A rich progress bar when stderr is a terminal, else one line per epoch; nothing with --quiet."""

    def __init__(self, total: int, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.total = total

    def __enter__(self):
        if not self.quiet:  # long phases within an epoch print their own lines (library logger "dendrite_convert.progress")
            self.lines = _ConsoleLines()
            logging.getLogger("dendrite_convert.progress").addHandler(self.lines)
            logging.getLogger("dendrite_convert.progress").setLevel(logging.INFO)
        if not self.quiet and console.is_terminal:
            self.bar = progress_bar(console)
            self.bar.start()
            self.task = self.bar.add_task("training", total=self.total)
        return self

    def __exit__(self, *exc):
        if not self.quiet:
            logging.getLogger("dendrite_convert.progress").removeHandler(self.lines)
        if self.bar is not None:
            self.bar.stop()

    def epoch(self, row: dict) -> None:
        if self.quiet:
            return
        test = "" if row["test"] is None else f" test {row['test']:.4g}"
        loss = "" if row["train_loss"] is None else f" loss {row['train_loss']:.4g}"
        state = f"{row['phase']}: {plural(row['dendrites'], 'dendrite')}{loss} val {row['val']:.4g}{test}"
        if self.bar is not None:  # the bar shows the epoch count and the elapsed time itself
            self.bar.update(self.task, completed=row["epoch"], description=state)
        else:
            console.print(f"epoch {row['epoch']} {state} ({row['seconds']:.2f}s)", highlight=False, soft_wrap=True)


class _ConsoleLines(logging.Handler):
    """Progress lines of long phases, printed through the console (above a live bar, or as plain lines)."""

    def emit(self, record: logging.LogRecord) -> None:
        console.print(record.getMessage(), highlight=False, soft_wrap=True)


def progress_bar(console):
    """The training bar: count and elapsed time keep their width in an 80-column terminal, the text gives way."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Column

    return Progress(
        TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
        BarColumn(bar_width=10), MofNCompleteColumn(table_column=Column(no_wrap=True, min_width=7)),
        TimeElapsedColumn(table_column=Column(no_wrap=True, min_width=7)),
        console=console, transient=False, expand=True,
    )
