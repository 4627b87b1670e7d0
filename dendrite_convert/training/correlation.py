"""The correlation objective of docs/design.md §4: cascade-correlation candidates (Fahlman & Lebiere 1990), per target.

With the network frozen, training batches run forward and backward while hooks record, per target,
its input `x` and its error signal `e = dloss/dy`. Per target, N candidate dendrites compute `h`
exactly as the layer's next dendrite would (its own type and hyper-parameters, the activation, the
cascade from the earlier dendrites) and are trained to maximise

    S = sum_c |corr_n(h[n, c], e[n, c])|

with n over samples (and positions, for convs). The best candidate is inserted with a zero scale and
frozen; the next neuron phase trains the network and the scales.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .adapter import batch_size
from ..core.channels import ErrorMoments, flat, select_channels
from ..core.layers import ACTIVATIONS, DendriteLayer


@dataclass(frozen=True)
class CorrelationConfig:
    candidates: int = 4
    epochs: int = 20  # passes over the recorded samples
    max_samples: int = 4096  # samples recorded per phase
    chunk: int = 256  # samples per candidate update
    lr: float = 0.05


def correlation_score(h: torch.Tensor, e: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """sum_c |corr(h[:, c], e[:, c])| for [n, C] inputs."""
    hc = h - h.mean(0)
    ec = e - e.mean(0)
    cov = (hc * ec).sum(0)
    return (cov / (hc.norm(dim=0) * ec.norm(dim=0) + eps)).abs().sum()


@torch.no_grad()
def _cascade_inputs(layer: DendriteLayer, x: torch.Tensor) -> list[torch.Tensor]:
    return layer.dendrite_outputs(x)


class _Candidate(nn.Module):
    """One candidate dendrite: the module a dendrite would be, plus its cascade weights."""

    def __init__(self, layer: DendriteLayer, channels: torch.Tensor | None):
        super().__init__()
        self.dendrite = layer.new_dendrite()
        self.channels = channels
        weight = layer.base_layer.weight
        self.cascade = nn.Parameter(torch.zeros(layer.num_dendrites, layer.width, device=weight.device,
                                                dtype=weight.dtype))

    def forward(self, layer: DendriteLayer, x: torch.Tensor, earlier: list[torch.Tensor]) -> torch.Tensor:
        z = layer.cascade_in(self.dendrite(x), self.cascade, earlier, self.channels)
        return ACTIVATIONS[layer.activation](z)


def each_error_signal(
    model: nn.Module,
    layers: dict[str, DendriteLayer],
    batches: Iterable,
    forward_loss: Callable[[object], torch.Tensor],
    max_samples: int,
    visit: Callable[[str, torch.Tensor, torch.Tensor], None],
) -> None:
    """Run training batches forward and backward and call `visit(target, x, e = dloss/dy)` for every call
    of a target that reaches the loss, until `max_samples` samples; no parameter is changed. Gradients are
    on even when called from an evaluation loop (Lightning runs callbacks there under inference mode)."""
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def hook(name):
        def fn(module, args, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                calls.append((name, args[0].detach(), output))
        return fn

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    seen = 0
    try:
        with torch.inference_mode(False), torch.enable_grad():  # batches too: no inference tensors
            for batch in batches:
                calls.clear()
                loss = forward_loss(batch)
                if loss is None:  # a loop may skip a batch (Lightning's training_step returning None)
                    continue
                grads = torch.autograd.grad(loss, [y for _, _, y in calls], allow_unused=True) if calls else []
                for (name, x, _), e in zip(calls, grads):
                    if e is not None:
                        visit(name, x, e.detach())
                seen += batch_size(batch)
                if seen >= max_samples:
                    break
    finally:
        for h in handles:
            h.remove()
        calls.clear()


def record_error_signals(model: nn.Module, layers: dict[str, DendriteLayer], batches: Iterable,
                         forward_loss: Callable[[object], torch.Tensor],
                         max_samples: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per target, the (x, e = dloss/dy) pairs of `each_error_signal`."""
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in layers}
    each_error_signal(model, layers, batches, forward_loss, max_samples,
                      lambda name, x, e: records[name].append((x, e)))
    return records


