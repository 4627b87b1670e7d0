"""The folded module: a target whose nonlinear dendrites remain, as plain layers and elementwise ops.

`FoldedDendrites` is what `fold.fold_layer` builds when a dendrite cannot be folded into the main weight; its
`spec` (shapes and hyper-parameters, no weights) goes into the folded directory's recipe and `from_spec`
rebuilds it empty for `load_folded`, as `layer_spec`/`layer_from_spec` do for a plain layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.layers import ACTIVATIONS, add_to_channels, channel_positions, family_for_spec, family_of, layers_and_norm
from ..core.recurrent import FoldedRecurrent


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
        family = family_of(main)
        self.out_channels, self.spatial_dims = family.channels_of(main), family.spatial_dims
        with torch.device("meta"):  # a plain attribute, not a submodule: no weights, no state-dict entries
            self.__dict__["_hyper"] = family.layer_from_spec(family.layer_spec(main))
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
            self.widths = [self.out_channels] + [family.channels_of(h) for h in heads]
            self.fused = _concat_layers([main, *heads], self.groups)

    @property
    def weight(self) -> torch.Tensor:
        """The main layer's weight (model code reads `.weight.dtype`/`.device`, as for DendriteLayer)."""
        return self.main.weight if self.layout == "separate" else self.fused.weight

    def __getattr__(self, name: str):
        """The main layer's hyper-parameters (`stride`, `padding`, `in_features`, ...) that model code reads, from
        a weightless copy on the meta device (in the concat layout no module holds them)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "_hyper":
                raise
        try:
            return getattr(self._hyper, name)
        except AttributeError:
            raise AttributeError(f"'FoldedDendrites' object has no attribute {name!r}") from None

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
        spec = {"kind": "dendrites", "layer": layer_spec(template, self.out_channels), "activation": self.activation,
                "layout": self.layout, "links": self.links, "emits": self.emits, "dendrites": self.k}
        if self.channels is not None:
            spec["width"] = self.channels.shape[1]
        if self.layout == "separate":  # low-rank branches are two small layers
            spec["branches"] = [[layer_spec(m) for m in layers_and_norm(b)[0]] for b in self.branches]
        else:  # the one layer's slices, and the second factor of each low-rank branch
            spec["widths"] = self.widths
            spec["tails"] = [None if isinstance(t, nn.Identity) else layer_spec(t) for t in self.tails]
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


def module_spec(module: nn.Module) -> dict:
    """What the fold made of one target, as JSON (its kind, shapes and hyper-parameters, no weights)."""
    if isinstance(module, FoldedDendrites):
        return module.spec()
    if isinstance(module, FoldedRecurrent):
        return {"kind": "recurrent", "projection": module_spec(module.projection),
                "recurrence": layer_spec(module.recurrence), "input_size": module.input_size}
    return {"kind": "layer", "layer": layer_spec(module)}


def module_from_spec(spec: dict) -> nn.Module:
    """The empty module a `module_spec` describes; weights are loaded afterwards."""
    if spec["kind"] == "dendrites":
        return FoldedDendrites.from_spec(spec)
    if spec["kind"] == "recurrent":
        return FoldedRecurrent(module_from_spec(spec["projection"]), layer_from_spec(spec["recurrence"]),
                               int(spec["input_size"]))
    return layer_from_spec(spec["layer"])


def layer_spec(layer: nn.Module, out_channels: int | None = None) -> dict:
    """A plain layer (nn.Linear, ConvNd, ...) as JSON: its type and hyper-parameters, no weights."""
    return family_of(layer).layer_spec(layer, out_channels)


def layer_from_spec(spec: dict, out_channels: int | None = None) -> nn.Module:
    """An empty plain layer from `layer_spec`; weights are loaded afterwards."""
    return family_for_spec(spec).layer_from_spec(spec, out_channels)


def _concat_layers(layers: list[nn.Module], groups: int) -> nn.Module:
    """One layer computing all of `layers` (same input): their output channels one after the other, or for
    grouped convs (layers of equal width) interleaved per group, [g, 1+k, C/g], to keep the group assignment."""
    family = family_of(layers[0])
    weights = [family.out_major(m) for m in layers]
    biases = [m.bias.detach() if m.bias is not None else w.new_zeros(w.shape[0]) for m, w in zip(layers, weights)]
    if groups == 1:
        weight, bias = torch.cat(weights), torch.cat(biases)
    else:
        per_group = weights[0].shape[0] // groups
        weight = torch.stack([w.unflatten(0, (groups, per_group)) for w in weights], 1).flatten(0, 2)
        bias = torch.stack([b.unflatten(0, (groups, per_group)) for b in biases], 1).flatten()
    return family.plain_layer(layers[0], weight, bias)
