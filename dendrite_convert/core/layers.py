"""What is a target: the table of layer families, and where the dendrite layers of a model are.

A layer family is one `DendriteLayer` subclass (the interface and the shared math in dendrite.py, the
families in families.py, embedding.py and recurrent.py) plus one row of FAMILIES. Conversion asks `dendrite_class_for` which class wraps a
layer; the fold asks `family_of` how a plain layer's weights look and `family_for_spec` how to rebuild one.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .channel_index import add_to_channels, channel_positions
from .dendrite import ACTIVATIONS, NORM_LAYERS, DendriteLayer, layers_and_norm
from .families import (
    DendriteConv1d,
    DendriteConv2d,
    DendriteConv3d,
    DendriteConvTranspose1d,
    DendriteConvTranspose2d,
    DendriteConvTranspose3d,
    DendriteHFConv1D,
    DendriteLinear,
)
from .embedding import DendriteEmbedding
from .recurrent import DendriteGRU, DendriteLSTM

__all__ = [
    "ACTIVATIONS", "FAMILIES", "FUNCTIONAL", "NORM_LAYERS", "DendriteConv1d", "DendriteConv2d", "DendriteConv3d",
    "DendriteConvTranspose1d", "DendriteConvTranspose2d", "DendriteConvTranspose3d", "DendriteEmbedding", "DendriteGRU",
    "DendriteHFConv1D", "DendriteLSTM", "DendriteLayer", "DendriteLinear", "add_to_channels", "added_parameters", "channel_positions", "count_parameters",
    "dendrite_class_for", "dendrite_layer_paths", "dendrite_layers", "family_for_spec", "family_of", "layers_and_norm",
    "one_layer_key",
]

FAMILIES: tuple[type[DendriteLayer], ...] = (
    DendriteLinear,
    DendriteHFConv1D,
    DendriteConv1d,
    DendriteConv2d,
    DendriteConv3d,
    DendriteConvTranspose1d,
    DendriteConvTranspose2d,
    DendriteConvTranspose3d,
    DendriteEmbedding,
    DendriteLSTM, DendriteGRU,
)

FUNCTIONAL = {fn: family for family in FAMILIES for fn in family.functionals}  # F.conv2d -> DendriteConv2d, ...
_BY_SPEC = {family.layer_type.__name__: family for family in FAMILIES if family.layer_type is not None}


def family_of(module: nn.Module) -> type[DendriteLayer] | None:
    """The family of a target layer, or of a plain layer that a fold produced; None for other modules."""
    return next((family for family in FAMILIES if family.matches(module)), None)


def family_for_spec(spec: dict) -> type[DendriteLayer]:
    """The family that builds the plain layer a `layer_spec` describes (KeyError for an unknown type)."""
    return _BY_SPEC[spec["type"]]


def dendrite_class_for(module: nn.Module) -> type[DendriteLayer] | None:
    """The wrapper class for a supported target layer, or None."""
    if isinstance(module, (DendriteLayer, LazyModuleMixin)):
        return None
    return family_of(module)


def one_layer_key(module: nn.Module) -> tuple:
    """Targets with equal keys become one dendrite layer: the same module under several names, or modules of
    one type and configuration with all parameters tied. A tied pair of different layers (GPT-2's embedding
    and output projection) keeps two keys."""
    ids = tuple(id(p) for p in module.parameters())
    return (type(module), repr(module), ids) if ids else (id(module),)


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


def added_parameters(base: nn.Module, rank: int | None, fraction: float | None = None) -> int:
    """Parameters one dendrite of target `base` adds besides its scale and cascade: the formula the tests check."""
    family = family_of(base)
    width = family.dendrite_width(base, fraction)
    bias = width if getattr(base, "bias", None) is not None else 0
    dendrite = family.low_rank_dendrite(base, rank, 0.01, width) if rank else None
    if dendrite is None:
        return family.main_weight(base).numel() * width // family.channels_of(base) + bias
    first, second = dendrite
    return first.weight.numel() + second.weight.numel() + bias
