"""Which output channels a channel-selective dendrite serves: those with the largest remaining error.

With the network frozen, the error signal e = dloss/dy of a target is recorded over training batches
(training/error_signal.py). A dendrite added to channel c with the best scale can remove at most
corr(h, e_c)^2 · var(e_c) of that channel's error, so with no candidate trained yet the channels worth a
dendrite are those where var(e_c) is largest: the denominator of the correlation statistic the candidates
then maximise. Means are removed because a constant error is the bias's job, not a dendrite's.
"""

from __future__ import annotations

import torch

from .layers import DendriteLayer


def flat(t: torch.Tensor, layer: DendriteLayer) -> torch.Tensor:
    """[..., C, ...] -> [n, C] with n over every non-channel axis (samples, and positions for convs)."""
    axis = layer.channel_axis(t.ndim)
    return t.movedim(axis, -1).reshape(-1, t.shape[axis])


class ErrorMoments:
    """Per-channel count, sum and sum of squares of a target's error signals: their variance, computed
    batch by batch, without keeping the signals (the gradient objective only needs this)."""

    def __init__(self, layer: DendriteLayer):
        self.layer = layer
        self.count, self.total, self.squares = 0, 0.0, 0.0

    def add(self, e: torch.Tensor) -> None:
        e = flat(e, self.layer)
        e = e.double() if e.device.type != "mps" else e.float()  # MPS has no float64
        self.count, self.total, self.squares = self.count + e.shape[0], self.total + e.sum(0), self.squares + e.square().sum(0)

    def top_channels(self) -> torch.Tensor | None:
        """The `layer.width` channels with the largest error variance, sorted; None before any signal (a
        target that does not reach the loss keeps the placeholder channels of `add_dendrite`)."""
        if not self.count:
            return None
        variance = self.squares / self.count - (self.total / self.count).square()
        return variance.topk(self.layer.width).indices.sort().values


def select_channels(layer: DendriteLayer, errors: list[torch.Tensor]) -> torch.Tensor | None:
    """`ErrorMoments.top_channels` of recorded error signals; None for a layer that is not channel-selective."""
    if layer.dendrite_channels is None:
        return None
    moments = ErrorMoments(layer)
    for e in errors:
        moments.add(e)
    return moments.top_channels()
