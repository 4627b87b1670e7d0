"""The error signal e = dloss/dy at each target's output, read from the loop's own batches and loss.

Both objectives grow from it: the gradient objective ranks a channel-selective target's channels by its
variance (`error_ranked_channels`), the correlation objective records (x, e) pairs and fits candidates to
them (`record_error_signals`). Nothing here changes a parameter. Signals recorded under mixed precision
(autocast) are handed on in fp32, so statistics accumulate in fp32 whatever the training precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn

from ..core.channels import ErrorMoments
from ..core.layers import DendriteLayer
from .adapter import batch_size


def each_error_signal(
    model: nn.Module,
    layers: dict[str, DendriteLayer],
    batches: Iterable,
    forward_loss: Callable[[object], torch.Tensor],
    max_samples: int,
    visit: Callable[[str, torch.Tensor, torch.Tensor], None],
    stop: Callable[[], bool] | None = None,
) -> None:
    """Run training batches forward and backward and call `visit(target, x, e = dloss/dy)` (fp32 for fp16/bf16
    signals) for every call of a target that reaches the loss, until `max_samples` samples or `stop()`; no
    parameter is changed. Gradients are on even when called from an evaluation loop (Lightning runs callbacks
    there under inference mode)."""
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def hook(name):
        def fn(module, args, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                calls.append((name, args[0].detach(), output))
        return fn

    handles = [layer.error_site().register_forward_hook(hook(name)) for name, layer in layers.items()]
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
                        visit(name, _fp32(x), _fp32(e.detach()))
                seen += batch_size(batch)
                if seen >= max_samples or (stop is not None and stop()):
                    break
    finally:
        for h in handles:
            h.remove()
        calls.clear()


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def record_error_signals(model: nn.Module, layers: dict[str, DendriteLayer], batches: Iterable,
                         forward_loss: Callable[[object], torch.Tensor],
                         max_samples: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per target, the (x, e = dloss/dy) pairs of `each_error_signal`."""
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in layers}
    each_error_signal(model, layers, batches, forward_loss, max_samples,
                      lambda name, x, e: records[name].append((x, e)))
    return records


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
    """The channels each channel-selective target's next dendrite serves (core/channels.py), from running
    error moments, so no recorded signal is kept."""
    moments = {name: ErrorMoments(layer) for name, layer in layers.items() if layer.dendrite_channels is not None}
    if moments:
        with frozen(model):
            each_error_signal(model, {name: layers[name] for name in moments}, batches, forward_loss, max_samples,
                              lambda name, x, e: moments[name].add(e))
    ranked = {name: m.top_channels() for name, m in moments.items()}
    return {name: channels for name, channels in ranked.items() if channels is not None}
