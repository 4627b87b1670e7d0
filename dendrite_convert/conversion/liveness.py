"""Targets whose forward never runs because the model reads their weights directly (issue 19, item 2).

transformers' Mamba on CPU computes `dt_proj.weight @ x` and convolves with `conv1d.weight` itself: a
dendrite layer swapped in there would never run, get no gradient and break the fold. One run of the
example input, with a forward hook on every candidate layer and a torch-function mode that sees which
tensors feed a computation, tells such layers apart from ones that merely sit in a branch this input
does not take (those keep their dendrites). The layers found are skipped with `REASON`, which the
converted directory records, so loading skips the same ones without running anything.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..core.layers import dendrite_class_for
from .report import ConversionReport
from .selfcheck import example_tensors, isolated, model_device, run_on

REASON = "its forward never runs on the example input: the model reads its weight directly"


class _ValueReads(TorchFunctionMode):
    """Records the ids of tensors whose values feed a torch function returning a tensor (not `.dtype`, `.size()`)."""

    def __init__(self, watched: dict[int, str]):
        super().__init__()
        self.watched = watched
        self.read: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) or (isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor)):
            for value in tree_flatten((args, kwargs))[0]:
                if isinstance(value, torch.Tensor) and id(value) in self.watched:
                    self.read.add(id(value))
        return out


def unreached_targets(model: nn.Module, example_inputs: list[dict]) -> dict[str, str]:
    """{name: REASON} for every candidate layer (under each of its names) that the example run reads but never calls.

    Empty when there is no example input or the model cannot run on it (conversion goes on as before).
    """
    if not example_inputs:
        return {}
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if dendrite_class_for(module) is not None:
            names.setdefault(id(module), []).append(name)
    candidates = {id(m): m for m in model.modules() if id(m) in names}
    called: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _: called.add(id(mod))) for m in candidates.values()]
    weights = {id(m.weight): i for i, m in candidates.items() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    reads = _ValueReads(weights)
    modes = {m: m.training for m in model.modules()}
    try:
        device = model_device(model)
        example = example_tensors(example_inputs, device)
        model.eval()
        with isolated(model, device), reads:  # buffers and the random stream as they were, as for the self-check
            run_on(model, example)
    except Exception:  # a model that cannot run its example is reported by the caller's own checks
        return {}
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes.items():
            module.training = mode
    dead = {weights[w] for w in reads.read} - called
    return {name: REASON for i in dead for name in names[i]}


def recorded_unreached(recipe: ConversionReport) -> dict[str, str]:
    """The layers a converted directory's recipe skipped for `REASON`, to skip again at load."""
    return {s.name: s.reason for s in recipe.skipped if s.reason == REASON}
