"""The correlation objective of docs/design.md §4: cascade-correlation candidates (Fahlman & Lebiere 1990), per target.

With the network frozen, training batches run forward and backward while hooks record, per target,
its input `x` and its error signal `e = dloss/dy`. Per target, N candidate dendrites compute `h`
exactly as the layer's next dendrite would (its own type and hyper-parameters, the activation, the
cascade from the earlier dendrites) and are trained to maximise

    S = sum_c |corr_n(h[n, c], e[n, c])|

with n over samples (and positions, for convs). The best candidate is inserted with a zero scale and
frozen; the next neuron phase trains the network and the scales. Recordings and candidate work stay within
`memory_mb` (recording.py): targets are recorded in turn when they do not fit together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ...core.channels import flat, select_channels
from ...core.layers import ACTIVATIONS, DendriteLayer, dendrite_layers
from ..error_signal import frozen
from .base import Objective, TrainingData
from .recording import record_within_budget

# Phase progress: one line per target, so a long phase is visible in logs too (the CLI prints these lines).
progress = logging.getLogger("dendrite_convert.progress")


@dataclass(frozen=True)
class CorrelationConfig:
    candidates: int = 4
    epochs: int = 20  # passes over the recorded samples
    max_samples: int = 4096  # samples recorded per phase
    chunk: int = 256  # samples per candidate update (fewer when the candidates' activations would exceed memory_mb / 4)
    lr: float = 0.05
    memory_mb: int = 512  # recordings and candidate work held at once


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
        weight = layer.main_weight(layer.base_layer)
        self.cascade = nn.Parameter(torch.zeros(layer.num_dendrites, layer.width, device=weight.device,
                                                dtype=weight.dtype))

    def forward(self, layer: DendriteLayer, x: torch.Tensor, earlier: list[torch.Tensor]) -> torch.Tensor:
        z = layer.cascade_in(self.dendrite(x), self.cascade, earlier, self.channels)
        return ACTIVATIONS[layer.activation](z)


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


def _chunk_samples(pairs: list[tuple[torch.Tensor, torch.Tensor]], config: CorrelationConfig) -> int:
    """Samples per candidate update: `config.chunk`, or fewer so that the candidates' activations (about four
    tensors the size of e per candidate: output, cascade sum, activation, gradient) stay within a quarter of
    the memory budget."""
    e = pairs[0][1]
    per_sample = e.nbytes / max(1, e.shape[0] if e.ndim else 1)
    return max(1, min(config.chunk, int(config.memory_mb * 2**20 / 4 / (4 * config.candidates * per_sample))))


@torch.inference_mode(False)
@torch.enable_grad()
def train_candidates(
    layer: DendriteLayer, pairs: list[tuple[torch.Tensor, torch.Tensor]], config: CorrelationConfig,
    channels: torch.Tensor | None = None,
) -> tuple[nn.Module, torch.Tensor, float]:
    """Train N candidates for one target (serving `channels`, when selective); the best (module, cascade,
    mean correlation per channel served). Gradients are on even inside an evaluation loop (callbacks)."""
    chunks = _chunks(pairs, _chunk_samples(pairs, config))
    # Earlier dendrites are frozen during the phase: their outputs are computed once, in eval mode.
    errors = [flat(e, layer) for _, e in chunks]
    if channels is not None:
        errors = [e[:, channels.to(e.device)] for e in errors]
    with frozen(layer):
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
    """One dendrite phase: record, train candidates per target, insert the best with scale 0, frozen; as many
    passes over the batches as the memory budget needs (recording.py), each recording's memory freed once its
    target is grown.

    Returns the best candidate's mean |correlation| per channel, per target.
    """
    start = time.perf_counter()
    result: dict[str, float] = {}
    pending = dict(layers)
    while pending:
        with frozen(model):
            records = record_within_budget(model, pending, batches, forward_loss, config.max_samples,
                                           config.memory_mb * 2**20)
        progress.info("correlation phase: error signals of %d targets recorded (%.1f s)", len(records),
                      time.perf_counter() - start)
        for name in [n for n in pending if n in records]:
            result[name] = _grow_one(pending.pop(name), records.pop(name), config)
            progress.info("correlation phase: target %d/%d %s has its dendrite (correlation %.3f, %.1f s)",
                          len(result), len(layers), name, result[name], time.perf_counter() - start)
    return {name: result[name] for name in layers}


def _grow_one(layer: DendriteLayer, pairs: list[tuple[torch.Tensor, torch.Tensor]], config: CorrelationConfig) -> float:
    """Train candidates on one target's recording, insert the best (scale 0, frozen); its correlation."""
    channels = select_channels(layer, [e for _, e in pairs])
    if pairs:
        dendrite, cascade, corr = train_candidates(layer, pairs, config, channels)
    else:  # the target does not reach the loss: a plain fresh dendrite keeps the structure uniform
        dendrite, cascade, corr = layer.new_dendrite(), None, 0.0
    layer.add_dendrite(dendrite=dendrite, cascade=cascade, channels=channels)
    _hold_frozen(dendrite)
    layer.dendrite_cascade[-1].requires_grad_(False)
    return corr


def freeze_dendrites(model: nn.Module, first: int = 0) -> None:
    """Correlation objective: dendrites from index `first` on keep their weights, cascades and BatchNorm
    statistics; scales train."""
    for layer in {id(m): m for m in model.modules() if isinstance(m, DendriteLayer)}.values():
        for i in range(first, layer.num_dendrites):
            _hold_frozen(layer.dendrite_layers[i])
            layer.dendrite_cascade[i].requires_grad_(False)


def _stay_in_eval(module: nn.Module, args) -> None:
    """Forward pre-hook of a frozen dendrite: `model.train()` reaches it too, yet it runs in eval mode."""
    if module.training:
        module.eval()


def _hold_frozen(dendrite: nn.Module) -> None:
    """No gradient and eval mode for good, so neither its weights nor its BatchNorm statistics move."""
    dendrite.requires_grad_(False)
    dendrite.eval()
    if _stay_in_eval not in dendrite._forward_pre_hooks.values():
        dendrite.register_forward_pre_hook(_stay_in_eval)


@dataclass(frozen=True)
class Correlation(Objective):
    """Grow by training candidates against the error signal (network frozen); keep the best, frozen.

    Args:
        candidates: candidate dendrites trained per target; the best is kept.
        epochs: passes over the recorded samples while candidates train.
        samples: training samples recorded per dendrite phase.
        memory_mb: MB the recorded signals and candidate work may hold at once (targets recorded in turn).
    """

    name = "correlation"
    dendrite_phase_epochs = 1
    candidates: int = 4
    epochs: int = 20
    samples: int = 4096
    memory_mb: int = 512

    def grow(self, model: nn.Module, data: TrainingData | None) -> None:
        config = CorrelationConfig(candidates=self.candidates, epochs=self.epochs, max_samples=self.samples,
                                   memory_mb=self.memory_mb)
        add_correlation_dendrites(model, dendrite_layers(model), data.batches, data.loss, config)

    def freeze_grown(self, model: nn.Module, first: int) -> None:
        freeze_dendrites(model, first)
