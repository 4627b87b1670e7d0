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

`fold_model` returns a copy; it is idempotent (a folded model has no dendrite layers left).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..core.cheap import is_hf_conv1d
from ..core.errors import ConversionError
from ..core.layers import ACTIVATIONS, NORM_LAYERS, DendriteLayer, add_to_channels, channel_positions, dendrite_layer_paths

LAYOUTS = ("auto", "separate", "concat")
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_TRANSPOSED = tuple(_CONV_T.values())


class FoldedDendrites(nn.Module):
    """y = main(x) + Σ s_i·h_i, h_i = a(D_i x + Σ_j u_ij·h_j), built from plain Linear/ConvNd layers.

    `links[i]` lists the j whose cascade weight into dendrite i is non-zero, `emits` the dendrites whose scale is
    non-zero; `cascade` holds one row per link (in that order) and `scales` one row per emitting dendrite, so the
    module stores only what it uses. Rows are shaped to broadcast over the output's channel axis.
    """

    def __init__(self, main: nn.Module, branches: list[nn.Module], activation: str, scales: torch.Tensor,
                 cascade: torch.Tensor, links: list[list[int]], emits: list[int], layout: str = "separate",
                 channels: torch.Tensor | None = None):
        super().__init__()
        if layout not in ("separate", "concat"):
            raise ValueError(f"layout must be separate or concat, not {layout!r}")
        self.activation, self.layout, self.links, self.emits = activation, layout, links, emits
        self.k = len(branches)
        self.out_channels = _out_channels(main)
        self.spatial_dims = 0 if isinstance(main, nn.Linear) else main.weight.ndim - 2
        self.groups = getattr(main, "groups", 1)
        width = self.out_channels if channels is None else channels.shape[1]
        row = (width,) + (1,) * self.spatial_dims
        self.register_buffer("scales", scales.reshape((len(emits),) + row).clone())
        self.register_buffer("cascade", cascade.reshape((sum(map(len, links)),) + row).clone())
        rows = iter(range(self.cascade.shape[0]))
        self._link_rows = [[(j, next(rows)) for j in js] for js in links]
        self._emit_rows = {i: r for r, i in enumerate(emits)}
        # channel-selective: row i lists the channels branch i serves (saved); a link row r = (i <- j) reads h_j
        # at link_positions[r], derived from the rows whenever they change (channels h_j lacks have a zero weight)
        self.register_buffer("channels", None if channels is None else channels.clone())
        self.register_buffer("link_positions", None, persistent=False)
        if channels is not None:
            self._derive_link_positions()
        if layout == "separate":
            self.main, self.branches = main, nn.ModuleList(branches)
        else:  # a low-rank branch's first factor joins the one layer; its second factor runs on its slice
            heads = [b[0] if isinstance(b, nn.Sequential) else b for b in branches]
            self.tails = nn.ModuleList(b[1] if isinstance(b, nn.Sequential) else nn.Identity() for b in branches)
            self.widths = [self.out_channels] + [_out_channels(h) for h in heads]
            self.fused = _concat_layers([main, *heads], self.groups)

    @property
    def weight(self) -> torch.Tensor:
        """The main layer's weight (model code reads `.weight.dtype`/`.device`, as for DendriteLayer)."""
        return self.main.weight if self.layout == "separate" else self.fused.weight

    def _split(self, z: torch.Tensor) -> list[torch.Tensor]:
        axis = z.ndim - self.spatial_dims - 1
        if self.groups == 1:
            return list(torch.split(z, self.widths, dim=axis))
        per_group = self.out_channels // self.groups
        parts = z.unflatten(axis, (self.groups, self.k + 1, per_group)).unbind(axis + 1)
        return [p.flatten(axis, axis + 1) for p in parts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "concat":
            y, *zs = self._split(self.fused(x))
            zs = [tail(z) for tail, z in zip(self.tails, zs)]
        else:
            y, zs = self.main(x), [branch(x) for branch in self.branches]
        act = ACTIVATIONS[self.activation]
        axis = y.ndim - self.spatial_dims - 1
        hs: list[torch.Tensor] = []
        for i, z in enumerate(zs):
            for j, r in self._link_rows[i]:
                h = hs[j] if self.channels is None else hs[j].index_select(axis, self.link_positions[r])
                z = z + self.cascade[r] * h
            hs.append(act(z))
            if i in self._emit_rows:
                term = self.scales[self._emit_rows[i]] * hs[i]
                y = y + term if self.channels is None else add_to_channels(y, term, self.channels[i], axis)
        return y

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "link_positions", None)  # derived, not loaded (files of 0.1.0 dev builds saved it)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.channels is not None:
            self._derive_link_positions()

    def _derive_link_positions(self) -> None:
        rows = [channel_positions(self.channels[j], self.channels[i])[0]
                for i, js in enumerate(self.links) for j in js]
        self.link_positions = torch.stack(rows) if rows else self.channels.new_zeros(0, self.channels.shape[1])

    def valid_channels(self) -> bool:
        """Whether every channel row (loaded from a file) lists increasing indices of existing channels, so
        that a damaged file fails on load rather than computing wrong outputs."""
        rows = self.channels
        return rows is None or rows.numel() == 0 or bool(
            (rows[:, 1:] > rows[:, :-1]).all() and int(rows.min()) >= 0 and int(rows.max()) < self.out_channels)

    def spec(self) -> dict:
        """What `from_spec` needs to rebuild this module empty (shapes and hyper-parameters, no weights)."""
        main = self.main if self.layout == "separate" else None
        template = main if main is not None else self.fused
        spec = {"kind": "dendrites", "layer": _layer_spec(template, self.out_channels), "activation": self.activation,
                "layout": self.layout, "links": self.links, "emits": self.emits, "dendrites": self.k}
        if self.channels is not None:
            spec["width"] = self.channels.shape[1]
        if self.layout == "separate":  # low-rank branches are two small layers
            spec["branches"] = [[_layer_spec(m) for m in _layers_and_norm(b)[0]] for b in self.branches]
        else:  # the one layer's slices, and the second factor of each low-rank branch
            spec["widths"] = self.widths
            spec["tails"] = [None if isinstance(t, nn.Identity) else _layer_spec(t) for t in self.tails]
        return spec

    @classmethod
    def from_spec(cls, spec: dict) -> FoldedDendrites:
        k, layer, links, emits = spec["dendrites"], spec["layer"], spec["links"], spec["emits"]
        width = spec.get("width")  # channel-selective branches: their channels come with the weights
        if width is not None and not (type(width) is int and 0 < width <= layer["out_channels"]):
            raise ValueError(f"width must be a channel count in [1, {layer['out_channels']}], not {width!r}")
        channels = torch.zeros(k, width, dtype=torch.long) if width else None
        row = (width or layer["out_channels"],) + (1,) * layer["spatial_dims"]
        make = [layer_from_spec(layer) for _ in range(k + 1)]
        if "branches" in spec:
            make[1:] = [layer_from_spec(b[0]) if len(b) == 1 else nn.Sequential(*map(layer_from_spec, b))
                        for b in spec["branches"]]
        elif "widths" in spec:  # concat: heads of the recorded widths (their weights live in the one layer)
            widths, tails = spec["widths"], spec["tails"]
            if len(widths) != k + 1 or len(tails) != k or not all(type(w) is int and w > 0 for w in widths):
                raise ValueError(f"widths and tails must describe {k} dendrites, got {widths!r} and {len(tails)} tails")
            heads = [layer_from_spec(layer, out_channels=w) for w in widths[1:]]
            make[1:] = [h if t is None else nn.Sequential(h, layer_from_spec(t)) for h, t in zip(heads, tails)]
        return cls(make[0], make[1:], spec["activation"], torch.zeros((len(emits),) + row),
                   torch.zeros((sum(map(len, links)),) + row), links, emits,
                   layout="separate" if spec["layout"] == "separate" else "concat", channels=channels)


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

