"""The dendrite layer of docs/design.md §2, in one file.

After k dendrites a target computes, per output channel c:

    h_i = a(D_i(x) + sum_{j<i} u_ij[c] * h_j)
    y   = N(W x + b) + sum_{i<k} s_i[c] * h_i

A channel-selective dendrite (cheap.py) serves only the channels c in its set S_i: h_i, s_i and u_ij
exist for c in S_i only, and h_j reaches dendrite i on the channels the two sets share.
`N` is an optional norm that follows the layer (conv -> BatchNorm is one neuron: each dendrite
D_i is then a copy of the pair). A new dendrite gets weights ~ N(0, init_std^2) and a zero scale,
so adding one leaves the network function unchanged. Families differ only in where the channel
axis is and how many output channels they have; everything else lives in `DendriteLayer`.

All dendrite state is plain parameters whose names start with `dendrite_`, so optimizers,
freezing, state-dict filtering and the fold find them by name.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .cheap import dendrite_width, is_hf_conv1d, low_rank_dendrite, narrow_copy, out_channels

ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "identity": lambda z: z,
}


class DendriteLayer(nn.Module):
    """A target layer (`base_layer`, untouched) plus k dendrites with cascade and per-channel scales."""

    spatial_dims = 0  # ConvNd: N; Linear-like layers keep channels on the last axis

    def __init__(
        self,
        base_layer: nn.Module,
        norm: nn.Module | None = None,
        activation: str = "sigmoid",
        init_std: float = 0.01,
        rank: int | None = None,
        channel_fraction: float | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.base_layer = base_layer
        self.norm = norm
        self.activation = activation
        self.init_std = init_std
        self.rank = rank  # low-rank dendrites (cheap.py) where that is cheaper than a full copy
        self.channel_fraction = channel_fraction  # channel-selective dendrites (cheap.py): each serves this fraction
        self.width = dendrite_width(base_layer, channel_fraction)  # m: output channels of one dendrite
        self.dendrite_layers = nn.ModuleList()
        self.dendrite_scales = nn.ParameterList()  # entry i: [m], weight of h_i in the output
        self.dendrite_cascade = nn.ParameterList()  # entry i: [i, m], weights of h_j (j < i) into dendrite i
        # row i: the m output channels dendrite i serves (sorted); None when every dendrite serves all C
        selective = self.width < self.out_channels
        self.register_buffer("dendrite_channels", torch.zeros(0, self.width, dtype=torch.long, device=base_layer.weight.device) if selective else None)

    @property
    def out_channels(self) -> int:
        return out_channels(self.base_layer)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight: model code often reads `.weight.dtype`/`.device` (as PEFT allows)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def num_dendrites(self) -> int:
        return len(self.dendrite_layers)

    def channel_axis(self, ndim: int) -> int:
        """Channel axis of an output with `ndim` dims (convs also accept unbatched input)."""
        return ndim - self.spatial_dims - 1 if self.spatial_dims else ndim - 1

    def per_channel(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """View a [C] vector so it broadcasts over every axis of `like` except the channel axis."""
        shape = [1] * like.ndim
        shape[self.channel_axis(like.ndim)] = values.shape[0]
        return values.view(shape)

    def neuron(self, x: torch.Tensor) -> torch.Tensor:
        """The original computation: the wrapped layer and its paired norm, if any."""
        y = self.base_layer(x)
        return y if self.norm is None else self.norm(y)

    def cascade_in(self, z: torch.Tensor, cascade: torch.Tensor, earlier: list[torch.Tensor],
                   channels: torch.Tensor | None = None) -> torch.Tensor:
        """z + sum_j u_j * h_j: the cascade into a dendrite serving `channels` (a row of dendrite_channels)."""
        for j, h in enumerate(earlier):
            u = cascade[j]
            if channels is not None:  # h_j on dendrite i's channels; channels h_j lacks get no weight
                position, shared = channel_positions(self.dendrite_channels[j], channels)
                h, u = h.index_select(self.channel_axis(h.ndim), position), u * shared
            z = z + self.per_channel(u, z) * h
        return z

    def dendrite_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """h_0 .. h_{k-1}: each dendrite sees the layer input and the outputs of earlier dendrites."""
        act = ACTIVATIONS[self.activation]
        outputs: list[torch.Tensor] = []
        for i, (dendrite, cascade) in enumerate(zip(self.dendrite_layers, self.dendrite_cascade)):
            channels = None if self.dendrite_channels is None else self.dendrite_channels[i]
            outputs.append(act(self.cascade_in(dendrite(x), cascade, outputs, channels)))
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.neuron(x)
        if not self.dendrite_layers:  # a converted model without dendrites costs one extra call, nothing more
            return y
        for i, (scale, h) in enumerate(zip(self.dendrite_scales, self.dendrite_outputs(x))):
            term = self.per_channel(scale, h) * h
            if self.dendrite_channels is None:
                y = y + term
            else:
                y = add_to_channels(y, term, self.dendrite_channels[i], self.channel_axis(y.ndim))
        return y

    def new_dendrite(self) -> nn.Module:
        """A fresh dendrite: a copy of the neuron with weights ~ N(0, init_std^2) and fresh norm state.

        With `rank`, a low-rank dendrite of the same input/output shape instead (see cheap.py).
        """
        dendrite = low_rank_dendrite(self.base_layer, self.rank, self.init_std, self.width) if self.rank else None
        if dendrite is None:
            dendrite = narrow_copy(self.base_layer, self.width)
            with torch.no_grad():
                for p in dendrite.parameters():
                    p.normal_(0.0, self.init_std)
        dendrite.requires_grad_(True)
        if self.norm is None:
            return dendrite
        norm = copy.deepcopy(self.norm)
        if self.width < self.out_channels:
            weight = self.base_layer.weight
            norm = type(norm)(self.width, norm.eps, norm.momentum, norm.affine, norm.track_running_stats,
                              device=weight.device, dtype=weight.dtype).train(self.norm.training)
        for reset in ("reset_parameters", "reset_running_stats"):
            if hasattr(norm, reset):
                getattr(norm, reset)()
        norm.requires_grad_(True)
        return nn.Sequential(dendrite, norm)

    def add_dendrite(self, dendrite: nn.Module | None = None, cascade: torch.Tensor | None = None,
                     channels: torch.Tensor | None = None) -> nn.Module:
        """Append one dendrite with a zero output scale; the layer's function is unchanged.

        `dendrite`/`cascade` insert a trained candidate (correlation objective); by default a fresh
        random dendrite with zero cascade weights is added. A channel-selective layer takes the `width`
        channels the dendrite serves, in increasing order as the dendrite's outputs are (channels.py ranks
        them); without, the first `width` channels are a placeholder that a state dict being loaded overwrites.
        """
        weight = self.base_layer.weight
        k, width = self.num_dendrites, self.width
        dendrite = self.new_dendrite() if dendrite is None else dendrite
        if cascade is None:
            cascade = torch.zeros(k, width, device=weight.device, dtype=weight.dtype)
        if tuple(cascade.shape) != (k, width):
            raise ValueError(f"cascade must have shape {(k, width)}, got {tuple(cascade.shape)}")
        if self.dendrite_channels is None and channels is not None:
            raise ValueError("channels are for channel-selective layers; this one's dendrites serve every channel")
        if self.dendrite_channels is not None:
            row = torch.arange(width) if channels is None else channels.cpu()
            if not self.serves_valid_channels(row):
                raise ValueError(f"channels must be {width} increasing indices below {self.out_channels}")
            self.dendrite_channels = torch.cat([self.dendrite_channels, row[None].to(self.dendrite_channels)])
        self.dendrite_layers.append(dendrite)
        self.dendrite_scales.append(nn.Parameter(torch.zeros(width, device=weight.device, dtype=weight.dtype)))
        self.dendrite_cascade.append(nn.Parameter(cascade.detach().clone()))
        return dendrite

    def serves_valid_channels(self, row: torch.Tensor) -> bool:
        """Whether `row` is a channel set a dendrite may serve: `width` increasing indices below C."""
        return (row.shape == (self.width,) and not row.is_floating_point() and bool((row[1:] > row[:-1]).all())
                and 0 <= int(row[0]) and int(row[-1]) < self.out_channels)

    def truncate(self, k: int) -> None:
        """Keep the first `k` dendrites (the others are removed with their scales, cascades and channels)."""
        if self.num_dendrites <= k:
            return
        del self.dendrite_layers[k:]
        # ParameterList has no __delitem__: rebuild it with the kept parameters (same objects).
        self.dendrite_scales = nn.ParameterList(list(self.dendrite_scales)[:k])
        self.dendrite_cascade = nn.ParameterList(list(self.dendrite_cascade)[:k])
        if self.dendrite_channels is not None:
            self.dendrite_channels = self.dendrite_channels[:k].clone()

    def extra_repr(self) -> str:
        rank = f", rank={self.rank}" if self.rank else ""
        width = f", width={self.width}/{self.out_channels}" if self.dendrite_channels is not None else ""
        return f"dendrites={self.num_dendrites}, activation={self.activation}{rank}{width}"


def channel_positions(have: torch.Tensor, want: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each channel of `want` sits in the sorted set `have`, and whether it is there at all."""
    position = torch.searchsorted(have, want).clamp(max=have.numel() - 1)
    return position, have[position] == want


