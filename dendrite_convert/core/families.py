"""The weight-based layer families: Linear, transformers' Conv1D, ConvNd and ConvTransposeNd.

Each class fills in the family interface of `DendriteLayer` (dendrite.py) for its layer type; its row in
layers.FAMILIES makes it a target. A dendrite has the layer's own type and hyper-parameters, and the fold
works on the out-major weight [out, in/groups, *kernel] of every family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dendrite import DendriteLayer
from .ownforward import read_own_forward
from .tfsame import TFSameConv1d, TFSameConv2d, TFSameConv3d, TFSameConv

_ATEN = torch.ops.aten


class DendriteLinear(DendriteLayer):
    """nn.Linear: weight [out, in], channels on the last axis; low rank is Linear(in, R) then Linear(R, out)."""

    layer_type = nn.Linear
    channels_attribute = "out_features"
    functionals = (F.linear, _ATEN.linear.default)

    @classmethod
    def channels_of(cls, layer: nn.Module) -> int:
        return layer.out_features

    @classmethod
    def inputs_of(cls, layer: nn.Module) -> int:
        return layer.in_features

    @classmethod
    def low_rank_factors(cls, base, rank, width, bias, **factory):
        n_in = cls.inputs_of(base)
        if rank * (n_in + width) >= n_in * width:
            return None
        return nn.Linear(n_in, rank, bias=False, **factory), nn.Linear(rank, width, bias=bias, **factory)

    @classmethod
    def read_own_forward(cls, layer: nn.Module) -> nn.Module | str | None:
        """timm's Linear and the like: one F.linear of the input, read on two batches of rows."""
        weight, generator = layer.weight, torch.Generator().manual_seed(0)
        probes = [torch.randn(n, cls.inputs_of(layer), generator=generator, device="cpu").to(weight) for n in (2, 3)]
        return read_own_forward(layer, F.linear, probes,
                                lambda w, b, _: cls.plain_layer(None, w, b, cls.layer_spec(layer)))

    @classmethod
    def layer_spec(cls, layer: nn.Module, out_channels: int | None = None) -> dict:
        return {"type": "Linear", "in_features": cls.inputs_of(layer), "out_channels": out_channels or cls.channels_of(layer),
                "spatial_dims": 0, "bias": getattr(layer, "bias", None) is not None}

    @classmethod
    def layer_from_spec(cls, spec: dict, out_channels: int | None = None) -> nn.Module:
        return nn.Linear(spec["in_features"], out_channels or spec["out_channels"], bias=spec.get("bias", True))

    @classmethod
    def from_functional(cls, weight: nn.Parameter, bias: nn.Parameter | None, options: dict) -> nn.Module:
        """An nn.Linear (on the meta device, then given the call's Parameters) for an `F.linear` call."""
        return nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")


class DendriteHFConv1D(DendriteLinear):
    """transformers' `Conv1D` (GPT-2): a Linear with a transposed weight [in, out], channels last; folds to a Linear."""

    layer_type = None  # matched by name, so that importing this package never imports transformers
    channels_attribute = "nf"
    weight_out_axis = 1
    functionals = ()

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        kind = type(module)
        return kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers")

    @classmethod
    def channels_of(cls, layer: nn.Module) -> int:
        return layer.nf

    @classmethod
    def inputs_of(cls, layer: nn.Module) -> int:
        return layer.weight.shape[0]

    @classmethod
    def out_major(cls, layer: nn.Module) -> torch.Tensor:
        return layer.weight.detach().t()


