"""Cheap dendrites (low rank): a dendrite that costs a fraction of its layer.

A full dendrite copies its layer, so k dendrites cost about (1+k)x the base model. A rank-R dendrite
of a Linear is B·A (in -> R -> out); of a ConvNd, a conv with R output channels and the layer's
kernel/stride/padding/dilation followed by a 1x1 conv to the layer's channels. The first factor gets
the layer type's default initialisation and the second N(0, init_std^2), so the product starts as
small as a full dendrite's output while both factors still receive gradient once the scale moves.
"""

from __future__ import annotations

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def low_rank_dendrite(base: nn.Module, rank: int, init_std: float) -> nn.Module | None:
    """A rank-`rank` dendrite for `base`, or None when that would not be cheaper than a full copy."""
    weight = base.weight
    factory = {"device": weight.device, "dtype": weight.dtype}
    has_bias = getattr(base, "bias", None) is not None
    if isinstance(base, nn.Linear) or type(base).__name__ == "Conv1D":
        n_in, n_out = (base.in_features, base.out_features) if isinstance(base, nn.Linear) else weight.shape
        if rank * (n_in + n_out) >= n_in * n_out:
            return None
        first, second = nn.Linear(n_in, rank, bias=False, **factory), nn.Linear(rank, n_out, bias=has_bias, **factory)
    elif isinstance(base, _CONVS) and base.groups == 1 and isinstance(base.padding, tuple):
        kernel = weight[0].numel()  # in_channels * prod(kernel_size)
        if rank * (kernel + base.out_channels) >= kernel * base.out_channels:
            return None
        conv = type(base)
        first = conv(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                     bias=False, padding_mode=base.padding_mode, **factory)
        second = conv(rank, base.out_channels, 1, bias=has_bias, **factory)
    else:
        return None
    with torch.no_grad():
        for p in second.parameters():
            p.normal_(0.0, init_std)
    return nn.Sequential(first, second)


def added_parameters(base: nn.Module, rank: int | None) -> int:
    """Parameters one dendrite adds besides its scale and cascade: the formula the tests check."""
    weight = base.weight
    bias = weight.shape[1 if type(base).__name__ == "Conv1D" else 0] if getattr(base, "bias", None) is not None else 0
    dendrite = low_rank_dendrite(base, rank, 0.01) if rank else None
    if dendrite is None:
        return weight.numel() + bias
    first, second = dendrite
    return first.weight.numel() + second.weight.numel() + bias
