"""The dendrite layer of docs/design.md §2, in one file: the math every layer family shares.

After k dendrites a target computes, per output channel c:

    h_i = a(D_i(x) + sum_{j<i} u_ij[c] * h_j)
    y   = N(W x + b) + sum_{i<k} s_i[c] * h_i

`N` is an optional norm that follows the layer (conv -> BatchNorm is one neuron: each dendrite
D_i is then a copy of the pair). A new dendrite gets weights ~ N(0, init_std^2) and a zero scale,
so adding one leaves the network function unchanged. Two kinds of cheap dendrites, which combine:

- rank R: a dendrite is two factors, in -> R -> out (a Linear pair; for a ConvNd a conv with R output channels
  and the layer's kernel/stride/padding/dilation, then a 1x1 conv). The first factor gets the layer type's
  default initialisation and the second N(0, init_std^2), so the product starts as small as a full dendrite;
- width m < C (channel-selective): a dendrite computes only m of the C output channels (which ones is chosen
  when it is added, see channels.py): h_i, s_i and u_ij exist for c in S_i only, and h_j reaches dendrite i on
  the channels the two sets share.

What differs between layer types (where the channel axis is, how to copy, narrow or factor the layer, how its
weights look to the fold) is a *family*: a subclass that fills in the family interface below (families.py,
embedding.py), found through the table in layers.py.

All dendrite state is plain parameters whose names start with `dendrite_`, so optimizers,
freezing, state-dict filtering and the fold find them by name.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .channel_index import add_to_channels, channel_positions
from .ownforward import own_forward_refusal, plain_form

ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "identity": lambda z: z,
}


class DendriteLayer(nn.Module):
    """A target layer (`base_layer`, untouched) plus k dendrites with cascade and per-channel scales.

    A subclass is one layer family: it names its layer type and fills in the family interface (the class
    attributes and classmethods at the end), which conversion, cheap dendrites and the fold call; its row in
    layers.FAMILIES makes it a target.
    """

    layer_type: type[nn.Module] | None = None  # the torch layer this family wraps (subclasses match too)
    spatial_dims = 0  # ConvNd: N; Linear-like layers keep channels on the last axis
    by_default = True  # a target unless filtered out; False: only when --include names it (costly families)
    weight_out_axis = 0  # the axis of `.weight` along output channels
    channels_attribute = "out_channels"  # the attribute holding C
    concatenable = True  # main and dendrite layers concatenate along output channels into one GEMM/conv
    functionals: tuple = ()  # functional calls (F.linear, aten.linear) that fx rewrites into this family's layer

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
        self.rank = rank  # low-rank dendrites where that is cheaper than a full copy
        self.channel_fraction = channel_fraction  # channel-selective dendrites: each serves this fraction
        self.width = self.dendrite_width(base_layer, channel_fraction)  # m: output channels of one dendrite
        self.dendrite_layers = nn.ModuleList()
        self.dendrite_scales = nn.ParameterList()  # entry i: [m], weight of h_i in the output
        self.dendrite_cascade = nn.ParameterList()  # entry i: [i, m], weights of h_j (j < i) into dendrite i
        # row i: the m output channels dendrite i serves (sorted); None when every dendrite serves all C
        selective = self.width < self.out_channels
        self.register_buffer("dendrite_channels", torch.zeros(0, self.width, dtype=torch.long, device=self.main_weight(base_layer).device) if selective else None)

    @property
    def out_channels(self) -> int:
        return self.channels_of(self.base_layer)

    def __getattr__(self, name: str):
        """The wrapped layer's attributes read through the wrapper, as PEFT's layers allow: model code reads
        `conv1.stride[0]`, `.padding`, `.in_features`, `.weight.dtype`. The wrapper's own attributes come first.
        Dunder names are never the base's: a weight-normed base's `__deepcopy__` would copy the base alone."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or name.startswith("__"):  # base_layer: not set yet (in __init__, unpickling)
                raise
        base = self.base_layer
        try:
            return getattr(base, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__!r} object (wrapping {type(base).__name__}) has no attribute "
                                 f"{name!r}") from None

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
        """A fresh dendrite: a copy of the neuron (of its plain form) with weights ~ N(0, init_std^2) and fresh norm state.

        With `rank`, a low-rank dendrite of the same input/output shape instead, where that is cheaper.
        """
        template = self.plain_form(self.base_layer)
        dendrite = self.low_rank_dendrite(template, self.rank, self.init_std, self.width) if self.rank else None
        if dendrite is None:
            dendrite = self.narrow_copy(template, self.width)
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
        weight = self.main_weight(self.base_layer)
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

    # ---- the family interface: what a subclass says about its layer type -------------------------------------

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, cls.layer_type)

    @classmethod
    def refusal(cls, module: nn.Module) -> str | None:
        """Why `module` cannot be a target although it matches, or None: e.g. a subclass computing its output in
        its own forward that its family cannot read as a plain layer (core/ownforward.py)."""
        return own_forward_refusal(module, cls.layer_type, cls.read_own_forward)

    @classmethod
    def read_own_forward(cls, layer: nn.Module) -> nn.Module | str | None:
        """For a subclass computing its output in its own forward: the plain layer of this family computing the
        same (its effective weight, in the layer's current mode), or why there is none; None when this family
        does not read such layers."""
        return None

    @classmethod
    def plain_form(cls, layer: nn.Module) -> nn.Module:
        """`layer` as a plain layer of this family that computes what it computes: the layer itself, or what
        `read_own_forward` reads from a subclass with its own forward. Dendrites copy it; the fold folds it."""
        return plain_form(layer, cls.layer_type, cls.read_own_forward)

    @classmethod
    def split(cls, module: nn.Module) -> nn.Module | None:
        """For a layer holding several weight sets of this family (a stacked or bidirectional LSTM), a module that
        computes it from one layer per set, its children, each a target of its own; else None."""
        return None

    @classmethod
    def channels_of(cls, layer: nn.Module) -> int:
        """Output channels C of a layer of this family."""
        raise NotImplementedError

    @classmethod
    def main_weight(cls, layer: nn.Module) -> torch.Tensor:
        """The weight that the dendrites' device, dtype and parameter count follow (and the report shows)."""
        return layer.weight

    @classmethod
    def narrowable(cls, base: nn.Module) -> bool:
        """Whether a dendrite of `base` can compute a subset of its output channels; layers whose weight is computed
        from other parameters (weight or spectral norm, old hook-based or parametrized) cannot."""
        return isinstance(base._parameters.get("weight"), nn.Parameter)

    @classmethod
    def dendrite_width(cls, base: nn.Module, fraction: float | None) -> int:
        """Output channels of one dendrite: ceil(fraction·C), or all C without a fraction."""
        channels = cls.channels_of(base)
        if fraction is None or not cls.narrowable(base):
            return channels
        return max(1, min(channels, math.ceil(fraction * channels - 1e-9)))

    @classmethod
    def narrow_copy(cls, base: nn.Module, width: int) -> nn.Module:
        """A copy of `base` with only its first `width` output channels (the weights are re-drawn by the caller)."""
        if width == cls.channels_of(base):
            return copy.deepcopy(base)
        axis = cls.weight_out_axis
        narrowed = {id(base.weight): nn.Parameter(base.weight.detach().narrow(axis, 0, width).clone())}
        if getattr(base, "bias", None) is not None:
            narrowed[id(base.bias)] = nn.Parameter(base.bias.detach()[:width].clone())
        layer = copy.deepcopy(base, memo=narrowed)  # the memo hands deepcopy the narrow tensors: the full ones are never copied
        setattr(layer, cls.channels_attribute, width)
        return layer

    @classmethod
    def low_rank_factors(cls, base: nn.Module, rank: int, width: int, bias: bool,
                         **factory) -> tuple[nn.Module, nn.Module] | None:
        """in -> rank -> width as two layers (built with `factory`: device, dtype), or None when that is not cheaper
        than a full dendrite or not possible."""
        return None

    @classmethod
    def low_rank_dendrite(cls, base: nn.Module, rank: int, init_std: float, width: int | None = None) -> nn.Module | None:
        """A rank-`rank` dendrite for `base` with `width` outputs, or None when that is not cheaper than a full one."""
        has_bias = getattr(base, "bias", None) is not None
        weight = cls.main_weight(base)
        factory = {"device": weight.device, "dtype": weight.dtype}
        factors = cls.low_rank_factors(base, rank, width or cls.channels_of(base), has_bias, **factory)
        if factors is None:
            return None
        first, second = factors
        with torch.no_grad():
            for p in second.parameters():
                p.normal_(0.0, init_std)
        return nn.Sequential(first, second)

    # the fold (exporting/fold.py) sees every layer of a family through these

    @classmethod
    def out_major(cls, layer: nn.Module) -> torch.Tensor:
        """The weight as [out, in/groups, *kernel] (detached)."""
        return layer.weight.detach()

    @classmethod
    def plain_weight(cls, weight: torch.Tensor, groups: int) -> torch.Tensor:
        """An out-major weight in the storage layout of the plain layer the fold builds."""
        return weight

    @classmethod
    def layer_spec(cls, layer: nn.Module, out_channels: int | None = None) -> dict:
        """The plain layer the fold makes of `layer`: its type name and hyper-parameters, no weights (JSON)."""
        raise NotImplementedError

    @classmethod
    def layer_from_spec(cls, spec: dict, out_channels: int | None = None) -> nn.Module:
        """An empty plain layer from `layer_spec`; weights are loaded afterwards."""
        raise NotImplementedError

    @classmethod
    def plain_layer(cls, template: nn.Module | None, weight: torch.Tensor, bias: torch.Tensor | None,
                    spec: dict | None = None) -> nn.Module:
        """A standard layer with the template's hyper-parameters (or those of `spec`) and the given out-major weights."""
        spec = {**(spec or cls.layer_spec(template)), "bias": bias is not None}
        layer = cls.layer_from_spec(spec, out_channels=weight.shape[0]).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(cls.plain_weight(weight, getattr(layer, "groups", 1)))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer.requires_grad_(False)

    @classmethod
    def from_functional(cls, weight: nn.Parameter, bias: nn.Parameter | None, options: dict) -> nn.Module:
        """A layer of this family (meta device) for one of its `functionals` called with these hyper-parameters."""
        raise NotImplementedError

    def error_site(self) -> nn.Module:
        """The module whose forward hook sees (x, y): the layer's input and the tensor its dendrites add to, whose
        gradient is the error signal that ranks channels and trains correlation candidates. The layer itself,
        unless its dendrites add to something inside it (a recurrent layer's gate inputs)."""
        return self

    def inner_projection(self) -> DendriteLayer | None:
        """For a layer whose dendrites add to a projection inside it (a recurrent layer's gate inputs): that
        projection with the same dendrites, as a layer of another family that the fold folds; else None."""
        return None

    def around_projection(self, projection: nn.Module) -> nn.Module:
        """This layer with its inner projection computed by `projection` (what the fold made of it)."""
        raise NotImplementedError

    def precomputed(self) -> nn.Module | None:
        """One plain layer that computes this dendritic layer exactly whatever its activation, or None (the
        fold then works on weights). A family whose input is an index can precompute every output."""
        return None

    def extra_repr(self) -> str:
        rank = f", rank={self.rank}" if self.rank else ""
        width = f", width={self.width}/{self.out_channels}" if self.dendrite_channels is not None else ""
        return f"dendrites={self.num_dendrites}, activation={self.activation}{rank}{width}"


NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def layers_and_norm(module: nn.Module) -> tuple[list[nn.Module], nn.Module | None]:
    """A neuron or dendrite as its layers (one; two for a low-rank dendrite) and its paired norm, if any."""
    norm = None
    if isinstance(module, nn.Sequential) and isinstance(module[-1], NORM_LAYERS):
        module, norm = (module[0] if len(module) == 2 else nn.Sequential(*module[:-1])), module[-1]
    return (list(module) if isinstance(module, nn.Sequential) else [module]), norm

