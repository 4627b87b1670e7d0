"""A stacked or bidirectional nn.LSTM/GRU as one target per layer and direction.

torch computes every layer and direction of such a module in one call, yet each (layer, direction) has a gate set of
its own with an input of its own: layer l > 0 reads the outputs of layer l - 1 (both directions side by side, with
dropout between layers in training). Its dendrites must read that input, so conversion splits the module: each
(layer, direction) becomes a one-layer, one-direction LSTM/GRU holding the original's Parameters, named after torch's
weight suffixes (`l0`, `l0_reverse`, `l1`, ...), a target like a single LSTM/GRU (recurrent.py). `RecurrentStack`
runs the parts in torch's order. A reverse part runs forward in time on the reversed input (a PackedSequence's
sequences each reversed within its own length) and its output is reversed back; h_n (and c_n) stack the parts' final
states layer by layer, forward before reverse, as torch does.

While no part has dendrites (or a listener at its gate inputs) the whole module runs as torch's one fused call on
the parts' Parameters: bit for bit the original, at its speed. Otherwise, and after the fold (when the parts are
plain layers or `FoldedRecurrent`s), the parts run one after the other; ONNX gets one LSTM/GRU op per part.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence

from .dendrite import DendriteLayer

_HYPER = ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
          "proj_size")
_FLAT_WEIGHT = re.compile(r"(weight|bias)_(ih|hh)_l(\d+)(_reverse)?")


class RecurrentStack(nn.Module):
    """An nn.LSTM/GRU with num_layers x directions one-layer, one-direction parts as its children."""

    def __init__(self, module: nn.Module, layer_type: type[nn.Module]):
        super().__init__()
        self.layer_type = layer_type
        for name in _HYPER:  # what model code reads (`rnn.hidden_size`, `rnn.bidirectional`, ...)
            setattr(self, name, getattr(module, name))
        directions = 2 if module.bidirectional else 1
        for layer in range(module.num_layers):
            for suffix in ("", "_reverse")[:directions]:
                size = module.input_size if layer == 0 else module.hidden_size * directions
                part = layer_type(size, module.hidden_size, bias=module.bias, batch_first=module.batch_first,
                                  device="meta")
                for weight in part._flat_weights_names:  # the original's Parameters themselves, not copies
                    setattr(part, weight, module.get_parameter(f"{weight[:-1]}{layer}{suffix}"))
                self.add_module(f"l{layer}{suffix}", part)

    def __getattr__(self, name: str):
        """A flat weight of the original (`weight_hh_l1_reverse`) read from the part that holds it."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            match = _FLAT_WEIGHT.fullmatch(name)
            part = self._modules.get(f"l{match[3]}{match[4] or ''}") if match else None
            if part is None:
                raise
        return getattr(part, f"{match[1]}_{match[2]}_l0")

    def flatten_parameters(self) -> None:
        """What model code calls before a cuDNN run: each part's own."""
        for part in self.children():
            part.flatten_parameters()

    def forward(self, input, hx=None):
        parts = list(self.children())
        if all(isinstance(part, DendriteLayer) and part.runs_original() for part in parts):
            return functional_call(self._fused().train(self.training), self._fused_weights(parts), (input, hx))
        directions = 2 if self.bidirectional else 1
        axis = 0 if not isinstance(input, PackedSequence) and (input.dim() == 2 or not self.batch_first) else 1
        x, finals = input, []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                k = layer * directions + direction
                state = None if hx is None else _select(hx, k)
                if direction:  # the reverse direction: forward in time on the reversed sequences
                    y, final = parts[k](_reversed(x, axis), state)
                    y = _reversed(y, axis)
                else:
                    y, final = parts[k](x, state)
                outputs.append(y)
                finals.append(final)
            x = _on_data(lambda *ys: torch.cat(ys, -1), *outputs)
            if layer < self.num_layers - 1 and self.dropout and self.training:
                x = _on_data(lambda y: F.dropout(y, self.dropout, training=True), x)
        if isinstance(finals[0], tuple):  # LSTM: (h_n, c_n)
            return x, tuple(torch.cat(states) for states in zip(*finals))
        return x, torch.cat(finals)

    def _fused(self) -> nn.Module:
        """The original module on the meta device: torch's fused call, run with the parts' Parameters."""
        fused = self.__dict__.get("_meta_fused")
        if fused is None:
            fused = self.layer_type(self.input_size, self.hidden_size, self.num_layers, bias=self.bias,
                                    batch_first=self.batch_first, dropout=self.dropout,
                                    bidirectional=self.bidirectional, device="meta")
            self.__dict__["_meta_fused"] = fused
        return fused

    def _fused_weights(self, parts: list[DendriteLayer]) -> dict:
        suffixes = ("", "_reverse")[: 2 if self.bidirectional else 1]
        names = [(layer, suffix) for layer in range(self.num_layers) for suffix in suffixes]
        return {f"{weight[:-1]}{layer}{suffix}": getattr(part.base_layer, weight)
                for part, (layer, suffix) in zip(parts, names) for weight in part.base_layer._flat_weights_names}


def _select(hx, k: int):
    """The initial state of part k: row k of h_0 (and of c_0)."""
    return tuple(h[k:k + 1] for h in hx) if isinstance(hx, tuple) else hx[k:k + 1]


def _on_data(fn, *inputs):
    """`fn` on tensors, or on the data of PackedSequences (which keep their batch sizes and order)."""
    first = inputs[0]
    if not isinstance(first, PackedSequence):
        return fn(*inputs)
    return PackedSequence(fn(*(p.data for p in inputs)), first.batch_sizes, first.sorted_indices,
                          first.unsorted_indices)


def _reversed(x, axis: int):
    """The sequences of `x` reversed in time: a flip of the time axis, or for a PackedSequence each sequence
    within its own length."""
    if not isinstance(x, PackedSequence):
        return x.flip(axis)
    return _on_data(lambda data: data.index_select(0, _reversal(x.batch_sizes).to(data.device)), x)


def _reversal(batch_sizes: torch.Tensor) -> torch.Tensor:
    """The row order of a PackedSequence's data that reverses every sequence within its length (its own inverse):
    row (t, b) takes row (length_b - 1 - t, b)."""
    sizes = batch_sizes.long()
    starts = sizes.cumsum(0) - sizes  # the first row of each step
    lengths = (sizes[None, :] > torch.arange(int(sizes[0]))[:, None]).sum(1)  # of the sequences, longest first
    step = torch.arange(len(sizes)).repeat_interleave(sizes)
    sequence = torch.arange(int(sizes.sum())) - starts.repeat_interleave(sizes)
    return starts[lengths[sequence] - 1 - step] + sequence
