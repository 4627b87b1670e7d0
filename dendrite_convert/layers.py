"""The dendrite layer of DESIGN §2, in one file.

After k dendrites a target computes, per output channel c:

    h_i = a(D_i(x) + sum_{j<i} u_ij[c] * h_j)
    y   = N(W x + b) + sum_{i<k} s_i[c] * h_i

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

from .cheap import low_rank_dendrite

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
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.base_layer = base_layer
        self.norm = norm
        self.activation = activation
        self.init_std = init_std
        self.rank = rank  # low-rank dendrites (cheap.py) where that is cheaper than a full copy
        self.dendrite_layers = nn.ModuleList()
        self.dendrite_scales = nn.ParameterList()  # entry i: [C], weight of h_i in the output
        self.dendrite_cascade = nn.ParameterList()  # entry i: [i, C], weights of h_j (j < i) into dendrite i

    @property
    def out_channels(self) -> int:
        raise NotImplementedError

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

    def dendrite_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """h_0 .. h_{k-1}: each dendrite sees the layer input and the outputs of earlier dendrites."""
        act = ACTIVATIONS[self.activation]
        outputs: list[torch.Tensor] = []
        for dendrite, cascade in zip(self.dendrite_layers, self.dendrite_cascade):
            z = dendrite(x)
            for j, h in enumerate(outputs):
                z = z + self.per_channel(cascade[j], z) * h
            outputs.append(act(z))
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.neuron(x)
        if not self.dendrite_layers:  # a converted model without dendrites costs one extra call, nothing more
            return y
        for scale, h in zip(self.dendrite_scales, self.dendrite_outputs(x)):
            y = y + self.per_channel(scale, h) * h
        return y

    def new_dendrite(self) -> nn.Module:
        """A fresh dendrite: a copy of the neuron with weights ~ N(0, init_std^2) and fresh norm state.

        With `rank`, a low-rank dendrite of the same input/output shape instead (see cheap.py).
        """
        dendrite = low_rank_dendrite(self.base_layer, self.rank, self.init_std) if self.rank else None
        if dendrite is None:
            dendrite = copy.deepcopy(self.base_layer)
            with torch.no_grad():
                for p in dendrite.parameters():
                    p.normal_(0.0, self.init_std)
        dendrite.requires_grad_(True)
        if self.norm is None:
            return dendrite
        norm = copy.deepcopy(self.norm)
        for reset in ("reset_parameters", "reset_running_stats"):
            if hasattr(norm, reset):
                getattr(norm, reset)()
        norm.requires_grad_(True)
        return nn.Sequential(dendrite, norm)

    def add_dendrite(self, dendrite: nn.Module | None = None, cascade: torch.Tensor | None = None) -> nn.Module:
        """Append one dendrite with a zero output scale; the layer's function is unchanged.

        `dendrite`/`cascade` insert a trained candidate (correlation objective); by default a fresh
        random dendrite with zero cascade weights is added.
        """
        weight = self.base_layer.weight
        k, channels = self.num_dendrites, self.out_channels
        dendrite = self.new_dendrite() if dendrite is None else dendrite
        if cascade is None:
            cascade = torch.zeros(k, channels, device=weight.device, dtype=weight.dtype)
        if tuple(cascade.shape) != (k, channels):
            raise ValueError(f"cascade must have shape {(k, channels)}, got {tuple(cascade.shape)}")
        self.dendrite_layers.append(dendrite)
        self.dendrite_scales.append(nn.Parameter(torch.zeros(channels, device=weight.device, dtype=weight.dtype)))
        self.dendrite_cascade.append(nn.Parameter(cascade.detach().clone()))
        return dendrite

    def extra_repr(self) -> str:
        rank = f", rank={self.rank}" if self.rank else ""
        return f"dendrites={self.num_dendrites}, activation={self.activation}{rank}"


class DendriteLinear(DendriteLayer):
    @property
    def out_channels(self) -> int:
        return self.base_layer.out_features


class _DendriteConvNd(DendriteLayer):
    @property
    def out_channels(self) -> int:
        return self.base_layer.out_channels


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

    @property
    def out_channels(self) -> int:
        return self.base_layer.nf


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


def _is_hf_conv1d(module: nn.Module) -> bool:
    # Checked by name so that importing this package never imports transformers.
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def dendrite_class_for(module: nn.Module) -> type[DendriteLayer] | None:
    """The wrapper class for a supported target layer, or None."""
    if isinstance(module, DendriteLayer):
        return None
    if _is_hf_conv1d(module):
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
