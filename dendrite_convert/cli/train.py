"""`dendrite-train`: neuron/dendrite alternation on a converted model, driven by a data adapter."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from ._common import (AllowModuleOpt, FactoryAgainOpt, ForceOpt, JsonOpt, QuietOpt, TrustOpt, TrustPickleOpt, command_app,
                      console, consent, handle_errors, print_json)

_SCHEDULE, _OBJECTIVE, _RUN, _COMPARE = "Schedule", "Dendrite objective", "Run", "Seeds and baseline"
_HARDWARE = "Hardware (on --resume: given ones replace the recorded ones)"


@handle_errors
def train(
    converted: Annotated[Path | None, typer.Argument(help="A converted-model directory (from dendrite-convert).", show_default=False)] = None,
    adapter: Annotated[str | None, typer.Option(help="Data adapter: path/to/adapter.py or pkg.module (see --adapter-template).", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Run directory to write (best/, checkpoint/, scores.csv, summary.json, ...).", show_default=False)] = None,
    objective: Annotated[str, typer.Option(help="How dendrites learn: gradient (jointly on the task loss) or correlation (candidates fit the error signal, then frozen).", rich_help_panel=_OBJECTIVE)] = "gradient",
    candidates: Annotated[int, typer.Option(min=1, help="Correlation: candidate dendrites trained per target; the best is kept.", rich_help_panel=_OBJECTIVE)] = 4,
    correlation_memory_mb: Annotated[int, typer.Option(min=1, help="Correlation: MB that recorded error signals and candidate work may hold at once; targets that do not fit together are recorded in turn.", rich_help_panel=_OBJECTIVE)] = 512,
    patience: Annotated[int, typer.Option(min=1, help="Add dendrites after this many epochs without validation improvement.", rich_help_panel=_SCHEDULE)] = 10,
    switch_every: Annotated[int | None, typer.Option(min=1, help="Add dendrites every N epochs instead of by patience.", rich_help_panel=_SCHEDULE)] = None,
    max_dendrites: Annotated[int, typer.Option(min=0, help="Most dendrites per target (0: plain training with early stopping).", rich_help_panel=_SCHEDULE)] = 100,
    max_epochs: Annotated[int, typer.Option(min=1, help="Stop after this many epochs in all.", rich_help_panel=_SCHEDULE)] = 100,
    capacity_test: Annotated[bool, typer.Option("--capacity-test", help="Add a dendrite every epoch, three times, then stop: checks that the model and adapter work.", rich_help_panel=_SCHEDULE)] = False,
    seed: Annotated[int, typer.Option(help="Seeds torch, numpy and random; the same seed gives the same run on CPU.", rich_help_panel=_RUN)] = 0,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory from its last completed epoch (its recorded model, options and adapter; --adapter replaces the adapter).", rich_help_panel=_RUN, show_default=False)] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Train this many seeds (from --seed) and report mean ± std: RUN/dendrites/seed_N/.", rich_help_panel=_COMPARE)] = 1,
    baseline: Annotated[bool, typer.Option("--baseline", help="Also train every seed without dendrites (RUN/baseline/) and test whether the difference is beyond noise (Welch's t-test).", rich_help_panel=_COMPARE)] = False,
    jobs: Annotated[int, typer.Option(min=1, help="With --seeds/--baseline: runs in this many parallel processes.", rich_help_panel=_COMPARE)] = 1,
    device: Annotated[str | None, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", rich_help_panel=_HARDWARE, show_default="auto")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32, or mixed precision: bf16 (autocast) or fp16 (autocast with a gradient scaler).", rich_help_panel=_HARDWARE, show_default="fp32")] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the training step (again after each dendrite added); falls back to eager with the reason if it fails.", rich_help_panel=_HARDWARE, show_default=False)] = None,
    adapter_template: Annotated[bool, typer.Option("--adapter-template", help="Print a commented adapter.py to start from, and exit.", rich_help_panel=_RUN)] = False,
    factory: FactoryAgainOpt = None,
    trust_code: TrustOpt = False,
    allow_module: AllowModuleOpt = None,
    trust_pickle: TrustPickleOpt = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train dendrites into a converted model: neuron phases, dendrite switches, best model kept.

    [bold]dendrite-train converted/ --adapter adapter.py -o run/[/bold]
    """
    from ..core.errors import UsageError

    if adapter_template:
        from ..training.adapter import TEMPLATE

        sys.stdout.write(TEMPLATE)
        return
    from ..training.distributed import launched_rank
    from ..training.trainer import TrainConfig, train as train_api

    if launched_rank() != 0:  # under torchrun rank 0 alone shows progress and prints results
        quiet, json_out = True, False

    if resume is not None:
        if output is not None and output.resolve() != resume.resolve():
            raise UsageError("--resume RUN continues RUN in place; leave out -o/--output.")
        if converted is not None:
            raise UsageError("--resume RUN continues with the model recorded in RUN/checkpoint; leave out CONVERTED.")
        run_dir = resume
    else:
        if converted is None:
            raise UsageError("give a converted-model directory: dendrite-train CONVERTED --adapter adapter.py -o RUN.")
        if adapter is None:
            raise UsageError("--adapter is required (dendrite-train --adapter-template prints one to start from).")
        if output is None:
            raise UsageError("-o/--output is required: the run directory to write.")
        from ..core.outputs import check_output_location

        check_output_location(output)
        run_dir = output
    allowed = consent(trust_code, trust_pickle, factory, allow_module)
    hardware = {k: v for k, v in {"device": device, "precision": precision, "compile": compile}.items() if v is not None}
    config = TrainConfig(
        objective=objective, candidates=candidates, patience=patience, switch_every=switch_every,
        max_dendrites=max_dendrites, max_epochs=max_epochs, capacity_test=capacity_test, seed=seed,
        correlation_memory_mb=correlation_memory_mb, **hardware,
    )
    if seeds > 1 or baseline:
        if resume is not None:
            raise UsageError("--seeds/--baseline start new runs; they cannot be combined with --resume.")
        _compare(converted, adapter, run_dir, config, seeds, baseline, jobs, force, json_out, quiet, allowed)
        return
    with _Progress(max_epochs, quiet) as progress:
        summary = train_api(converted, adapter, run_dir, config, force=force, resume=resume is not None,
                            on_epoch=progress.epoch, hardware=hardware if resume is not None else None, **allowed)
    _report(summary, run_dir, quiet)
    if json_out:
        print_json(summary)
    if summary.get("nonfinite"):
        raise typer.Exit(1)


