"""Objectives: how dendrites learn, one class each, registered by the name users choose them with.

Adding one: write `objectives/<name>.py` with a subclass of `Objective` (see docs/objectives.md) and add
its line to `OBJECTIVES`; `dendrite-train --objective`, DDP and both callbacks pick it up from here.
"""

from __future__ import annotations

from dataclasses import fields

from ...core.errors import UsageError
from .base import Objective, TrainingData
from .closed_form import ClosedForm
from .correlation import Correlation
from .gradient import Gradient

OBJECTIVES: dict[str, type[Objective]] = {
    "gradient": Gradient,
    "correlation": Correlation,
    "closed-form": ClosedForm,
}

__all__ = ["OBJECTIVES", "Correlation", "Gradient", "Objective", "TrainingData", "make_objective"]


def make_objective(objective: str | Objective, **options) -> Objective:
    """The objective called `objective` (or `objective` itself), given the `options` it declares as fields;
    options it does not have are ignored, so one set of options serves every objective."""
    if isinstance(objective, Objective):
        return objective
    if objective not in OBJECTIVES:
        raise UsageError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}.",
                         parameter="objective")
    cls = OBJECTIVES[objective]
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in names})