def _layers_and_norm(module: nn.Module) -> tuple[list[nn.Module], nn.Module | None]:
    """A neuron or dendrite as its layers (one; two for a low-rank dendrite) and its paired norm, if any."""
    norm = None
    if isinstance(module, nn.Sequential) and isinstance(module[-1], NORM_LAYERS):
        module, norm = (module[0] if len(module) == 2 else nn.Sequential(*module[:-1])), module[-1]
    return (list(module) if isinstance(module, nn.Sequential) else [module]), norm


def _out_major(layer: nn.Module) -> torch.Tensor:
    """The weight as [out, in/groups, *kernel]: Conv1D is stored transposed, ConvTransposeNd as [in, out/groups, ...]."""
    weight = layer.weight.detach()
    if is_hf_conv1d(layer):
        return weight.t()
    if isinstance(layer, _TRANSPOSED):
        return _swap_in_out(weight, layer.groups)
    return weight


def _swap_in_out(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """[a, b/groups, *k] <-> [b, a/groups, *k] per group: ConvTransposeNd's layout and back (an involution)."""
    return weight.unflatten(0, (groups, -1)).transpose(1, 2).flatten(0, 1)


def equivalent_weight_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of a target, a (target, eval BatchNorm) pair or a low-rank dendrite, W in [out, in/groups, *k]."""
    layers, norm = _layers_and_norm(module)
    weight = _out_major(layers[0])
    first_bias = getattr(layers[0], "bias", None)
    bias = first_bias.detach() if first_bias is not None else weight.new_zeros(weight.shape[0])
    if len(layers) == 2:  # low rank: the 1x1 / Linear second factor composed with the first
        second = _out_major(layers[1]).flatten(1)
        weight, bias = torch.einsum("or,r...->o...", second, weight), second @ bias
        if layers[1].bias is not None:
            bias = bias + layers[1].bias.detach()
    return _fold_norm(weight, bias, norm) if norm is not None else (weight.clone(), bias.clone())


def _fold_norm(weight, bias, norm: nn.Module):
    if getattr(norm, "running_mean", None) is None or getattr(norm, "running_var", None) is None:
        raise ConversionError(
            f"{type(norm).__name__} without running statistics (track_running_stats=False) normalises by batch "
            "statistics even in eval mode and cannot be folded; export the model without pairing it (--no-norm-pairs)."
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
    layers, norm = _layers_and_norm(dendrite)
    if len(layers) == 1:
        return _plain_layer(template, *equivalent_weight_bias(dendrite))
    first, second = layers
    w2 = _out_major(second)
    b2 = second.bias.detach() if second.bias is not None else w2.new_zeros(w2.shape[0])
    if norm is not None:
        w2, b2 = _fold_norm(w2, b2, norm)
    return nn.Sequential(_plain_layer(first, _out_major(first), None), _plain_layer(second, w2, b2))


def _neuron_module(layer: DendriteLayer) -> nn.Module:
    return layer.base_layer if layer.norm is None else nn.Sequential(layer.base_layer, layer.norm)


def _per_out(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _layer_spec(layer: nn.Module, out_channels: int | None = None) -> dict:
    bias = getattr(layer, "bias", None) is not None
    if isinstance(layer, nn.Linear):
        return {"type": "Linear", "in_features": layer.in_features, "out_channels": out_channels or layer.out_features,
                "spatial_dims": 0, "bias": bias}
    dims = layer.weight.ndim - 2
    spec = {"type": f"Conv{dims}d", "in_channels": layer.in_channels, "out_channels": out_channels or layer.out_channels,
            "kernel_size": list(layer.kernel_size), "stride": list(layer.stride),
            "padding": layer.padding if isinstance(layer.padding, str) else list(layer.padding),
            "dilation": list(layer.dilation), "groups": layer.groups, "padding_mode": layer.padding_mode,
            "spatial_dims": dims, "bias": bias}
    if isinstance(layer, _TRANSPOSED):
        spec.update(type=f"ConvTranspose{dims}d", output_padding=list(layer.output_padding))
    return spec


def layer_from_spec(spec: dict, out_channels: int | None = None) -> nn.Module:
    """An empty nn.Linear/ConvNd/ConvTransposeNd from `_layer_spec`; weights are loaded afterwards."""
    out, bias = out_channels or spec["out_channels"], spec.get("bias", True)
    if spec["type"] == "Linear":
        return nn.Linear(spec["in_features"], out, bias=bias)
    padding = spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"])
    options = dict(stride=tuple(spec["stride"]), padding=padding, dilation=tuple(spec["dilation"]),
                   groups=spec["groups"], padding_mode=spec["padding_mode"], bias=bias)
    if spec["type"].startswith("ConvTranspose"):
        return _CONV_T[spec["spatial_dims"]](spec["in_channels"], out, tuple(spec["kernel_size"]),
                                             output_padding=tuple(spec["output_padding"]), **options)
    return _CONV[spec["spatial_dims"]](spec["in_channels"], out, tuple(spec["kernel_size"]), **options)


def _plain_layer(template: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A standard layer with the template's hyper-parameters and the given [out, in/groups, *k] weights."""
    if is_hf_conv1d(template):
        spec = {"type": "Linear", "in_features": weight.shape[1], "out_channels": weight.shape[0], "spatial_dims": 0}
    else:
        spec = _layer_spec(template)
    spec["bias"] = bias is not None
    layer = layer_from_spec(spec, out_channels=weight.shape[0]).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(_swap_in_out(weight, layer.groups) if isinstance(layer, _TRANSPOSED) else weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.requires_grad_(False)


def _concat_layers(layers: list[nn.Module], groups: int) -> nn.Module:
    """One layer computing all of `layers` (same input): their output channels one after the other, or for
    grouped convs (layers of equal width) interleaved per group, [g, 1+k, C/g], to keep the group assignment."""
    first = layers[0]
    biases = [m.bias.detach() if m.bias is not None else m.weight.new_zeros(_out_channels(m)) for m in layers]
    if groups == 1:
        weight, bias = torch.cat([m.weight.detach() for m in layers]), torch.cat(biases)
    else:
        per_group = _out_channels(first) // groups
        weight = torch.stack([m.weight.detach().unflatten(0, (groups, per_group)) for m in layers], 1).flatten(0, 2)
        bias = torch.stack([b.unflatten(0, (groups, per_group)) for b in biases], 1).flatten()
    layer = layer_from_spec(_layer_spec(first), out_channels=weight.shape[0]).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer.requires_grad_(False)


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
    weight, bias = equivalent_weight_bias(_neuron_module(layer))
    template = layer.base_layer
    k = layer.num_dendrites
    sets = layer.dendrite_channels  # None, or [k, m]: the channels each dendrite serves
    scales = [s.detach() for s in layer.dendrite_scales]
    cascade = [_shared_cascade(u.detach(), sets, i) for i, u in enumerate(layer.dendrite_cascade)]
    live, pruned, peak = _live_dendrites(scales, cascade, prune_below)

    def emitting(i: int) -> bool:  # a live dendrite below prune_below only feeds later ones
        return peak[i] > 0 and peak[i] >= prune_below

    gone = {i for i, _ in pruned} - set(live)
    record = FoldRecord(name, "layer", k, 0, dropped=k - len(live) - len(gone), pruned=pruned)
    if not live:
        return _plain_layer(template, weight, bias), record
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
        return _plain_layer(template, weight, bias), record
    main = _plain_layer(template, weight, bias)
    branches = [_plain_branch(layer.dendrite_layers[i], template) for i in live]
    if isinstance(main, _TRANSPOSED):
        layout = "separate"  # a transposed conv's weight is [in, out, ...]: its outputs do not concatenate
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
    t_sep, t_cat = _median_time(separate, x), _median_time(concat, x)
    return "concat" if t_cat < 0.95 * t_sep else "separate"


def _median_time(module: nn.Module, x: torch.Tensor, reps: int = 15) -> float:
    times = []
    with torch.no_grad():
        module(x)
        for _ in range(reps):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)
