"""`gromo`'s own growth (TINY: Verbockhaven et al., TMLR 2024) as the external reference arm of benchmarks/growth.py.

gromo 0.1.0's `GrowingMLP` (Linear layers with one activation after each hidden one) is the same network as
an `nn.Sequential` of Linear layers with ReLU between them, so such a model is grown by gromo itself: its
weights are copied in, each hidden layer gains the neurons `widen_plan` gives it for the budget (the units
the `widen` arm adds), one layer at a time in gromo's own steps (statistics over one pass of the training
batches with the summed loss, `compute_optimal_updates` with its defaults, the scaling factor line-searched
on the training loss with `extended_forward`, `apply_change`), and the grown network is copied back into a
plain `nn.Sequential` that trains like every other arm. TINY adds at most as many neurons per step as its
statistics find useful directions (a two-class output gives one), so a layer takes further steps, each on
fresh statistics, until it has its neurons or a step adds none (the row's added parameters then say so).

Other architectures are not grown: the bars CNN (Conv2d + BatchNorm2d + pooling) and the BERT have no
gromo 0.1.0 container that builds the same network, so the arm is skipped there with that reason.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from growth_arms import widen_plan

# Scaling factors tried (gromo's tutorial tries 0, 0.1, 0.5, 1). Not 0: a step of 0 would add dead neurons,
# zero in and out, which never train; the arm adds its neurons, as `widen` does.
STEPS = [2.0**k for k in range(-4, 4)]


def unavailable(model: nn.Module) -> str | None:
    """Why gromo cannot grow `model` here, or None when it can."""
    if importlib.util.find_spec("gromo") is None:
        return "the gromo package is not installed (pip install -e '.[bench]')"
    if not _is_growing_mlp(model):
        return f"gromo's GrowingMLP builds Linear/ReLU chains only, not this {type(model).__name__}"
    return None


def _is_growing_mlp(model: nn.Module) -> bool:
    """Whether `model` is Linear, ReLU, Linear, ..., Linear with biases and one hidden width (a GrowingMLP)."""
    if not isinstance(model, nn.Sequential) or len(model) < 3 or len(model) % 2 == 0:
        return False
    if not all(type(m) is (nn.Linear if i % 2 == 0 else nn.ReLU) for i, m in enumerate(model)):
        return False
    return len({m.out_features for m in model[:-1:2]}) == 1 and all(m.bias is not None for m in model[::2])


def grow(model: nn.Module, budget: int, adapter) -> nn.Module:
    """`model` grown by gromo to about `budget` more parameters, as a plain nn.Sequential."""
    from gromo.containers.growing_mlp import GrowingMLP

    linears = list(model[::2])
    net = GrowingMLP(linears[0].in_features, linears[-1].out_features, hidden_size=linears[0].out_features,
                     number_hidden_layers=len(linears) - 1, activation=nn.ReLU())
    with torch.no_grad():
        for mine, theirs in zip(linears, net.layers):
            theirs.layer.weight.copy_(mine.weight)
            theirs.layer.bias.copy_(mine.bias)
    net.eval()
    for index, units in enumerate(widen_plan(model, budget).values()):
        target = net.layers[index].out_features + units
        while net.layers[index].out_features < target:  # TINY may find fewer useful neurons per step than asked
            before = net.layers[index].out_features
            _grow_layer(net, index, target - before, adapter)
            if net.layers[index].out_features == before:
                break
    return _plain(net)


def _grow_layer(net, index: int, units: int, adapter) -> None:
    """One gromo growth step: up to `units` neurons in hidden layer `index`."""
    net.set_growing_layers(index=index)
    net.init_computation()
    for batch in adapter.train_data():
        net.zero_grad()
        (adapter.loss(net(_input(adapter, batch)), batch) * len(batch[1])).backward()  # gromo averages itself
        net.update_computation()
    net.compute_optimal_updates(maximum_added_neurons=units)
    net.reset_computation()
    net.dummy_select_update()  # the one layer set above

    def train_loss(step: float) -> float:
        net.set_scaling_factor(step)
        with torch.no_grad():
            pairs = [(float(adapter.loss(net.extended_forward(_input(adapter, b)), b)), len(b[1]))
                     for b in adapter.train_data()]
        return sum(v * n for v, n in pairs) / sum(n for _, n in pairs)

    net.set_scaling_factor(min(STEPS, key=train_loss))
    net.apply_change()
    net.zero_grad(set_to_none=True)


def _input(adapter, batch) -> torch.Tensor:
    args, _ = adapter.model_inputs(batch)
    return args[0]


def _plain(net) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, grown in enumerate(net.layers):
        weight, bias = grown.layer.weight.detach(), grown.layer.bias.detach()
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        layers += [linear] if i == len(net.layers) - 1 else [linear, nn.ReLU()]
    return nn.Sequential(*layers)
