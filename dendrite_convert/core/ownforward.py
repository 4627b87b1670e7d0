"""Target subclasses that compute their output in their own forward, read through that computation.

timm's ScaledStdConv2d and StdConv2d standardise their weight in forward, Conv2dSame pads its input by the
input's size, timm's Linear calls F.linear itself. Their raw `.weight` and padding are not what they compute, so
a dendrite copied from them or a fold from their raw weight would be wrong. Such a layer is read by running it
(a copy sharing its tensors: some forwards cache things about their input) on probe inputs under a
TorchFunctionMode, and accepted only when its output is the output of one call of its family's functional
(F.linear, F.convNd) with its own stride, dilation and groups, on its input or on its input zero-padded as
TensorFlow's 'SAME' pads it, with a weight and bias that do not depend on the input. The plain layer built
from that call (its effective weight, in the layer's current mode: eval at fold time) must reproduce every
probe bit for bit. Anything else is refused with the reason.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ConversionError
from .tfsame import TFSameConv, tf_same_pads

_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")  # F.linear takes the first three


Read = Callable[[nn.Module], "nn.Module | str | None"]  # a family's reader: plain layer, why not, or None


def overrides_forward(module: nn.Module, base: type[nn.Module] | None) -> str | None:
    """The first of `forward`/`_conv_forward` that `module`'s class overrides from `base`, or None (our own
    'SAME'-padded convs are plain layers)."""
    if base is None or isinstance(module, TFSameConv):
        return None
    return next((name for name in ("forward", "_conv_forward")
                 if getattr(type(module), name, None) is not getattr(base, name, None)), None)


def own_forward_refusal(module: nn.Module, base: type[nn.Module] | None, read: Read) -> str | None:
    """Why `module` (of a subclass of `base`) cannot be a target, or None: it overrides base's forward and its
    family's `read` finds no plain layer computing the same (a family that does not read refuses them all)."""
    own = overrides_forward(module, base)
    plain = None if own is None else read(module)
    if own is None or isinstance(plain, nn.Module):
        return None
    why = f"which is not one plain {base.__name__} computation: {plain}" if plain else \
        "which dendrites and the fold cannot reproduce from its weight"
    return f"{type(module).__name__} computes its output in its own {own} (it overrides {base.__name__}'s), {why}"


def plain_form(layer: nn.Module, base: type[nn.Module] | None, read: Read) -> nn.Module:
    """`layer` itself, or the plain layer `read` makes of a subclass with its own forward."""
    if overrides_forward(layer, base) is None:
        return layer
    plain = read(layer)
    if not isinstance(plain, nn.Module):
        raise ConversionError(f"{own_forward_refusal(layer, base, read)}; convert the model again to leave it "
                              "without dendrites.")
    return plain


class _Calls(TorchFunctionMode):
    """Records the top-level calls of `functional` and of F.pad, with their bound arguments and outputs."""

    def __init__(self, functional):
        super().__init__()
        self.functional, self.calls, self.pads = functional, [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is self.functional:
            self.calls.append(({**dict(zip(_ARGS, args)), **kwargs}, out))
        elif func is F.pad:
            self.pads.append(({**dict(zip(("input", "pad", "mode", "value"), args)), **kwargs}, out))
        return out


def _tuple(value, n: int):
    return tuple(value) if isinstance(value, (tuple, list)) else value if isinstance(value, str) else (value,) * n


def read_own_forward(layer: nn.Module, functional: Callable, probes: list[torch.Tensor],
                     build: Callable[[torch.Tensor, torch.Tensor | None, bool], nn.Module]) -> nn.Module | str:
    """The plain layer that computes what `layer` computes (`build(weight, bias, tf_same)`), or why there is none.

    `probes` are inputs of the layer's input shape (for a conv, sizes covering every remainder of its stride).
    On the meta device only the structure of the call is checked.
    """
    name = functional.__name__
    dims = getattr(layer, "kernel_size", ())
    runner = copy.deepcopy(layer, memo={id(t): t for t in [*layer.parameters(), *layer.buffers()]})
    read: tuple | None = None
    real = not probes[0].is_meta  # on the meta device (a recipe checked before loading) only the structure is read
    outputs = []
    for x in probes:
        with torch.no_grad(), _Calls(functional) as seen:
            y = runner(x)
        if len(seen.calls) != 1:
            return f"it makes {len(seen.calls)} {name} calls, not one"
        call, out = seen.calls[0]
        if y is not out:
            return f"its output is not that of its {name} call"
        padded = call["input"] is not x
        if padded and not dims:
            return f"it transforms its input before its {name} call"
        if padded:
            pad = next((p for p, o in seen.pads if o is call["input"] and p["input"] is x), None)
            if pad is None or pad.get("mode", "constant") != "constant" or pad.get("value") not in (None, 0):
                return f"it transforms its input before its {name} call"
            if list(pad["pad"]) != tf_same_pads(x.shape[-len(dims):], layer.kernel_size, layer.stride, layer.dilation):
                return "it pads its input otherwise than TensorFlow's 'SAME' padding"
        if dims:
            geometry = [(_tuple(call.get(k, d), len(dims)), getattr(layer, k)) for k, d in
                        (("stride", 1), ("dilation", 1))] + [(call.get("groups", 1), layer.groups)]
            geometry.append((_tuple(call.get("padding", 0), len(dims)), (0,) * len(dims) if padded else layer.padding))
            if any(got != want for got, want in geometry):
                return f"it calls {name} with other stride, padding, dilation or groups than its attributes"
        weight, bias = call["weight"], call.get("bias")
        if read is None:
            read = (weight, bias, padded)
        elif padded != read[2] or (bias is None) != (read[1] is None) or real and not (
                torch.equal(weight, read[0]) and (bias is None or torch.equal(bias, read[1]))):
            return f"the weight, bias or padding of its {name} call depends on the input"
        outputs.append(y)
    weight, bias, padded = read
    plain = build(weight.detach(), None if bias is None else bias.detach(), padded)
    with torch.no_grad():
        if real and not all(torch.equal(plain(x), y) for x, y in zip(probes, outputs)):
            return f"the plain {name} layer read from it computes something else"
    return plain
