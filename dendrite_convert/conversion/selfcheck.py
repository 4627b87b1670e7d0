"""Conversion proves itself (docs/design.md §9): with zero dendrites the converted model must compute, bit for bit,
what the original computed on an example input, or the conversion fails naming the first target that differs.

The original is not copied: its outputs (the model's and every candidate target's and norm's, per call)
are recorded before the rewrite, and the rewritten model is run afterwards with a hook on each dendrite
layer, compared in execution order. Both runs see the same random stream (dropout in train mode) and leave
the buffers (BatchNorm running statistics) as they were.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..core.errors import ConversionError, UsageError
from ..core.layers import (NORM_LAYERS, DendriteHFConv1D, DendriteLayer, dendrite_class_for, dendrite_layers,
                           one_layer_key)

_SPATIAL = {1: 64, 2: 32, 3: 16}  # derived conv inputs: small, but large enough for a few stride-2 stages


@dataclass
class Reference:
    """What the original model computed on `inputs`, recorded before the rewrite."""

    inputs: tuple | dict  # positional inputs, or keyword ones (several named specs)
    description: str
    outputs: list[torch.Tensor]
    exact: bool = True  # bit for bit on CPU; accelerators may pick nondeterministic kernels (see _same)
    calls: dict[int | tuple, list[list[torch.Tensor]]] = field(default_factory=dict)  # _site_key -> outputs per call


def derived_inputs(model: nn.Module) -> list[dict]:
    """An input spec read off the first layer (Linear in_features, Conv in_channels, Embedding), or []."""
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return [{"shape": [2, 8], "dtype": "int64", "high": m.num_embeddings}]
        dtype = str(getattr(m, "weight", torch.empty(0)).dtype).removeprefix("torch.")
        if isinstance(m, nn.Linear):
            return [{"shape": [2, m.in_features], "dtype": dtype}]
        if isinstance(m, nn.RNNBase):  # 2 sequences of 8 steps
            dtype = str(m.weight_ih_l0.dtype).removeprefix("torch.")
            return [{"shape": [2, 8, m.input_size] if m.batch_first else [8, 2, m.input_size], "dtype": dtype}]
        if DendriteHFConv1D.matches(m):
            return [{"shape": [2, m.weight.shape[0]], "dtype": dtype}]
        if isinstance(m, nn.modules.conv._ConvNd):
            dims = len(m.kernel_size)
            return [{"shape": [2, m.in_channels, *[_SPATIAL[dims]] * dims], "dtype": dtype}]
    return []


def _tensor(spec: dict, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    dtype = getattr(torch, str(spec.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"example input dtype {spec.get('dtype')!r} is not a torch dtype such as float32 or int64.")
    if dtype.is_floating_point:
        value = torch.randn(spec["shape"], generator=generator).to(dtype)
    else:
        value = torch.randint(0, int(spec.get("high", 2)), spec["shape"], dtype=dtype, generator=generator)
    return value.to(device)


@contextlib.contextmanager
def isolated(model: nn.Module, device: torch.device):
    """No gradients, a fixed random stream, and buffers (running statistics) put back afterwards, whether
    forward updated them in place or assigned new tensors."""
    saved = [(m, name, b, b.detach().clone()) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.random.default_generator.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.manual_seed(0)
        try:
            yield
        finally:
            for module, name, buffer, value in saved:
                buffer.copy_(value)
                module._buffers[name] = buffer


def model_device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    tensor = tensor if tensor is not None else next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def example_tensors(specs: list[dict], device: torch.device) -> tuple | dict:
    """Inputs made from specs with a fixed seed: positional, or keyword when several specs are named
    (input_ids and decoder_input_ids of an encoder-decoder)."""
    generator = torch.Generator().manual_seed(0)
    values = tuple(_tensor(s, generator, device) for s in specs)
    if len(specs) > 1 and all("name" in s for s in specs):
        return {s["name"]: v for s, v in zip(specs, values)}
    return values


def run_on(model: nn.Module, inputs: tuple | dict):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _run(model: nn.Module, inputs: tuple | dict) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tree_leaves(run_on(model, inputs)) if isinstance(t, torch.Tensor)]


def record(model: nn.Module, specs: list[dict], description: str, explicit: bool) -> Reference | str:
    """Run the original on inputs made from `specs`; returns why the check is skipped when it cannot run.

    An input the caller gave (`explicit`) that the model cannot run on is a usage error; a derived one is a skip.
    """
    if not specs:
        return "self-check skipped: no example input could be derived from the model; pass an input shape (--input-shape)"
    device = model_device(model)
    if device.type == "meta":
        return "self-check skipped: the weights are on the meta device"
    shapes = [s.get("shape") for s in specs]
    shapes = shapes[0] if len(shapes) == 1 else shapes
    try:
        inputs = example_tensors(specs, device)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise UsageError(f"example input {specs!r} cannot be made ({exc}); give shapes as lists of positive integers.") from exc
    reference = Reference(inputs, f"{description} of shape {shapes}", [], exact=device.type == "cpu")
    sites = [m for m in model.modules() if dendrite_class_for(m) is not None or isinstance(m, NORM_LAYERS)]

    def keep(module, args, output):
        reference.calls.setdefault(_site_key(module), []).append([t.detach().clone() for t in tree_leaves(output)
                                                                  if isinstance(t, torch.Tensor)])

    handles = [m.register_forward_hook(keep) for m in sites]
    try:
        with isolated(model, device):
            reference.outputs = _run(model, inputs)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        if explicit:
            raise UsageError(f"the model cannot run on the example input of shape {shapes} ({type(exc).__name__}: "
                             f"{first}); give an input shape it accepts (input_shape=).", parameter="input_shape") from exc
        return (f"self-check skipped: the model does not run on the {reference.description} "
                f"({type(exc).__name__}); pass an input shape it accepts (--input-shape)")
    finally:
        for handle in handles:
            handle.remove()
    return reference


def _same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> bool:
    """Bit-for-bit equal values (NaN where the other has NaN counts as equal); off the CPU, within 16 units
    of the dtype's precision at the output's scale, since two runs there may reduce in another order."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not (a.is_floating_point() or a.is_complex()):
        return torch.equal(a, b)
    if exact:
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    scale = max(1.0, float(b.abs().nan_to_num().max())) if b.numel() else 1.0
    return torch.allclose(a, b, rtol=0.0, atol=16 * torch.finfo(b.dtype).eps * scale, equal_nan=True)


