"""`TrainConfig`: how `train` alternates phases (docs/design.md §4); defaults follow the peer."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..core.errors import UsageError
from .device import check_device_name
from .objectives import OBJECTIVES, Objective, make_objective
from .precision import check_precision
from .schedule import ScheduleConfig


HARDWARE = ("device", "precision", "compile")


@dataclass
class TrainConfig:
    """How `dendrite-train` alternates phases (docs/design.md §4); defaults follow the peer."""

    objective: str = "gradient"  # a name in objectives.OBJECTIVES: gradient | correlation | closed-form
    candidates: int = 4  # correlation: candidate dendrites per target
    patience: int = 10  # epochs without improvement before a switch
    switch_every: int | None = None  # switch every N epochs instead
    max_dendrites: int = 100
    max_epochs: int = 100
    capacity_test: bool = False
    seed: int = 0
    correlation_epochs: int = 20  # candidate-training passes over the recorded samples
    correlation_samples: int = 4096  # training samples recorded per dendrite phase (and to rank channels)
    plot: bool = True  # draw training.png at the end (needs Pillow, the `plots` extra)
    # Checkpoint (and outputs) after every epoch, unless epochs are so short that this would cost more than
    # this fraction of the training time: then after every few epochs, so a crash loses at most about
    # (checkpoint time / checkpoint_budget) seconds, e.g. 0.3 s for digits. Switches and the end always write.
    checkpoint_budget: float = 0.05
    # Hardware (how, not what: a resumed run may change them). device: auto | cpu | cuda | cuda:N | mps
    # (auto: CUDA, then MPS, then CPU); under torchrun each rank keeps its own GPU.
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (torch.autocast; fp16 with a gradient scaler)
    compile: bool = False  # torch.compile the training step (again after each dendrite added)
    # Correlation: the recorded error signals and candidate work held at once stay within this many MB; targets
    # whose recordings do not fit together are recorded in turn, and one larger than this records fewer samples.
    correlation_memory_mb: int = 512
    # Closed-form (objectives/closed_form.py): the fit's order (2 or 1) and ridge, and where to grow: only the
    # grow_top_k targets with the largest predicted loss decrease per added parameter (None: all), and only
    # those scoring at least grow_min_score times the best.
    closed_form_order: int = 2
    closed_form_ridge: float = 1e-3
    grow_top_k: int | None = None
    grow_min_score: float = 0.0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise UsageError(f"objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}.",
                             parameter="objective")
        for name in ("candidates", "patience", "max_epochs", "correlation_epochs", "correlation_samples"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, not {getattr(self, name)}.", parameter=name)
        if self.switch_every is not None and self.switch_every < 1:
            raise UsageError(f"switch_every must be at least 1, not {self.switch_every}.", parameter="switch_every")
        if self.max_dendrites < 0:
            raise UsageError(f"max_dendrites must be 0 or more, not {self.max_dendrites}.", parameter="max_dendrites")
        check_device_name(self.device)
        check_precision(self.precision)
        if self.correlation_memory_mb < 1:
            raise UsageError(f"correlation_memory_mb must be at least 1, not {self.correlation_memory_mb}.",
                             parameter="correlation_memory_mb")
        _check_closed_form(self)
        if not self.checkpoint_budget > 0:
            raise UsageError(f"checkpoint_budget must be positive, not {self.checkpoint_budget}.",
                             parameter="checkpoint_budget")

    def with_hardware(self, hardware: dict) -> TrainConfig:
        """This config on other hardware: `hardware` may set device, precision and compile, which change where
        and how fast a run trains, not what it is (a resumed run may change them)."""
        unknown = sorted(set(hardware) - set(HARDWARE))
        if unknown:
            raise UsageError(f"only {', '.join(HARDWARE)} can change when a run resumes, not {', '.join(unknown)}.")
        return replace(self, **hardware)

    def schedule_config(self, maximize: bool) -> ScheduleConfig:
        return ScheduleConfig(
            patience=self.patience, switch_every=self.switch_every, max_dendrites=self.max_dendrites,
            max_epochs=self.max_epochs, capacity_test=self.capacity_test, maximize=maximize,
        )

    def make_objective(self) -> Objective:
        """The objective, given the options of this config that it declares."""
        return make_objective(self.objective, candidates=self.candidates, epochs=self.correlation_epochs,
                              memory_mb=self.correlation_memory_mb,
                              **{option: getattr(self, name) for name, option in _CLOSED_FORM.items()})


# TrainConfig's name of each closed-form option (ClosedForm's field names are the objective's own)
_CLOSED_FORM = {"closed_form_order": "order", "closed_form_ridge": "ridge", "grow_top_k": "top_k",
                "grow_min_score": "min_relative_score", "correlation_samples": "samples"}


def _check_closed_form(config: TrainConfig) -> None:
    """ClosedForm checks its options; a bad one is reported under TrainConfig's name for it."""
    try:
        OBJECTIVES["closed-form"](**{option: getattr(config, name) for name, option in _CLOSED_FORM.items()})
    except UsageError as error:
        name = next(n for n, option in _CLOSED_FORM.items() if option == error.parameter)
        raise UsageError(name + str(error)[len(error.parameter):], parameter=name) from None