def _chunks(pairs: list[tuple[torch.Tensor, torch.Tensor]], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Merge consecutive recorded batches of equal trailing shapes into chunks of about `size` samples."""
    chunks, xs, es, n = [], [], [], 0
    for x, e in pairs:
        if xs and (x.shape[1:] != xs[0].shape[1:] or e.shape[1:] != es[0].shape[1:]):
            chunks.append((torch.cat(xs), torch.cat(es)))
            xs, es, n = [], [], 0
        xs.append(x)
        es.append(e)
        n += x.shape[0] if x.ndim else 1
        if n >= size:
            chunks.append((torch.cat(xs), torch.cat(es)))
            xs, es, n = [], [], 0
    if xs:
        chunks.append((torch.cat(xs), torch.cat(es)))
    return chunks


def train_candidates(
    layer: DendriteLayer, pairs: list[tuple[torch.Tensor, torch.Tensor]], config: CorrelationConfig,
    channels: torch.Tensor | None = None,
) -> tuple[nn.Module, torch.Tensor, float]:
    """Train N candidates for one target (serving `channels`, when selective); the best (module, cascade,
    mean correlation per channel served)."""
    chunks = _chunks(pairs, config.chunk)
    # Earlier dendrites are frozen during the phase: their outputs are computed once.
    errors = [flat(e, layer) for _, e in chunks]
    if channels is not None:
        errors = [e[:, channels.to(e.device)] for e in errors]
    prepared = [(x, e, _cascade_inputs(layer, x)) for (x, _), e in zip(chunks, errors)]
    candidates = [_Candidate(layer, channels) for _ in range(config.candidates)]
    params = [p for c in candidates for p in c.parameters()]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    for _ in range(config.epochs):
        for x, e, earlier in prepared:
            objective = sum(correlation_score(flat(c(layer, x, earlier), layer), e) for c in candidates)
            optimizer.zero_grad(set_to_none=True)
            (-objective).backward()
            optimizer.step()
    with torch.no_grad():
        scores = [
            sum(correlation_score(flat(c(layer, x, earlier), layer), e) * e.shape[0] for x, e, earlier in prepared)
            for c in candidates
        ]
        total = sum(e.shape[0] for _, e, _ in prepared)
    best = max(range(len(candidates)), key=lambda i: float(scores[i]))
    chosen = candidates[best]
    return chosen.dendrite, chosen.cascade.detach(), float(scores[best]) / total / layer.width


def add_correlation_dendrites(
    model: nn.Module,
    layers: dict[str, DendriteLayer],
    batches: Iterable,
    forward_loss: Callable[[object], torch.Tensor],
    config: CorrelationConfig,
) -> dict[str, float]:
    """One dendrite phase: record, train candidates per target, insert the best with scale 0, frozen.

    Returns the best candidate's mean |correlation| per channel, per target.
    """
    with frozen(model):
        records = record_error_signals(model, layers, batches, forward_loss, config.max_samples)
    result = {}
    for name, layer in layers.items():
        pairs = records[name]
        channels = select_channels(layer, [e for _, e in pairs])
        if pairs:
            dendrite, cascade, corr = train_candidates(layer, pairs, config, channels)
        else:  # the target does not reach the loss: a plain fresh dendrite keeps the structure uniform
            dendrite, cascade, corr = layer.new_dendrite(), None, 0.0
        dendrite.train(layer.base_layer.training)
        layer.add_dendrite(dendrite=dendrite, cascade=cascade, channels=channels)
        dendrite.requires_grad_(False)
        layer.dendrite_cascade[-1].requires_grad_(False)
        result[name] = corr
    return result


@contextmanager
def frozen(model: nn.Module):
    """Eval mode while error signals are recorded: no BatchNorm statistic moves, no dropout."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def error_ranked_channels(model: nn.Module, layers: dict[str, DendriteLayer], batches: Iterable,
                          forward_loss: Callable[[object], torch.Tensor],
                          max_samples: int = 4096) -> dict[str, torch.Tensor]:
    """Gradient objective: the channels each channel-selective target's next dendrite serves (channels.py),
    from running error moments, so no recorded signal is kept."""
    moments = {name: ErrorMoments(layer) for name, layer in layers.items() if layer.dendrite_channels is not None}
    if moments:
        with frozen(model):
            each_error_signal(model, {name: layers[name] for name in moments}, batches, forward_loss, max_samples,
                              lambda name, x, e: moments[name].add(e))
    ranked = {name: m.top_channels() for name, m in moments.items()}
    return {name: channels for name, channels in ranked.items() if channels is not None}


def freeze_dendrites(model: nn.Module, first: int = 0) -> None:
    """Correlation objective: dendrites from index `first` on keep their weights and cascades; scales train."""
    for layer in {id(m): m for m in model.modules() if isinstance(m, DendriteLayer)}.values():
        for i in range(first, layer.num_dendrites):
            layer.dendrite_layers[i].requires_grad_(False)
            layer.dendrite_cascade[i].requires_grad_(False)