def _compare(converted, adapter, run_dir, config, seeds, baseline, jobs, force, json_out, quiet, allowed) -> None:
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


def _report(summary: dict, run_dir: Path, quiet: bool) -> None:
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
        f"with {summary['dendrites']} dendrite(s) per target, {summary['params']:,} params "
        f"(base {summary['base_params']:,}); wrote {run_dir}", highlight=False, soft_wrap=True,
    )


class _Progress(logging.Handler):
    """A rich progress bar when stderr is a terminal, else one line per epoch, after the line saying where the
    run trains (the loop's info log); nothing with --quiet."""

    def __init__(self, total: int, quiet: bool):
        super().__init__(logging.INFO)
        self.quiet = quiet
        self.bar = None
        self.total = total
        self.log = logging.getLogger("dendrite_convert.training.loop")
        self.level_before = self.log.level

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.INFO:
            console.print(record.getMessage(), highlight=False, soft_wrap=True)

    def __enter__(self):
        if not self.quiet:
            self.log.addHandler(self)
            self.log.setLevel(logging.INFO)
        if not self.quiet and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=console, transient=False)
            self.bar.start()
            self.task = self.bar.add_task("training", total=self.total)
        return self

    def __exit__(self, *exc):
        self.log.removeHandler(self)
        self.log.setLevel(self.level_before)
        if self.bar is not None:
            self.bar.stop()

    def epoch(self, row: dict) -> None:
        if self.quiet:
            return
        test = "" if row["test"] is None else f" test {row['test']:.4g}"
        loss = "" if row["train_loss"] is None else f" loss {row['train_loss']:.4g}"
        text = (f"epoch {row['epoch']} {row['phase']}: {row['dendrites']} dendrite(s){loss} val {row['val']:.4g}"
                f"{test} ({row['seconds']:.2f}s)")
        if self.bar is not None:
            self.bar.update(self.task, completed=row["epoch"], description=text)
        else:
            console.print(text, highlight=False, soft_wrap=True)


app = command_app(train)
