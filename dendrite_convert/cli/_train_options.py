"""dendrite-train's help panels, and its options for how dendrites grow (each read by the objectives that
declare it, through TrainConfig.make_objective), kept here so train.py stays a short list of options."""

from __future__ import annotations

from typing import Annotated

import typer

from ..training.objectives import REGISTRY

SCHEDULE, RUN, COMPARE, PANEL = "Schedule", "Run", "Seeds and baseline", "Dendrite objective"
HARDWARE = "Hardware (on --resume: given ones replace the recorded ones)"
_OBJECTIVES_HELP = "How dendrites learn: " + "; ".join(f"{name} ({help})" for name, (_, help) in REGISTRY.items()) + "."

ObjectiveOpt = Annotated[str, typer.Option(help=_OBJECTIVES_HELP, rich_help_panel=PANEL)]
CandidatesOpt = Annotated[int, typer.Option(
    min=1, help="Correlation: candidate dendrites trained per target; the best is kept.", rich_help_panel=PANEL)]
CorrelationMemoryOpt = Annotated[int, typer.Option(
    min=1, help="Correlation: MB that recorded error signals and candidate work may hold at once; targets that do not "
    "fit together are recorded in turn.", rich_help_panel=PANEL)]
GrowSamplesOpt = Annotated[int, typer.Option(
    min=1, help="Training samples a growth step reads the error signal from (correlation records them, closed-form "
    "fits three quarters of them and line-searches on the rest, gradient ranks channels with them).",
    rich_help_panel=PANEL)]
ClosedFormOrderOpt = Annotated[int, typer.Option(
    min=1, max=2, help="Closed-form: 2 fits the loss's curvature along each target's input (pays at a plateau); 1 "
    "fits the error signal linearly.", rich_help_panel=PANEL)]
ClosedFormRidgeOpt = Annotated[float, typer.Option(
    help="Closed-form: regularisation of the fits (positive), relative to the mean square of each target's "
    "input.", rich_help_panel=PANEL)]
GrowTopKOpt = Annotated[int | None, typer.Option(
    min=1, help="Closed-form: grow only the K targets with the largest predicted loss decrease per added parameter "
    "\\[default: every target whose fit lowers the loss].", rich_help_panel=PANEL, show_default=False)]
GrowMinScoreOpt = Annotated[float, typer.Option(
    min=0, max=1, help="Closed-form: grow only targets whose predicted loss decrease per added parameter is at least "
    "this fraction of the best target's.", rich_help_panel=PANEL)]
