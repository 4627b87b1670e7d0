"""`Growth`: the schedule carried out on a model in place, by an objective; the one growth path.

`dendrite-train` (also under DDP) and both callbacks call `observe(model, value)` once per epoch (or
evaluation): the best state is kept as a CPU snapshot, and when the schedule says so the best state is put
back in place and the objective grows every target by one dendrite. Loops that are not ours cannot swap
the model object (the loop, the optimizer and the accelerator hold references to it), hence in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import replace

from torch import nn

from ..core.errors import UsageError
from ..core.structure import Snapshot, max_dendrites, restore, snapshot
from .objectives import Objective, TrainingData, make_objective
from .schedule import Decision, Schedule, ScheduleConfig

# The loop's own training batches and loss, opened around one growth step (and closed after it).
TrainingDataSource = Callable[[nn.Module], AbstractContextManager[TrainingData]]


class Growth:
    """Runs `Schedule` on a model in place: snapshot the best, restore and grow on add/retry, restore at the end.

    `observe(model, value)` returns the schedule's `Decision` after carrying it out; the caller then
    rebuilds its optimizer when `decision.action` is "add" or "retry" and stops on "stop".

    Args:
        objective: how dendrites grow (`objectives.OBJECTIVES` name or instance).
        training_data: opens the loop's training batches and loss for a model, for objectives that need
            them (`Objective.needs_data`); the callbacks and `dendrite-train` supply it.
    """

    def __init__(self, config: ScheduleConfig, objective: str | Objective = "gradient",
                 training_data: TrainingDataSource | None = None):
        self.objective = make_objective(objective)
        self.schedule = Schedule(replace(config, dendrite_phase_epochs=self.objective.dendrite_phase_epochs))
        self.training_data = training_data
        self.best: Snapshot | None = None
        self.history: list[dict] = []  # {"step", "value", "dendrites", "action"}
        self.initial: int | None = None  # dendrites per target when growth started
        self.at_best = False  # the model holds the best state, as the last decision left it (until it trains again)

    def start(self, model: nn.Module) -> None:
        """Record the model's initial dendrite count (once; not again after a resume) and freeze what the
        objective keeps frozen (again after a resume, whose dendrites were rebuilt trainable)."""
        if self.training_data is None and self.objective.needs_data(model):
            raise UsageError(f"the {self.objective.name} objective grows these dendrites from the training loss "
                             "(channel-selective dendrites choose their channels from it), which this loop does not "
                             "give; train with dendrite-train or the DendriteCallback of transformers or Lightning.")
        if self.initial is None:
            self.initial = max_dendrites(model)
            self.schedule.dendrites = self.schedule.best_dendrites = self.initial
        self.objective.freeze_grown(model, self.initial)

    @property
    def done(self) -> bool:
        return self.schedule.done

    def observe(self, model: nn.Module, value: float, step: int | None = None) -> Decision:
        """Record one epoch's (or evaluation's) monitored value and carry out the schedule's decision."""
        if self.initial is None:
            self.start(model)
        dendrites = self.schedule.dendrites
        if not math.isfinite(value):
            decision = self.schedule.abort(f"the monitored metric became {value}")
        else:
            decision = self.schedule.observe(value)
        self.history.append({"step": step, "value": value, "dendrites": dendrites, "action": decision.action})
        self._carry_out(model, decision)
        return decision

    def abort(self, model: nn.Module, reason: str) -> Decision:
        """Stop because an epoch could not be scored (a non-finite loss), restoring the best model."""
        decision = self.schedule.abort(reason)
        self._carry_out(model, decision)
        return decision

    def _carry_out(self, model: nn.Module, decision: Decision) -> None:
        self.at_best = decision.save_best
        if decision.save_best:
            self.best = snapshot(model)
        if decision.action in ("add", "retry"):
            if decision.restore and self.best is not None:
                restore(model, self.best)
            self._grow(model)
            self.at_best = False
        elif decision.action == "stop" and decision.restore:
            self.at_best = self.restore_best(model) or self.at_best

    def _grow(self, model: nn.Module) -> None:
        if self.objective.needs_data(model):
            with self.training_data(model) as data:
                self.objective.grow(model, data)
        else:
            self.objective.grow(model, None)
        for _ in range(self.objective.dendrite_phase_epochs):
            self.schedule.note_dendrite_phase()

    def restore_best(self, model: nn.Module) -> bool:
        """Put the best recorded state back; False when nothing was recorded yet."""
        if self.best is None:
            return False
        restore(model, self.best)
        return True

    @property
    def best_value(self) -> float | None:
        return self.schedule.best

    def state_dict(self) -> dict:
        """Plain data plus the best weights (tensors): what a checkpoint needs to resume the schedule."""
        return {
            "schedule": self.schedule.to_dict(),
            "history": list(self.history),
            "started": self.initial is not None,
            "initial_dendrites": self.initial,
            "best_counts": None if self.best is None else dict(self.best.counts),
            "best_state": None if self.best is None else self.best.state,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.schedule = Schedule.from_dict(state["schedule"])
        self.history = list(state.get("history", []))
        started = bool(state.get("started", True))
        self.initial = state.get("initial_dendrites", 0) if started else None
        if state.get("best_state") is not None:
            self.best = Snapshot(dict(state["best_counts"]), dict(state["best_state"]))


def carry_lr_schedule(old, new) -> None:
    """Continue an LR schedule on a rebuilt optimizer: `new` takes `old`'s step count and current LRs.

    The schedule is a function of the step (warm-up, decay); a restructure changes the parameters,
    not where training is in its schedule. Different scheduler types are left as built.
    """
    if old is None or new is None or type(old) is not type(new):
        return
    try:
        new.load_state_dict(old.state_dict())
    except (KeyError, ValueError, TypeError, RuntimeError):
        return
    lrs = new.get_last_lr() if hasattr(new, "get_last_lr") else None
    optimizer = getattr(new, "optimizer", None)
    if lrs and optimizer is not None and len(lrs) == len(optimizer.param_groups):
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
