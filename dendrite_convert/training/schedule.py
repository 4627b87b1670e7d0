"""When to add a dendrite and when to stop: the phase state machine of docs/design.md §4, without torch.

It follows the peer's switching rules (docs/algorithm.md §3): a neuron phase trains the
network; when validation has not improved for `patience` epochs (an improvement must beat the old
score by a relative *and* an absolute threshold) — or every `switch_every` epochs — every target gets
one more dendrite. The new architecture must beat the global best during its cycle; if it does not,
it is retried once with fresh weights from the best model, and then the best model is restored and
training ends. `capacity_test` adds a dendrite every epoch, three times, keeping every one.

The trainer calls `observe(val)` after each neuron epoch and carries out the returned `Decision`;
all state is plain data (`to_dict`/`from_dict`) so it goes into the checkpoint for `--resume`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..core.errors import UsageError
from ..core.words import plural

# The peer's improvement_threshold (relative, indexed by the dendrite count) and improvement_threshold_raw.
DEFAULT_THRESHOLDS = (0.001, 0.0001, 0.0)
DEFAULT_RAW_THRESHOLD = 1e-5
CAPACITY_TEST_DENDRITES = 3


@dataclass(frozen=True)
class ScheduleConfig:
    patience: int = 10
    switch_every: int | None = None  # fixed switching instead of patience
    max_dendrites: int = 100
    max_epochs: int = 100
    capacity_test: bool = False
    maximize: bool = True
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    raw_threshold: float = DEFAULT_RAW_THRESHOLD
    dendrite_phase_epochs: int = 0  # epochs a switch itself takes (1 for the correlation objective)

    def __post_init__(self):
        if self.patience < 1:
            raise UsageError(f"patience must be at least 1, not {self.patience}.", parameter="patience")
        if self.switch_every is not None and self.switch_every < 1:
            raise UsageError(f"switch_every must be at least 1, not {self.switch_every}.", parameter="switch_every")
        if self.max_dendrites < 0:
            raise UsageError(f"max_dendrites must be 0 or more, not {self.max_dendrites}.", parameter="max_dendrites")
        if self.max_epochs < 1:
            raise UsageError(f"max_epochs must be at least 1, not {self.max_epochs}.", parameter="max_epochs")
        if not self.thresholds:
            raise UsageError("thresholds must not be empty.", parameter="thresholds")


@dataclass(frozen=True)
class Decision:
    """What the trainer does after an epoch.

    `action`: "continue"; "add" (restore the best model, add a dendrite to every target); "retry"
    (the new architecture never beat the best: restore the best, add a fresh dendrite); "stop"
    (restore the best model unless `restore` is False, and end). `save_best`: this epoch is the new best.
    """

    action: str
    save_best: bool
    reason: str = ""
    restore: bool = True


@dataclass
class Schedule:
    config: ScheduleConfig
    epoch: int = 0  # epochs run (neuron epochs and dendrite phases)
    dendrites: int = 0  # dendrites per target in the current model
    cycle_start: int = 0  # epoch of the last switch
    cycle_best: float | None = None
    cycle_set_global_best: bool = False
    epoch_last_improved: int = 0
    best: float | None = None  # global best validation score
    best_epoch: int = 0
    best_dendrites: int = 0
    tries: int = 0  # retries of the current dendrite count
    done: bool = False
    stop_reason: str = ""
    switches: list[dict] = field(default_factory=list)  # {"epoch", "dendrites", "kind": add|retry}

    def beats(self, new: float, old: float | None) -> bool:
        """The peer's `score_beats_current_best`: relative and absolute margin, both required.

        The relative margin is taken of |old|, so it also holds for negative scores (the default -loss),
        where the peer's `new * (1 - rel) > old` would accept any improvement at all.
        """
        if old is None:
            return not math.isnan(new)
        cfg = self.config
        rel = cfg.thresholds[min(len(cfg.thresholds) - 1, self.dendrites)]
        gain = new - old if cfg.maximize else old - new
        return gain > rel * abs(old) and gain > cfg.raw_threshold

    def observe(self, val: float) -> Decision:
        """Record one neuron epoch's validation score and decide what happens next."""
        if self.done:
            raise RuntimeError("the schedule has already stopped")
        cfg = self.config
        self.epoch += 1
        save_best = False
        if self.beats(val, self.cycle_best):
            self.cycle_best = val
            self.epoch_last_improved = self.epoch
            if self.beats(val, self.best):
                self.best, self.best_epoch, self.best_dendrites = val, self.epoch, self.dendrites
                self.cycle_set_global_best = True
                save_best = True
        if cfg.capacity_test:
            return self._capacity_test_step(val)
        if self._switch_time():
            if not self.cycle_set_global_best:
                if self.tries < 1:
                    self.tries += 1
                    self._switch("retry", self.best_dendrites + 1)
                    return self._within_budget(Decision("retry", save_best))
                return self._stop(save_best, f"{plural(self.dendrites, 'dendrite')} did not beat the best score after a retry")
            if self.dendrites >= cfg.max_dendrites:
                return self._stop(save_best, f"reached --max-dendrites {cfg.max_dendrites}")
            self.tries = 0
            self._switch("add", self.dendrites + 1)
            return self._within_budget(Decision("add", save_best))
        return self._within_budget(Decision("continue", save_best))

    def abort(self, reason: str) -> Decision:
        """An epoch that cannot be scored (a non-finite loss): stop and restore the best model."""
        self.epoch += 1
        return self._stop(False, reason)

    def note_dendrite_phase(self) -> None:
        """A dendrite phase (correlation objective) counts as an epoch but not towards patience."""
        self.epoch += 1
        self.cycle_start = self.epoch_last_improved = self.epoch

    @property
    def epochs_left(self) -> int:
        return max(0, self.config.max_epochs - self.epoch)

    def _switch_time(self) -> bool:
        in_cycle = self.epoch - self.cycle_start
        if self.config.switch_every is not None:
            return in_cycle >= self.config.switch_every
        patience = self.config.patience
        return self.epoch - self.epoch_last_improved >= patience and in_cycle >= patience

    def _switch(self, kind: str, dendrites: int) -> None:
        self.switches.append({"epoch": self.epoch, "dendrites": dendrites, "kind": kind})
        self.dendrites = dendrites
        self.cycle_start = self.epoch_last_improved = self.epoch
        self.cycle_best = None
        self.cycle_set_global_best = False

    def _capacity_test_step(self, val: float) -> Decision:
        # The peer's testing_dendrite_capacity: switch every epoch, keep every dendrite (the latest model is
        # the one kept), stop after three.
        self.best, self.best_epoch, self.best_dendrites = val, self.epoch, self.dendrites
        if self.dendrites >= CAPACITY_TEST_DENDRITES:
            return self._stop(True, f"capacity test passed: {CAPACITY_TEST_DENDRITES} dendrites added and trained",
                              restore=False)
        self._switch("add", self.dendrites + 1)
        return self._within_budget(Decision("add", True, restore=False))

    def _within_budget(self, decision: Decision) -> Decision:
        # A switch needs its own dendrite phase (if any) plus at least one epoch to train the new dendrites.
        needed = 0 if decision.action == "continue" else self.config.dendrite_phase_epochs
        if self.epoch + needed < self.config.max_epochs:
            return decision
        if decision.action != "continue":  # the switch was planned but there is no epoch left to train it
            self.switches.pop()
            self.dendrites = self.best_dendrites if decision.restore else self.dendrites - 1
        return self._stop(decision.save_best, f"reached --max-epochs {self.config.max_epochs}",
                          restore=decision.restore)

    def _stop(self, save_best: bool, reason: str, restore: bool = True) -> Decision:
        self.done, self.stop_reason = True, reason
        if restore:
            self.dendrites = self.best_dendrites
        return Decision("stop", save_best, reason, restore)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["config"]["thresholds"] = list(self.config.thresholds)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Schedule:
        data = dict(data)
        config = dict(data.pop("config"))
        config["thresholds"] = tuple(config["thresholds"])
        return cls(ScheduleConfig(**config), **data)
