"""What an objective is: how dendrites learn, as one object every training loop calls the same way.

`dendrite-train` (also under DDP) and both callbacks hold one `Objective` and ask it three things:

- `grow(model, data)`: add one dendrite to every target, in place, with its scale at 0 so the model's
  function is unchanged; `data` gives the loop's own training batches and loss when `needs_data(model)`;
- `freeze_grown(model, first)`: what stays frozen during neuron phases, among dendrites `first` and later
  (neuron phases otherwise train the network and every dendrite's scale);
- `dendrite_phase_epochs`: epochs a growth step takes as a phase of its own (recorded as a "dendrite" row).

A new objective is a subclass in its own file plus one line in `REGISTRY` (objectives/__init__.py); its
options are dataclass fields, filled from `TrainConfig` or a callback's arguments by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from . import REGISTRY


@dataclass(frozen=True)
class TrainingData:
    """The loop's training batches and its loss on one batch: where an objective reads the error signal."""

    batches: Iterable
    loss: Callable[[object], torch.Tensor | None]


class Objective(ABC):
    """How dendrites learn (docs/design.md §4); subclasses are frozen dataclasses whose fields are their options."""

    name: ClassVar[str]
    help: ClassVar[str]  # one phrase for `dendrite-train --help`: a registered class's is its REGISTRY line's
    dendrite_phase_epochs: ClassVar[int] = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        entry = REGISTRY.get(cls.__dict__.get("name"))
        if entry is not None and "help" not in cls.__dict__:
            cls.help = entry[1]

    def needs_data(self, model: nn.Module) -> bool:
        """Whether `grow` needs the loop's training batches and loss for this model."""
        return True

    @abstractmethod
    def grow(self, model: nn.Module, data: TrainingData | None) -> None:
        """Add one dendrite (scale 0) to every target of `model` in place."""

    def freeze_grown(self, model: nn.Module, first: int) -> None:
        """Freeze what neuron phases must not train among dendrites `first` and later; by default nothing."""
