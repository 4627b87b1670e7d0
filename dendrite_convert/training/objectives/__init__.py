"""Objectives: how dendrites learn, one class each, registered by the name users choose them with.

Adding one: write `objectives/<name>.py` with a subclass of `Objective` (see docs/objectives.md) and add
its line to `REGISTRY`; `dendrite-train --objective`, DDP and both callbacks pick it up from here.
`REGISTRY` says where each class is and what it does without importing it, so `dendrite-train --help`
lists the objectives without loading torch; the classes are imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from dataclasses import fields

from ...core.errors import UsageError

REGISTRY: dict[str, tuple[str, str]] = {  # name: (module:Class, the one phrase `dendrite-train --help` shows)
    "gradient": ("gradient:Gradient", "dendrites train jointly with the network on the task loss"),
    "correlation": ("correlation:Correlation",
                    "candidates fit the error signal with the network frozen; the best is inserted frozen"),
    "closed-form": ("closed_form:ClosedForm",
                    "fitted in closed form to the error signal, so the loss drops at insertion; then trains with the network"),
}

_LAZY = {"Objective": "base", "TrainingData": "base", "ClosedForm": "closed_form", "Correlation": "correlation",
         "Gradient": "gradient"}

__all__ = ["OBJECTIVES", "REGISTRY", "ClosedForm", "Correlation", "Gradient", "Objective", "TrainingData", "make_objective"]


def __getattr__(name: str):
    if name == "OBJECTIVES":  # name -> class, built once; callers (and tests) may register more in it
        value = {key: _load(path) for key, (path, _) in REGISTRY.items()}
    elif name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def _load(path: str) -> type:
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def make_objective(objective, **options):
    """The objective called `objective` (or `objective` itself, an `Objective`), given the `options` it
    declares as fields; options it does not have are ignored, so one set of options serves every objective."""
    from . import OBJECTIVES, Objective

    if isinstance(objective, Objective):
        return objective
    if objective not in OBJECTIVES:
        raise UsageError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}.",
                         parameter="objective")
    cls = OBJECTIVES[objective]
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in names})