def _all_same(left: list[torch.Tensor], right: list[torch.Tensor], exact: bool) -> bool:
    return len(left) == len(right) and all(_same(a, b, exact) for a, b in zip(left, right))


def _site_key(module: nn.Module) -> int | tuple:
    """Where an original output is filed: a norm by itself, a target by the key that conversion groups targets
    by, so that the modules merged into one dendrite layer share one list of calls and tied layers of
    another type (an embedding and its output projection) keep their own."""
    if isinstance(module, NORM_LAYERS):
        return id(module)
    return one_layer_key(module)


def _original_site(layer: DendriteLayer) -> int | tuple:
    """The key of what a dendrite layer without dendrites reproduces: its norm if paired, else its base."""
    return _site_key(layer.norm if layer.norm is not None else layer.base_layer)


def verify(model: nn.Module, reference: Reference) -> str:
    """Compare the rewritten model (zero dendrites) with the recorded original; returns the report note.

    Raises ConversionError naming the first target, in execution order, whose output differs.
    """
    mismatches: list[str] = []
    calls: dict[int, int] = {}

    def compare(name: str):
        def hook(layer, args, output):
            site = _original_site(layer)
            index = calls[id(layer)] = calls.get(id(layer), -1) + 1
            recorded = reference.calls.get(site)
            if recorded is None:  # a layer made for a functional call has no module in the original
                return
            got = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
            if index >= len(recorded):
                mismatches.append(f"{name} is called more often than in the original ({index + 1} > {len(recorded)})")
            elif not _all_same(got, recorded[index], reference.exact):
                mismatches.append(f"{name}{f' (call {index + 1})' if index else ''} differs from the original")
        return hook

    handles = [layer.register_forward_hook(compare(name)) for name, layer in dendrite_layers(model).items()]
    try:
        with isolated(model, model_device(model)):
            outputs = _run(model, reference.inputs)
    except Exception as exc:
        raise ConversionError(f"the converted model fails on the {reference.description} that the original runs "
                              f"({type(exc).__name__}: {str(exc).strip()[:200]}); the rewrite is wrong, "
                              "nothing was written.") from exc
    finally:
        for handle in handles:
            handle.remove()
    if mismatches:
        raise ConversionError(f"self-check failed: with zero dendrites the converted model does not compute what the "
                              f"original computed on the {reference.description}: target {mismatches[0]}; "
                              "nothing was written; exclude that target (exclude=) and report the model as a bug.")
    if not _all_same(outputs, reference.outputs, reference.exact):
        raise ConversionError(f"self-check failed: with zero dendrites the converted model's output differs from the "
                              f"original's on the {reference.description}, although every target's own output "
                              "matches; nothing was written.")
    how = "bit for bit" if reference.exact else f"to 16 units of precision on {model_device(model).type}"
    return f"self-check passed: with zero dendrites the output matches the original {how} on the {reference.description}"
