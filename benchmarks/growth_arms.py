"""The non-dendritic ways to spend extra parameters on a trained model, for benchmarks/growth.py.

- `widen`: Net2WiderNet (Chen et al., ICLR 2016). Hidden units are duplicated (their incoming weights, bias
  and BatchNorm entries copied) and each original unit's outgoing weights are split among its copies with
  random shares that sum to one, so the function is unchanged while the copies' gradients differ.
- `widen-random`: the same new units, but freshly initialised as the layer type does, with zero outgoing
  weights: the function is unchanged too, and the new units start from new directions instead of copies.
- `add_lora`: LoRA-style adapters (Hu et al., ICLR 2022) on every Linear and Conv: y = W x + B A x with A
  initialised as the layer type does and B = 0, so the function is unchanged too.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dendrite_convert.core.layers import count_parameters, family_of

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
_PASS_THROUGH = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout, nn.BatchNorm1d, nn.BatchNorm2d)


def widen_pairs(model: nn.Module) -> list[tuple[str, str | None, str]]:
    """(producer, norm or None, consumer) module paths whose hidden units can be duplicated: consecutive
    weighted layers of a Sequential with only elementwise/pooling layers between them, and the
    intermediate -> output feed-forward pairs of BERT-style layers."""
    pairs = []
    if isinstance(model, nn.Sequential):
        names = [n for n, _ in model.named_children()]
        for i, name in enumerate(names):
            if not isinstance(model[i], _WEIGHTED):
                continue
            norm = None
            for j in range(i + 1, len(names)):
                child = model[j]
                if isinstance(child, _WEIGHTED):
                    if _fan_in_units(child) == _units(model[i]):
                        pairs.append((name, norm, names[j]))
                    break
                if not isinstance(child, _PASS_THROUGH):
                    break
                if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    norm = names[j]
    for name, m in model.named_modules():
        if hasattr(m, "intermediate") and hasattr(m, "output") and hasattr(m.intermediate, "dense"):
            pairs.append((f"{name}.intermediate.dense", None, f"{name}.output.dense"))
    return pairs


def _units(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _fan_in_units(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _unit_cost(model: nn.Module, pair: tuple[str, str | None, str], units: dict[tuple, int]) -> int:
    """Parameters one more unit of `pair` adds, given the units already planned (a layer that is both a
    consumer and a producer grows in both directions)."""
    producer, norm, consumer = (None if p is None else model.get_submodule(p) for p in pair)
    grown_in = sum(k for (_, _, c), k in units.items() if c == pair[0])  # producer's extra inputs
    grown_out = sum(k for (p, _, _), k in units.items() if p == pair[2])  # consumer's extra outputs
    kernel_in = producer.weight[0, 0].numel()
    kernel_out = consumer.weight[0, 0].numel()
    cost = kernel_in * (_fan_in_units(producer) + grown_in) + (producer.bias is not None)
    cost += kernel_out * (_units(consumer) + grown_out)
    return cost + (4 if norm is not None else 0)  # BatchNorm: weight, bias and two running statistics


def widen_plan(model: nn.Module, budget: int) -> dict[tuple, int]:
    """Units to add per pair, round-robin, with the total parameter cost closest to `budget`."""
    pairs = widen_pairs(model)
    if not pairs:
        raise ValueError(f"no layer pair of {type(model).__name__} can be widened")
    units, total, history = dict.fromkeys(pairs, 0), 0, [(0, {})]
    while total < budget:
        for pair in pairs:
            total += _unit_cost(model, pair, units)
            units[pair] += 1
            history.append((total, dict(units)))
            if total >= budget:
                break
    return min(history, key=lambda h: abs(h[0] - budget))[1]


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def widen(model: nn.Module, budget: int, generator: torch.Generator, fresh: bool = False) -> nn.Module:
    """A function-preserving wider copy of `model` with about `budget` more parameters: Net2WiderNet's copies,
    or with `fresh` new units that keep the layer type's own random initialisation (from the global RNG) and
    whose outgoing weights are zero."""
    model = copy.deepcopy(model)
    for (producer_path, norm_path, consumer_path), k in widen_plan(model, budget).items():
        if k == 0:
            continue
        producer, consumer = model.get_submodule(producer_path), model.get_submodule(consumer_path)
        n = _units(producer)
        copies = torch.randint(n, (k,), generator=generator)
        index = torch.cat([torch.arange(n), copies])
        share = 1 + 0.2 * (torch.rand(n + k, generator=generator) - 0.5)  # unequal shares break the symmetry
        share = share / torch.zeros(n).index_add_(0, index, share)[index]  # the shares of one unit sum to 1
        kept = n + k  # producer rows (and norm entries) copied from `index`; the rest keep their fresh init
        if fresh:
            kept, share = n, torch.cat([torch.ones(n), torch.zeros(k)])  # new units: fresh in, zero out
        wide, after = _resized(producer, out=n + k), _resized(consumer, inp=n + k)
        with torch.no_grad():
            wide.weight[:kept].copy_(producer.weight[index[:kept]])
            if producer.bias is not None:
                wide.bias[:kept].copy_(producer.bias[index[:kept]])
            shape = [1, n + k] + [1] * (consumer.weight.ndim - 2)
            after.weight.copy_(consumer.weight[:, index] * share.view(shape))
            if consumer.bias is not None:
                after.bias.copy_(consumer.bias)
        _set(model, producer_path, wide)
        _set(model, consumer_path, after)
        if norm_path is not None:
            norm = model.get_submodule(norm_path)
            wide_norm = type(norm)(n + k, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
            with torch.no_grad():
                for name in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(norm, name, None) is not None:
                        getattr(wide_norm, name)[:kept].copy_(getattr(norm, name)[index[:kept]])
            _set(model, norm_path, wide_norm.train(norm.training))
    return model


def _resized(layer: nn.Module, out: int | None = None, inp: int | None = None) -> nn.Module:
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        return nn.Linear(inp or layer.in_features, out or layer.out_features, bias=has_bias)
    return type(layer)(inp or layer.in_channels, out or layer.out_channels, layer.kernel_size, layer.stride,
                       layer.padding, layer.dilation, layer.groups, has_bias, layer.padding_mode)


class LoRA(nn.Module):
    """base(x) + up(down(x)): `down` = in -> rank (the layer type's own initialisation), `up` = rank -> out, zero."""

    def __init__(self, base: nn.Module, down: nn.Module, up: nn.Module):
        super().__init__()
        self.base, self.down, self.up = base, down, up

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def _adapter(base: nn.Module, rank: int) -> tuple[nn.Module, nn.Module] | None:
    family = family_of(base)
    factors = family.low_rank_dendrite(base, rank, init_std=1.0) if family is not None else None
    if factors is None:  # not cheaper than a full copy of the layer: no adapter there
        return None
    down, up = factors
    up.register_parameter("bias", None)
    nn.init.zeros_(up.weight)
    return down, up


def lora_cost(model: nn.Module, rank: int) -> int:
    return sum(count_parameters(nn.ModuleList(f)) for m in model.modules()
               if isinstance(m, _WEIGHTED) and (f := _adapter(m, rank)) is not None)


def lora_rank(model: nn.Module, budget: int) -> int:
    """The adapter rank whose total parameter count is closest to `budget`."""
    return min(range(1, 65), key=lambda r: abs(lora_cost(model, r) - budget))


def add_lora(model: nn.Module, rank: int) -> nn.Module:
    """A copy of `model` with a rank-`rank` adapter beside every Linear and Conv where that is cheaper than
    the layer itself."""
    model = copy.deepcopy(model)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, _WEIGHTED)]
    for name, layer in targets:
        factors = _adapter(layer, rank)
        if factors is not None:
            _set(model, name, LoRA(layer, *factors))
    return model
