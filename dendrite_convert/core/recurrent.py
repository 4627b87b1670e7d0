"""nn.LSTM and nn.GRU as a layer family: a dendrite per gate pre-activation, fed by the layer's input.

The gates of one LSTM layer (i, f, g, o; a GRU's r, z, n) have the pre-activations W_ih x_t + b_ih + W_hh h_{t-1} + b_hh:
C = 4H (3H) channels. A dendrite adds s_c * a(D(x_t) + cascade) to gate channel c at every step, with D a Linear from
the input (an input-to-hidden dendrite; low rank: Linear(in, R) then Linear(R, C)). A GRU's n gate reads
r * (W_hn h + b_hn); its dendrite term is added on the input side, before tanh, like W_in x.

A dendrite reads x_t only, so the gate inputs of every step come first, in one batched pass:
G = W_ih x + b_ih + sum_i s_i h_i, the math of a Linear with dendrites (`inner_projection`). The recurrence then runs
in torch's own fused kernel on G through an identity input weight: gates = I G + W_hh h + b_hh. That is exact in real
arithmetic; in float32 the output is within about 1e-6 of nn.LSTM/GRU (the kernel adds in another order), so with no
dendrites the layer calls the original module unchanged, bit for bit. The fold folds G like any Linear: identity
dendrites (and dead ones) into W_ih, giving a plain nn.LSTM/GRU; nonlinear ones stay as Linears before a plain
nn.LSTM(C, H) with the identity input weight (`FoldedRecurrent`), which ONNX exports as an LSTM/GRU op. The identity
costs C^2 multiply-adds per step and sample (16H^2 for an LSTM) besides the dendrites.

Opt-in (`by_default = False`, `--include LSTM`/`GRU`/a name/`*`): adding a dendrite with a zero scale moves the
output by float rounding (~1e-7), not bit for bit, and the export carries the identity GEMM. A stacked or
bidirectional module has one gate set per layer and direction: conversion splits it into one-layer, one-direction
parts, each a target of this family (`split`, recurrent_stack.py). Refused with a reason: proj_size (ONNX's LSTM has
no projection, so not even the plain layer exports). Dendrites reading h_{t-1} are not offered: a nonlinear function
of the state inside the recurrence cannot be precomputed and would need an unrolled loop. The error signal
(channel-selective ranking, correlation candidates) is dloss/dG, seen at `error_site`, so channel-selective dendrites
serve the gate channels with the largest error and candidates fit it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence

from .dendrite import DendriteLayer
from .families import DendriteLinear
from .recurrent_stack import RecurrentStack


class DendriteRecurrent(DendriteLayer):
    """A one-layer, one-direction LSTM/GRU (or one part of a stacked one) whose C gate channels (on the last axis of
    G) get the dendrites."""

    by_default = False
    gates = 0  # 4 for LSTM, 3 for GRU
    concatenable = False  # the layer itself is never concatenated: its inner projection is

    @classmethod
    def refusal(cls, module: nn.Module) -> str | None:
        if getattr(module, "proj_size", 0):
            return (f"{type(module).__name__} with proj_size={module.proj_size}: ONNX's LSTM has no projection, so "
                    "neither this layer nor its dendrites would export; use proj_size=0 or a Linear after the LSTM")
        return super().refusal(module)

    @classmethod
    def split(cls, module: nn.Module) -> RecurrentStack | None:
        """A stacked or bidirectional module as one part per layer and direction (recurrent_stack.py)."""
        if module.num_layers == 1 and not module.bidirectional:
            return None
        return RecurrentStack(module, cls.layer_type)

    @classmethod
    def channels_of(cls, layer: nn.Module) -> int:
        return cls.gates * layer.hidden_size

    @classmethod
    def main_weight(cls, layer: nn.Module) -> torch.Tensor:
        return layer.weight_ih_l0

    @classmethod
    def narrowable(cls, base: nn.Module) -> bool:
        return isinstance(base._parameters.get("weight_ih_l0"), nn.Parameter)

    @classmethod
    def narrow_copy(cls, base: nn.Module, width: int) -> nn.Module:
        """A dendrite's shape: a Linear from the input to `width` gate channels (weights re-drawn by the caller)."""
        weight = base.weight_ih_l0
        return nn.Linear(base.input_size, width, device=weight.device, dtype=weight.dtype)

    @classmethod
    def low_rank_factors(cls, base, rank, width, bias, **factory):
        n_in = base.input_size
        if rank * (n_in + width) >= n_in * width:
            return None
        return nn.Linear(n_in, rank, bias=False, **factory), nn.Linear(rank, width, **factory)

    @classmethod
    def layer_spec(cls, layer: nn.Module, out_channels: int | None = None) -> dict:
        return {"type": cls.layer_type.__name__, "input_size": layer.input_size, "hidden_size": layer.hidden_size,
                "bias": layer.bias, "batch_first": layer.batch_first, "out_channels": cls.channels_of(layer),
                "spatial_dims": 0}

    @classmethod
    def layer_from_spec(cls, spec: dict, out_channels: int | None = None) -> nn.Module:
        return cls.layer_type(spec["input_size"], spec["hidden_size"], bias=spec["bias"], batch_first=spec["batch_first"])

    def neuron(self, x: torch.Tensor) -> torch.Tensor:
        """The gate inputs without dendrites, W_ih x + b_ih, for every step at once."""
        base = self.base_layer
        return F.linear(x, base.weight_ih_l0, base.bias_ih_l0 if base.bias else None)

    def __init__(self, base_layer: nn.Module, *args, **kwargs):
        super().__init__(base_layer, *args, **kwargs)
        self.gate_inputs = _GateInputs()

    def error_site(self) -> nn.Module:
        return self.gate_inputs

    def runs_original(self) -> bool:
        """No dendrites and nobody listening at the gate inputs: the wrapped module computes this layer, bit for bit."""
        return not self.dendrite_layers and not self.gate_inputs._forward_hooks

    def forward(self, input, hx=None):
        """nn.LSTM/GRU's call, with the dendrites added to the gate pre-activations of every step."""
        if self.runs_original():
            return self.base_layer(input, hx)
        base = self.base_layer
        packed = isinstance(input, PackedSequence)
        x = input.data if packed else input
        gates = self.gate_inputs(x, super().forward(x))  # G = W_ih x + b_ih + sum_i s_i h_i
        if packed:
            gates = PackedSequence(gates, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        weights = self._recurrence_weights(base.weight_hh_l0, base.bias_hh_l0 if base.bias else None)
        return functional_call(self._recurrence(), weights, (gates, hx))

    def _recurrence(self) -> nn.Module:
        """nn.LSTM/GRU(C, H) on the meta device: torch's checks and fused kernel, run with `_recurrence_weights`."""
        cached = self.__dict__.get("_meta_recurrence")
        base = self.base_layer
        if cached is None or cached.batch_first != base.batch_first:
            cached = self.layer_type(self.out_channels, base.hidden_size, batch_first=base.batch_first, device="meta")
            self.__dict__["_meta_recurrence"] = cached
        return cached

    def _recurrence_weights(self, weight_hh: torch.Tensor, bias_hh: torch.Tensor | None) -> dict:
        """An identity input weight and zero input bias, so the recurrence reads G as its gate inputs."""
        c = self.out_channels
        eye = torch.eye(c, device=weight_hh.device, dtype=weight_hh.dtype)
        zeros = weight_hh.new_zeros(c)
        return {"weight_ih_l0": eye, "weight_hh_l0": weight_hh, "bias_ih_l0": zeros,
                "bias_hh_l0": zeros if bias_hh is None else bias_hh}

    # the fold: G is a Linear with dendrites, folded like one; the recurrence goes around it

    def inner_projection(self) -> DendriteLayer:
        """G = W_ih x + b_ih with this layer's dendrites (the same modules and parameters), as a DendriteLinear."""
        base = self.base_layer
        weight = base.weight_ih_l0.detach()
        linear = nn.Linear(base.input_size, self.out_channels, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(base.bias_ih_l0.detach() if base.bias else torch.zeros_like(linear.bias))
        projection = DendriteLinear(linear, activation=self.activation, init_std=self.init_std, rank=self.rank)
        projection.dendrite_layers, projection.dendrite_scales = self.dendrite_layers, self.dendrite_scales
        projection.dendrite_cascade, projection.width = self.dendrite_cascade, self.width
        projection.dendrite_channels = self.dendrite_channels
        return projection.train(self.training)

    def around_projection(self, projection: nn.Module) -> nn.Module:
        """The layer with G computed by `projection`: a plain nn.LSTM/GRU with its input weights when the fold gave one
        Linear (identity or no live dendrites: exact), else `FoldedRecurrent` around the folded projection."""
        base = self.base_layer
        if isinstance(projection, nn.Linear):
            layer = self._plain(base.input_size, projection.weight, projection.bias)
            return layer.requires_grad_(False)
        eye = torch.eye(self.out_channels, device=base.weight_ih_l0.device, dtype=base.weight_ih_l0.dtype)
        recurrence = self._plain(self.out_channels, eye, eye.new_zeros(self.out_channels))
        return FoldedRecurrent(projection, recurrence, base.input_size).requires_grad_(False)

    def _plain(self, input_size: int, weight_ih: torch.Tensor, bias_ih: torch.Tensor | None) -> nn.Module:
        """A plain nn.LSTM/GRU of this layer's hidden size and layout with the given input weights (bias kept when the
        original has one or the input bias is not zero)."""
        base = self.base_layer
        bias = bool(base.bias) or (bias_ih is not None and bool(bias_ih.abs().max() > 0))
        layer = self.layer_type(input_size, base.hidden_size, bias=bias, batch_first=base.batch_first,
                                device=weight_ih.device, dtype=weight_ih.dtype)
        with torch.no_grad():
            layer.weight_ih_l0.copy_(weight_ih)
            layer.weight_hh_l0.copy_(base.weight_hh_l0)
            if bias:
                layer.bias_ih_l0.copy_(bias_ih if bias_ih is not None else torch.zeros_like(layer.bias_ih_l0))
                layer.bias_hh_l0.copy_(base.bias_hh_l0 if base.bias else torch.zeros_like(layer.bias_hh_l0))
        return layer


class _GateInputs(nn.Module):
    """Where G passes, so that a forward hook sees (x, G) and the gradient at G: the error signal of the gates (while
    a hook listens, the layer computes G even without dendrites)."""

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        return gates


class DendriteLSTM(DendriteRecurrent):
    """nn.LSTM (one layer, one direction): gates i, f, g, o, C = 4H."""

    layer_type, gates = nn.LSTM, 4


class DendriteGRU(DendriteRecurrent):
    """nn.GRU (one layer, one direction): gates r, z, n, C = 3H; dendrites add to n's input side."""

    layer_type, gates = nn.GRU, 3


class FoldedRecurrent(nn.Module):
    """A folded recurrent layer with nonlinear dendrites, in standard layers: the gate inputs G for every step (a
    Linear, or the fold's FoldedDendrites), then a plain nn.LSTM/GRU(C, H) whose input weight is the identity."""

    def __init__(self, projection: nn.Module, recurrence: nn.Module, input_size: int):
        super().__init__()
        self.projection, self.recurrence = projection, recurrence
        self.input_size = input_size  # of the layer this replaces (the recurrence's own is C)

    def forward(self, input, hx=None):
        if isinstance(input, PackedSequence):
            gates = PackedSequence(self.projection(input.data), input.batch_sizes, input.sorted_indices,
                                   input.unsorted_indices)
        else:
            gates = self.projection(input)
        return self.recurrence(gates, hx)

    def __getattr__(self, name: str):
        """The recurrence's attributes (`hidden_size`, `batch_first`, ...) that model code reads."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "recurrence":
                raise
        return getattr(self.recurrence, name)
