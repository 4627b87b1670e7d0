"""Which output channels a channel-selective dendrite serves: those with the largest remaining error.

With the network frozen, the error signal e = dloss/dy of a target is recorded over training batches
(correlation.record_error_signals). A dendrite added to channel c with the best scale can remove at most
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


def error_variance(layer: DendriteLayer, errors: list[torch.Tensor]) -> torch.Tensor:
    """Per output channel, the variance of the recorded error signals (over samples and positions)."""
    count, total, squares = 0, 0.0, 0.0
    for e in errors:
        e = flat(e, layer).double()
        count, total, squares = count + e.shape[0], total + e.sum(0), squares + e.square().sum(0)
    mean = total / count
    return squares / count - mean.square()


def select_channels(layer: DendriteLayer, errors: list[torch.Tensor]) -> torch.Tensor | None:
    """The `layer.width` channels with the largest error variance, sorted; None for a layer that is not
    channel-selective or that recorded no error (it then keeps the placeholder of `add_dendrite`)."""
    if layer.dendrite_channels is None or not errors:
        return None
    return error_variance(layer, errors).topk(layer.width).indices.sort().values