class _DendriteConvNd(DendriteLayer):
    """nn.ConvNd: weight [out, in/groups, *kernel], channels on axis 1 (or 0 unbatched). Dendrites of grouped
    convs serve every channel; low rank is a conv with R outputs and the layer's geometry, then a 1x1 conv.
    A conv with TensorFlow's 'SAME' padding (tfsame.py) records padding "tf_same" in its spec."""

    tf_same_type: type[nn.Module] | None = None

    @classmethod
    def read_own_forward(cls, layer: nn.Module) -> nn.Module | str | None:
        """timm's ScaledStdConv2d, StdConv2d, Conv2dSame and the like: one F.convNd of the input, or of the input
        padded as 'SAME', read on inputs whose sizes cover every remainder of the stride."""
        weight, generator = layer.weight, torch.Generator().manual_seed(0)
        stride = max(*layer.stride, 2)
        reach = max((k - 1) * d + 1 for k, d in zip(layer.kernel_size, layer.dilation))
        side = stride * (-(-reach // stride) + 1)
        shapes = [(1, layer.in_channels, *[side + r] * cls.spatial_dims) for r in range(stride)]
        probes = [torch.randn(shape, generator=generator, device="cpu").to(weight) for shape in shapes]
        spec = {**cls.layer_spec(layer), "padding_mode": "zeros"}

        def build(w, b, tf_same):
            return cls.plain_layer(None, w, b, {**spec, "padding": "tf_same"} if tf_same else spec)
        return read_own_forward(layer, cls.functionals[0], probes, build)

    @classmethod
    def channels_of(cls, layer: nn.Module) -> int:
        return layer.out_channels

    @classmethod
    def narrowable(cls, base: nn.Module) -> bool:
        return super().narrowable(base) and base.groups == 1

    @classmethod
    def low_rank_factors(cls, base, rank, width, bias, **factory):
        if base.groups != 1 or not isinstance(base.padding, tuple):
            return None
        kernel = base.weight[0].numel()  # in_channels * prod(kernel_size)
        if rank * (kernel + width) >= kernel * width:
            return None
        first = cls.layer_from_spec({**cls.layer_spec(base), "bias": False}, out_channels=rank).to(**factory)
        return first, cls.layer_type(rank, width, 1, bias=bias, **factory)

    @classmethod
    def layer_spec(cls, layer: nn.Module, out_channels: int | None = None) -> dict:
        return {"type": cls.layer_type.__name__, "in_channels": layer.in_channels,
                "out_channels": out_channels or layer.out_channels, "kernel_size": list(layer.kernel_size),
                "stride": list(layer.stride),
                "padding": "tf_same" if isinstance(layer, TFSameConv) else
                           layer.padding if isinstance(layer.padding, str) else list(layer.padding),
                "dilation": list(layer.dilation), "groups": layer.groups, "padding_mode": layer.padding_mode,
                "spatial_dims": cls.spatial_dims, "bias": getattr(layer, "bias", None) is not None}

    @classmethod
    def layer_from_spec(cls, spec: dict, out_channels: int | None = None) -> nn.Module:
        padding = spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"])
        kind = cls.layer_type
        if padding == "tf_same" and cls.tf_same_type is not None:
            kind, padding = cls.tf_same_type, 0
        return kind(spec["in_channels"], out_channels or spec["out_channels"], tuple(spec["kernel_size"]),
                    stride=tuple(spec["stride"]), padding=padding, dilation=tuple(spec["dilation"]),
                    groups=spec["groups"], padding_mode=spec["padding_mode"], bias=spec.get("bias", True),
                    **cls._extra_options(spec))

    @classmethod
    def _extra_options(cls, spec: dict) -> dict:
        return {}

    @classmethod
    def from_functional(cls, weight: nn.Parameter, bias: nn.Parameter | None, options: dict) -> nn.Module:
        """An nn.ConvNd (meta device) for an `F.convNd` call with constant stride/padding/dilation/groups."""
        groups = options.get("groups", 1)
        options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items()}
        return cls.layer_type(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                              bias=bias is not None, device="meta", **options)


class DendriteConv1d(_DendriteConvNd):
    layer_type, spatial_dims, tf_same_type = nn.Conv1d, 1, TFSameConv1d
    functionals = (F.conv1d, _ATEN.conv1d.default)


class DendriteConv2d(_DendriteConvNd):
    layer_type, spatial_dims, tf_same_type = nn.Conv2d, 2, TFSameConv2d
    functionals = (F.conv2d, _ATEN.conv2d.default)


class DendriteConv3d(_DendriteConvNd):
    layer_type, spatial_dims, tf_same_type = nn.Conv3d, 3, TFSameConv3d
    functionals = (F.conv3d, _ATEN.conv3d.default)


def swap_in_out(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """[a, b/groups, *k] <-> [b, a/groups, *k] per group: ConvTransposeNd's layout and back (an involution)."""
    return weight.unflatten(0, (groups, -1)).transpose(1, 2).flatten(0, 1)


class _DendriteConvTransposeNd(_DendriteConvNd):
    """Transposed convs (U-Net up-sampling): the dendrite is another transposed conv of the same shape. The weight
    is [in, out/groups, *k], so outputs do not concatenate and there is no low-rank form."""

    weight_out_axis = 1
    concatenable = False
    functionals = ()

    @classmethod
    def read_own_forward(cls, layer: nn.Module) -> nn.Module | str | None:
        return None

    @classmethod
    def low_rank_factors(cls, base, rank, width, bias, **factory):
        return None

    @classmethod
    def out_major(cls, layer: nn.Module) -> torch.Tensor:
        return swap_in_out(layer.weight.detach(), layer.groups)

    @classmethod
    def plain_weight(cls, weight: torch.Tensor, groups: int) -> torch.Tensor:
        return swap_in_out(weight, groups)

    @classmethod
    def layer_spec(cls, layer: nn.Module, out_channels: int | None = None) -> dict:
        return {**super().layer_spec(layer, out_channels), "output_padding": list(layer.output_padding)}

    @classmethod
    def _extra_options(cls, spec: dict) -> dict:
        return {"output_padding": tuple(spec["output_padding"])}


class DendriteConvTranspose1d(_DendriteConvTransposeNd):
    layer_type, spatial_dims = nn.ConvTranspose1d, 1


class DendriteConvTranspose2d(_DendriteConvTransposeNd):
    layer_type, spatial_dims = nn.ConvTranspose2d, 2


class DendriteConvTranspose3d(_DendriteConvTransposeNd):
    layer_type, spatial_dims = nn.ConvTranspose3d, 3
