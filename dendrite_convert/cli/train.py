"""`dendrite-train`: neuron/dendrite alternation on a converted model, driven by a data adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import AllowModuleOpt, FactoryAgainOpt, ForceOpt, JsonOpt, QuietOpt, TrustOpt, TrustPickleOpt, command_app, consent, handle_errors
from ._train_options import (COMPARE, HARDWARE, RUN, SCHEDULE, CandidatesOpt, ClosedFormOrderOpt, ClosedFormRidgeOpt,
                             CorrelationMemoryOpt, GrowMinScoreOpt, GrowSamplesOpt, GrowTopKOpt, ObjectiveOpt)


@handle_errors
def train(
    converted: Annotated[Path | None, typer.Argument(help="A converted-model directory (from dendrite-convert).", show_default=False)] = None,
    adapter: Annotated[str | None, typer.Option(help="Data adapter: path/to/adapter.py or pkg.module (see --adapter-template).", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Run directory to write (best/, checkpoint/, scores.csv, summary.json, ...).", show_default=False)] = None,
    objective: ObjectiveOpt = "gradient",
    candidates: CandidatesOpt = 4,
    correlation_memory_mb: CorrelationMemoryOpt = 512,
    grow_samples: GrowSamplesOpt = 4096,
    closed_form_order: ClosedFormOrderOpt = 2,
    closed_form_ridge: ClosedFormRidgeOpt = 1e-3,
    grow_top_k: GrowTopKOpt = None,
    grow_min_score: GrowMinScoreOpt = 0.0,
    patience: Annotated[int, typer.Option(min=1, help="Add dendrites after this many epochs without validation improvement.", rich_help_panel=SCHEDULE)] = 10,
    switch_every: Annotated[int | None, typer.Option(min=1, help="Add dendrites every N epochs instead of by patience.", rich_help_panel=SCHEDULE)] = None,
    max_dendrites: Annotated[int | None, typer.Option(min=0, help="Most dendrites per target (0: plain training with early stopping) \\[default: 100; with --resume: the run's, raise it to continue a finished run].", rich_help_panel=SCHEDULE, show_default=False)] = None,
    max_epochs: Annotated[int | None, typer.Option(min=1, help="Stop after this many epochs in all \\[default: 100; with --resume: the run's, raise it to continue a finished run].", rich_help_panel=SCHEDULE, show_default=False)] = None,
    capacity_test: Annotated[bool, typer.Option("--capacity-test", help="Add a dendrite every epoch, three times, then stop: checks that the model and adapter work.", rich_help_panel=SCHEDULE)] = False,
    seed: Annotated[int, typer.Option(help="Seeds torch, numpy and random; the same seed gives the same run on CPU.", rich_help_panel=RUN)] = 0,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory from its last completed epoch (its recorded model, options and adapter; --adapter replaces the adapter).", rich_help_panel=RUN, show_default=False)] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Train this many seeds (from --seed) and report mean ± std: RUN/dendrites/seed_N/.", rich_help_panel=COMPARE)] = 1,
    baseline: Annotated[bool, typer.Option("--baseline", help="Also train every seed without dendrites (RUN/baseline/) and test whether the difference is beyond noise (Welch's t-test).", rich_help_panel=COMPARE)] = False,
    jobs: Annotated[int, typer.Option(min=1, help="With --seeds/--baseline: runs in this many parallel processes.", rich_help_panel=COMPARE)] = 1,
    device: Annotated[str | None, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", rich_help_panel=HARDWARE, show_default="auto")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32, or mixed precision: bf16 (autocast) or fp16 (autocast with a gradient scaler).", rich_help_panel=HARDWARE, show_default="fp32")] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the training step (again after each dendrite added); falls back to eager with the reason if it fails.", rich_help_panel=HARDWARE, show_default=False)] = None,
    adapter_template: Annotated[bool, typer.Option("--adapter-template", help="Print a commented adapter.py to start from, and exit.", rich_help_panel=RUN)] = False,
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
    from ._training import Progress, compare_seeds, config_options, print_template, report, resume_hint, run_directory

    if adapter_template:
        return print_template()
    from ..training.distributed import launched_rank
    from ..training.trainer import TrainConfig, train as train_api

    if launched_rank() != 0:  # under torchrun rank 0 alone shows progress and prints results
        quiet, json_out = True, False
    run_dir = run_directory(converted, adapter, output, resume, compare=seeds > 1 or baseline)
    allowed = consent(trust_code, trust_pickle, factory, allow_module)
    config = TrainConfig(**config_options(locals()))  # the arguments given that are TrainConfig's options
    budget = {k: v for k, v in (("max_dendrites", max_dendrites), ("max_epochs", max_epochs)) if v is not None}
    hardware = {k: v for k, v in {"device": device, "precision": precision, "compile": compile}.items() if v is not None}
    if seeds > 1 or baseline:
        compare_seeds(converted, adapter, run_dir, config, seeds, baseline, jobs, force, json_out, quiet, allowed)
        return
    with Progress(config.max_epochs, quiet) as progress, resume_hint(run_dir):
        summary = train_api(converted, adapter, run_dir, config, force=force, resume=resume is not None, on_epoch=progress.epoch,
                            **({"budget": budget, "hardware": hardware} if resume is not None else {}), **allowed)
    report(summary, run_dir, quiet, json_out)


app = command_app(train)

if __name__ == "__main__":  # python -m dendrite_convert.cli.train
    app()