def add_to_channels(y: torch.Tensor, term: torch.Tensor, channels: torch.Tensor, axis: int) -> torch.Tensor:
    """y with `term` (m channels along `axis`) added to the channels listed in `channels` (a scatter-add:
    onnxruntime runs it as one ScatterElements, with no transposes)."""
    shape = [1] * term.ndim
    shape[axis] = channels.numel()
    return y.scatter_add(axis, channels.view(shape).expand_as(term), term)


class DendriteLinear(DendriteLayer):
    pass


class _DendriteConvNd(DendriteLayer):
    pass


class DendriteConv1d(_DendriteConvNd):
    spatial_dims = 1


class DendriteConv2d(_DendriteConvNd):
    spatial_dims = 2


class DendriteConv3d(_DendriteConvNd):
    spatial_dims = 3


class DendriteConvTranspose1d(_DendriteConvNd):
    """Transposed convs (U-Net up-sampling): the dendrite is another transposed conv of the same shape."""

    spatial_dims = 1


class DendriteConvTranspose2d(_DendriteConvNd):
    spatial_dims = 2


class DendriteConvTranspose3d(_DendriteConvNd):
    spatial_dims = 3


class DendriteHFConv1D(DendriteLayer):
    """transformers' `Conv1D` (GPT-2): a Linear with a transposed weight, channels last."""


