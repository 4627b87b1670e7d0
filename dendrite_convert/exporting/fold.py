"""The fold of docs/design.md §5: every dendrite layer becomes standard layers and ops, verified against the original.

Per target (the math of layers.py, eval semantics):

1. eval BatchNorm folds into the conv/linear before it, for the neuron and for every dendrite copy:
   W' = W·γ/σ, b' = (b-μ)·γ/σ + β (torch.nn.utils.fusion);
2. a dendrite is dead when its scale is all zero and no live later dendrite reads it through the cascade
   (or when `prune_below` > max|s_i|: an approximation, measured by the caller); dead ones are dropped;
3. identity activation makes every h_i linear in x, so the whole stack folds into one layer:
   A_i = D_i + Σ_j u_ij·A_j,  W' = W + Σ_i s_i·A_i  (biases alike), zero extra nodes;
4. nonlinear dendrites stay as extra GEMMs/convs ("separate"), or as one layer with main and dendrite
   weights concatenated along output channels and split after ("concat"; interleaved per group so grouped
   and depthwise convs keep their group assignment), then the cascade mixes, the activation, the scales, a sum.
   In "concat" a low-rank dendrite's first factor joins the one layer and its second runs on its slice, and a
   channel-selective one contributes its m channels: the pass over the input (im2col) is shared.

A family whose input is an index (Embedding) precomputes its outputs instead: one plain layer, exact whatever
the activation. A recurrent layer's dendrites add to its gate inputs, a Linear with dendrites inside it: that is
folded as above and the plain recurrence put around it (core/recurrent.py). A target whose class computes its output in
its own forward (timm's ScaledStdConv2d, Conv2dSame) is folded as its plain form: the plain layer its family reads
from that computation, with its effective weight in eval and its padding (core/ownforward.py). What a layer's
weights look like comes from its family (core/layers.py); the folded module and its specs are in folded.py. `fold_model` returns a copy; it is idempotent (no dendrite layers are left).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..core.errors import ConversionError
from ..core.layers import DendriteLayer, channel_positions, dendrite_layer_paths, family_of, layers_and_norm
from .folded import FoldedDendrites
from .latency import faster_layout, torch_runner

LAYOUTS = ("auto", "separate", "concat")


@dataclass
class FoldRecord:
    """What the fold did to one target."""

    name: str
    form: str  # "layer" (one plain layer) or "dendrites" (plain layers + elementwise ops)
    dendrites: int  # before folding
    kept: int  # nonlinear dendrites left as extra GEMMs/convs
    folded: int = 0  # identity dendrites folded into the weight
    dropped: int = 0  # dead: zero scale and not read by a live dendrite
    pruned: list[tuple[int, float]] = field(default_factory=list)  # (index, max |s_i|) below prune_below
    layout: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FoldResult:
    model: nn.Module
    records: list[FoldRecord]


# ---- equivalent weights -------------------------------------------------------------------------------------

def equivalent_weight_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of a target, a (target, eval BatchNorm) pair or a low-rank dendrite, W in [out, in/groups, *k]."""
    layers, norm = layers_and_norm(module)
    weight = family_of(layers[0]).out_major(layers[0])
    first_bias = getattr(layers[0], "bias", None)
    bias = first_bias.detach() if first_bias is not None else weight.new_zeros(weight.shape[0])
    if len(layers) == 2:  # low rank: the 1x1 / Linear second factor composed with the first
        second = family_of(layers[1]).out_major(layers[1]).flatten(1)
        weight, bias = torch.einsum("or,r...->o...", second, weight), second @ bias
        if layers[1].bias is not None:
            bias = bias + layers[1].bias.detach()
    return _fold_norm(weight, bias, norm) if norm is not None else (weight.clone(), bias.clone())


