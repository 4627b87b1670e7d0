"""`Growth`: the schedule applied to a model in place, for loops that are not ours (Trainer, Lightning).

Both callbacks are thin wrappers around it, and give it the loop's loss when the model's dendrites
are channel-selective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..core.errors import UsageError
from .schedule import Decision, Schedule, ScheduleConfig
from ..core.structure import Snapshot, add_dendrites, max_dendrites, restore, selective, snapshot


class Growth:
    """Runs `Schedule` on a model in place: snapshot the best, restructure on add/retry, restore at the end.

    `observe(model, value)` returns the schedule's `Decision` after carrying it out; the caller then
    rebuilds its optimizer when `decision.action` is "add" or "retry" and stops on "stop".
    """

    def __init__(self, config: ScheduleConfig,
                 rank_channels: Callable[[nn.Module], Mapping[str, torch.Tensor]] | None = None):
        self.schedule = Schedule(config)
        # channel-selective models: the channels each new dendrite serves, from the loop's own loss and
        # training batches (correlation.error_ranked_channels); the callbacks supply it
        self.rank_channels = rank_channels
        self.best: Snapshot | None = None
        self.history: list[dict] = []  # {"step", "value", "dendrites", "action"}
        self._started = False

    def start(self, model: nn.Module) -> None:
        """Record the model's initial dendrite count (once; not again after a resume)."""
        if self.rank_channels is None and selective(model):
            raise UsageError("channel-selective dendrites (--dendrite-channels) choose their channels from the "
                             "training loss, which this loop does not give; train with dendrite-train or the "
                             "DendriteCallback of transformers or Lightning.")
        if not self._started:
            self.schedule.dendrites = self.schedule.best_dendrites = max_dendrites(model)
            self._started = True

    @property
    def done(self) -> bool:
        return self.schedule.done

    def observe(self, model: nn.Module, value: float, step: int | None = None) -> Decision:
        self.start(model)
        dendrites = self.schedule.dendrites
        if not math.isfinite(value):
            decision = self.schedule.abort(f"the monitored metric became {value}")
        else:
            decision = self.schedule.observe(value)
        if decision.save_best:
            self.best = snapshot(model)
        self.history.append({"step": step, "value": value, "dendrites": dendrites, "action": decision.action})
        if decision.action in ("add", "retry"):
            if decision.restore and self.best is not None:
                restore(model, self.best)
            add_dendrites(model, self.rank_channels(model) if self.rank_channels and selective(model) else None)
        elif decision.action == "stop" and decision.restore:
            self.restore_best(model)
        return decision

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
            "started": self._started,
            "best_counts": None if self.best is None else dict(self.best.counts),
            "best_state": None if self.best is None else self.best.state,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.schedule = Schedule.from_dict(state["schedule"])
        self.history = list(state.get("history", []))
        self._started = bool(state.get("started", True))
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
