"""Cheap dendrites: low-rank ones, and channel-selective ones that serve only some output channels.

A full dendrite copies its layer, so k dendrites cost about (1+k)x the base model. Two ways to pay less,
which combine:

- rank R: a dendrite of a Linear is B·A (in -> R -> out); of a ConvNd, a conv with R output channels and
  the layer's kernel/stride/padding/dilation followed by a 1x1 conv. The first factor gets the layer
  type's default initialisation and the second N(0, init_std^2), so the product starts as small as a full
  dendrite's output while both factors still receive gradient once the scale moves;
- width m < C: the dendrite computes only m of the layer's C output channels (which ones is chosen when
  it is added, see channels.py) and its output is added to those channels alone.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVS_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def is_hf_conv1d(module: nn.Module) -> bool:
    # Checked by name so that importing this package never imports transformers.
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def out_channels(base: nn.Module) -> int:
    if isinstance(base, nn.Linear):
        return base.out_features
    return base.nf if is_hf_conv1d(base) else base.out_channels


def narrowable(base: nn.Module) -> bool:
    """Whether a dendrite of `base` can compute a subset of its output channels. Grouped convs cannot, nor
    layers whose weight is computed from other parameters (weight or spectral norm, old hook-based or
    parametrized): their dendrites serve every channel."""
    plain = isinstance(base._parameters.get("weight"), nn.Parameter)
    return plain and (isinstance(base, nn.Linear) or is_hf_conv1d(base) or getattr(base, "groups", 0) == 1)


def dendrite_width(base: nn.Module, fraction: float | None) -> int:
    """Output channels of one dendrite: ceil(fraction·C), or all C without a fraction."""
    channels = out_channels(base)
    if fraction is None or not narrowable(base):
        return channels
    return max(1, min(channels, math.ceil(fraction * channels - 1e-9)))


def narrow_copy(base: nn.Module, width: int) -> nn.Module:
    """A copy of `base` with only its first `width` output channels (the weights are re-drawn by the caller)."""
    if width == out_channels(base):
        return copy.deepcopy(base)
    axis = 1 if is_hf_conv1d(base) or isinstance(base, _CONVS_T) else 0  # Conv1D and ConvTransposeNd: [in, out, ...]
    narrowed = {id(base.weight): nn.Parameter(base.weight.detach().narrow(axis, 0, width).clone())}
    if base.bias is not None:
        narrowed[id(base.bias)] = nn.Parameter(base.bias.detach()[:width].clone())
    layer = copy.deepcopy(base, memo=narrowed)  # the memo hands deepcopy the narrow tensors: the full ones are never copied
    if isinstance(base, nn.Linear):
        layer.out_features = width
    elif is_hf_conv1d(base):
        layer.nf = width
    else:
        layer.out_channels = width
    return layer


def low_rank_dendrite(base: nn.Module, rank: int, init_std: float, width: int | None = None) -> nn.Module | None:
    """A rank-`rank` dendrite for `base` with `width` outputs, or None when that is not cheaper than a full one."""
    weight = base.weight
    factory = {"device": weight.device, "dtype": weight.dtype}
    has_bias = getattr(base, "bias", None) is not None
    n_out = width or out_channels(base)
    if isinstance(base, nn.Linear) or is_hf_conv1d(base):
        n_in = base.in_features if isinstance(base, nn.Linear) else weight.shape[0]
        if rank * (n_in + n_out) >= n_in * n_out:
            return None
        first, second = nn.Linear(n_in, rank, bias=False, **factory), nn.Linear(rank, n_out, bias=has_bias, **factory)
    elif isinstance(base, _CONVS) and base.groups == 1 and isinstance(base.padding, tuple):
        kernel = weight[0].numel()  # in_channels * prod(kernel_size)
        if rank * (kernel + n_out) >= kernel * n_out:
            return None
        conv = type(base)
        first = conv(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                     bias=False, padding_mode=base.padding_mode, **factory)
        second = conv(rank, n_out, 1, bias=has_bias, **factory)
    else:
        return None
    with torch.no_grad():
        for p in second.parameters():
            p.normal_(0.0, init_std)
    return nn.Sequential(first, second)


def added_parameters(base: nn.Module, rank: int | None, fraction: float | None = None) -> int:
    """Parameters one dendrite adds besides its scale and cascade: the formula the tests check."""
    width = dendrite_width(base, fraction)
    bias = width if getattr(base, "bias", None) is not None else 0
    dendrite = low_rank_dendrite(base, rank, 0.01, width) if rank else None
    if dendrite is None:
        return base.weight.numel() * width // out_channels(base) + bias
    first, second = dendrite
    return first.weight.numel() + second.weight.numel() + bias