def _fold_norm(weight, bias, norm: nn.Module):
    if getattr(norm, "running_mean", None) is None or getattr(norm, "running_var", None) is None:
        raise ConversionError(
            f"{type(norm).__name__} without running statistics (track_running_stats=False) normalises by batch "
            "statistics even in eval mode and cannot be folded; convert the model again without pairing norms (pair_norms=False)."
        )
    scale = torch.rsqrt(norm.running_var.detach() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach()
    shift = -norm.running_mean.detach() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach()
    return weight * _per_out(scale, weight), bias * scale + shift


def _plain_branch(dendrite: nn.Module, template: nn.Module) -> nn.Module:
    """A nonlinear dendrite as standard layers: one layer, or a low-rank pair kept as two small layers."""
    layers, norm = layers_and_norm(dendrite)
    if len(layers) == 1:
        return family_of(template).plain_layer(template, *equivalent_weight_bias(dendrite))
    first, second = layers
    w2 = family_of(second).out_major(second)
    b2 = second.bias.detach() if second.bias is not None else w2.new_zeros(w2.shape[0])
    if norm is not None:
        w2, b2 = _fold_norm(w2, b2, norm)
    return nn.Sequential(family_of(first).plain_layer(first, family_of(first).out_major(first), None),
                         family_of(second).plain_layer(second, w2, b2))


def _neuron_module(layer: DendriteLayer) -> nn.Module:
    return layer.base_layer if layer.norm is None else nn.Sequential(layer.base_layer, layer.norm)


def _per_out(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def _shared_cascade(u: torch.Tensor, sets: torch.Tensor | None, i: int) -> torch.Tensor:
    """Dendrite i's cascade weights [i, m] with zeros on channels the earlier dendrite does not serve."""
    if sets is None or not i:
        return u
    return u * torch.stack([channel_positions(sets[j], sets[i])[1] for j in range(i)])


def _spread(values: torch.Tensor, channels: torch.Tensor, c: int) -> torch.Tensor:
    """[m, ...] rows placed at `channels` of a zero [c, ...] tensor."""
    return values.new_zeros((c,) + values.shape[1:]).index_copy(0, channels, values)


# ---- one layer ----------------------------------------------------------------------------------------------

def _live_dendrites(scales: list[torch.Tensor], cascade: list[torch.Tensor], prune_below: float):
    """Indices kept, and those pruned as (index, max|s_i|); a dendrite read by a live one stays live."""
    k = len(scales)
    peak = [float(s.abs().max()) if s.numel() else 0.0 for s in scales]
    pruned = [(i, peak[i]) for i in range(k) if 0 < peak[i] < prune_below]  # their own output is dropped
    live: list[int] = []
    for i in reversed(range(k)):
        emits = peak[i] > 0 and peak[i] >= prune_below
        read = any(bool(cascade[j][i].abs().max() > 0) for j in live)
        if emits or read:
            live.append(i)
    return sorted(live), pruned, peak


def fold_layer(layer: DendriteLayer, prune_below: float = 0.0, layout: str = "separate", name: str = "") -> tuple[nn.Module, FoldRecord]:
    """A DendriteLayer as a plain layer, or as `FoldedDendrites` when nonlinear dendrites remain."""
    k = layer.num_dendrites
    projection = layer.inner_projection()
    if projection is not None:  # the dendrites add to a projection inside the layer (recurrent gates): fold that
        folded, record = fold_layer(projection, prune_below, layout, name)
        return layer.around_projection(folded), record
    precomputed = layer.precomputed()
    if precomputed is not None:
        return precomputed.requires_grad_(False), FoldRecord(name, "layer", k, 0, folded=k)
    template, plain_layer = layer.plain_form(layer.base_layer), layer.plain_layer  # a subclass read through its forward
    weight, bias = equivalent_weight_bias(template if layer.norm is None else nn.Sequential(template, layer.norm))
    sets = layer.dendrite_channels  # None, or [k, m]: the channels each dendrite serves
    scales = [s.detach() for s in layer.dendrite_scales]
    cascade = [_shared_cascade(u.detach(), sets, i) for i, u in enumerate(layer.dendrite_cascade)]
    live, pruned, peak = _live_dendrites(scales, cascade, prune_below)

    def emitting(i: int) -> bool:  # a live dendrite below prune_below only feeds later ones
        return peak[i] > 0 and peak[i] >= prune_below

    gone = {i for i, _ in pruned} - set(live)
    record = FoldRecord(name, "layer", k, 0, dropped=k - len(live) - len(gone), pruned=pruned)
    if not live:
        return plain_layer(template, weight, bias), record
    branch_wb = [equivalent_weight_bias(layer.dendrite_layers[i]) for i in live]
    if layer.activation == "identity":  # every h_i is linear in x: fold the whole stack into W, b
        if sets is not None:  # in the layer's channel space, zero where a dendrite does not serve
            c = weight.shape[0]
            branch_wb = [(_spread(w, sets[i], c), _spread(b, sets[i], c)) for (w, b), i in zip(branch_wb, live)]
            scales = [_spread(s, sets[i], c) for i, s in enumerate(scales)]
            cascade = [_spread(u.t(), sets[i], c).t() for i, u in enumerate(cascade)]
        acc: list[tuple[torch.Tensor, torch.Tensor]] = []
        for n, i in enumerate(live):
            a_w, a_b = branch_wb[n]
            for m, j in enumerate(live[:n]):
                a_w = a_w + _per_out(cascade[i][j], a_w) * acc[m][0]
                a_b = a_b + cascade[i][j] * acc[m][1]
            acc.append((a_w, a_b))
            if emitting(i):
                weight = weight + _per_out(scales[i], a_w) * a_w
                bias = bias + scales[i] * a_b
        record.folded = len(live)
        return plain_layer(template, weight, bias), record
    main = plain_layer(template, weight, bias)
    branches = [_plain_branch(layer.dendrite_layers[i], template) for i in live]
    if not layer.concatenable:
        layout = "separate"
    links = [[m for m, j in enumerate(live[:n]) if bool(cascade[i][j].abs().max() > 0)] for n, i in enumerate(live)]
    emits = [n for n, i in enumerate(live) if emitting(i)]
    width = layer.width
    s = torch.stack([scales[live[n]] for n in emits]) if emits else weight.new_zeros(0, width)
    u = [cascade[i][live[m]] for n, i in enumerate(live) for m in links[n]]
    u = torch.stack(u) if u else weight.new_zeros(0, width)
    channels = None if sets is None else sets[live]
    module = FoldedDendrites(main, branches, layer.activation, s, u, links, emits, layout, channels)
    record.form, record.kept, record.layout = "dendrites", len(live), layout
    return module.requires_grad_(False), record


# ---- whole model --------------------------------------------------------------------------------------------

def fold(model: nn.Module, prune_below: float = 0.0, gemm_layout: str = "separate", example_inputs=None) -> FoldResult:
    """A folded copy of `model` in eval mode, and what was done to each target.

    `gemm_layout="auto"` times both layouts per layer on the inputs that layer sees for `example_inputs`
    (positional args) and keeps concat only where it is clearly faster; without example inputs it is separate.
    """
    if gemm_layout not in LAYOUTS:
        raise ValueError(f"gemm_layout must be one of {', '.join(LAYOUTS)}, not {gemm_layout!r}")
    if prune_below < 0:
        raise ValueError(f"prune_below must be 0 or more, not {prune_below}")
    model = copy.deepcopy(model).eval()
    layer_inputs = _capture_inputs(model, example_inputs) if gemm_layout == "auto" and example_inputs is not None else {}
    records = []
    for name, paths in dendrite_layer_paths(model).items():
        layer = model.get_submodule(name)
        layout = gemm_layout
        if layout == "auto":
            layout = _choose_layout(layer, prune_below, layer_inputs.get(id(layer)))
        folded, record = fold_layer(layer, prune_below, layout, name)
        records.append(record)
        model = replace_layer(model, paths, folded)
    return FoldResult(model.eval().requires_grad_(False), records)


def fold_model(model: nn.Module, prune_below: float = 0.0, gemm_layout: str = "separate", example_inputs=None) -> nn.Module:
    """A copy of `model` with every DendriteLayer replaced by standard layers (see `fold`)."""
    return fold(model, prune_below, gemm_layout, example_inputs).model


def strip_dendrites(model: nn.Module) -> nn.Module:
    """A copy of `model` with every DendriteLayer replaced by its neuron: the model without dendrites."""
    model = copy.deepcopy(model).eval()
    for name, paths in dendrite_layer_paths(model).items():
        model = replace_layer(model, paths, _neuron_module(model.get_submodule(name)))
    return model


def replace_layer(model: nn.Module, paths: list[str], new: nn.Module) -> nn.Module:
    """`new` at every path of one (possibly shared) layer; the root itself when the model is that layer."""
    for path in paths:
        if not path:
            return new
        model.set_submodule(path, new)
    return model


def _capture_inputs(model: nn.Module, example_inputs) -> dict[int, torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.setdefault(id(mod), args[0]))
             for m in model.modules() if isinstance(m, DendriteLayer)]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _choose_layout(layer: DendriteLayer, prune_below: float, x: torch.Tensor | None) -> str:
    if x is None or layer.activation == "identity":
        return "separate"
    separate, _ = fold_layer(layer, prune_below, "separate")
    if not isinstance(separate, FoldedDendrites):
        return "separate"
    concat, _ = fold_layer(layer, prune_below, "concat")
    return faster_layout({"separate": torch_runner(separate, (x,)), "concat": torch_runner(concat, (x,))}, 0.05)[0]
