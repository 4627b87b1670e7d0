"""The gradient objective (the open-source peer): dendrites start at scale 0 and train jointly with the
network on the task loss; a channel-selective dendrite serves the channels where the error is largest."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core.layers import dendrite_layers
from ...core.structure import add_dendrites, selective
from ..error_signal import error_ranked_channels
from .base import Objective, TrainingData


@dataclass(frozen=True)
class Gradient(Objective):
    """Grow fresh dendrites; nothing is frozen.

    Args:
        samples: training samples whose error signal ranks the channels of channel-selective targets.
    """

    name = "gradient"
    samples: int = 4096

    def needs_data(self, model: nn.Module) -> bool:
        return selective(model)

    def grow(self, model: nn.Module, data: TrainingData | None) -> None:
        channels = None
        if data is not None:
            channels = error_ranked_channels(model, dendrite_layers(model), data.batches, data.loss, self.samples)
        add_dendrites(model, channels)