TARGET_LAYERS: dict[type, type[DendriteLayer]] = {
    nn.Linear: DendriteLinear,
    nn.Conv1d: DendriteConv1d,
    nn.Conv2d: DendriteConv2d,
    nn.Conv3d: DendriteConv3d,
    nn.ConvTranspose1d: DendriteConvTranspose1d,
    nn.ConvTranspose2d: DendriteConvTranspose2d,
    nn.ConvTranspose3d: DendriteConvTranspose3d,
}

NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def dendrite_class_for(module: nn.Module) -> type[DendriteLayer] | None:
    """The wrapper class for a supported target layer, or None."""
    if isinstance(module, DendriteLayer):
        return None
    if is_hf_conv1d(module):
        return DendriteHFConv1D
    if isinstance(module, LazyModuleMixin):
        return None
    for layer_type, wrapper in TARGET_LAYERS.items():
        if isinstance(module, layer_type):
            return wrapper
    return None


def dendrite_layers(model: nn.Module) -> dict[str, DendriteLayer]:
    """Every dendrite layer in `model` by its first fully qualified name (shared layers once)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DendriteLayer)}


def dendrite_layer_paths(model: nn.Module) -> dict[str, list[str]]:
    """Every dendrite layer's first name with all the names it has (a shared layer appears once)."""
    paths: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, DendriteLayer):
            paths.setdefault(id(m), []).append(path)
    return {names[0]: names for names in paths.values()}


def count_parameters(model: nn.Module) -> int:
    """Float parameters and buffers the model needs (BN statistics included), tied tensors once."""
    tensors = [*model.parameters(), *model.buffers()]  # both already deduplicate shared tensors
    return sum(t.numel() for t in tensors if t.is_floating_point())
