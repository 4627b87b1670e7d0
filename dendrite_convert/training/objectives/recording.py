"""Recording the (x, e) pairs of many targets within a memory budget.

The correlation objective fits candidates to each target's recorded input `x` and error signal `e`. Held for
every target of a large network at once (a ResNet's early convs alone are 0.5 MB per sample), those recordings
would need many GB. Here each pass over the training batches records only the targets whose recordings fit in
the budget together (in the order the forward reaches them), with room left for the working copy one target's
candidate training makes; the caller trains and inserts them, then records the next ones. Inserted dendrites
start at scale 0, so later passes see the same error signals. A target that alone exceeds the budget records
fewer samples (its positions, for convs, still give many rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ...core.layers import DendriteLayer
from ..error_signal import each_error_signal

Pairs = list[tuple[torch.Tensor, torch.Tensor]]


def working_copies(layer: DendriteLayer) -> int:
    """Copies of a target's recording its candidate training holds besides the recording itself: the chunked
    (x, e), and the outputs of its earlier dendrites (each at most the size of e)."""
    return 1 + layer.num_dendrites


class _Plan:
    """Which targets this pass records and how many samples each, decided as the forward reaches them."""

    def __init__(self, layers: dict[str, DendriteLayer], max_samples: int, budget_bytes: int):
        self.layers = layers
        self.max_samples = max_samples
        self.budget = budget_bytes
        self.caps: dict[str, int] = {}  # recorded targets -> most samples to keep
        self.deferred: set[str] = set()
        self.records: dict[str, Pairs] = {}
        self.samples: dict[str, int] = {}
        self.held = 0  # bytes of the recordings planned so far
        self.work = 0  # the largest working copy among them
        self.limited = False

    def visit(self, name: str, x: torch.Tensor, e: torch.Tensor) -> None:
        if name in self.deferred:
            return
        n = x.shape[0] if x.ndim else 1
        if name not in self.caps and not self._admit(name, (x.nbytes + e.nbytes) / max(1, n)):
            self.deferred.add(name)
            return
        if self.caps[name] < self.max_samples:  # a limited target keeps its first `cap` samples
            room = self.caps[name] - self.samples[name]
            if room <= 0:
                return
            x, e = x[:room], e[:room]
            n = min(n, room)
        self.records[name].append((x, e))
        self.samples[name] += n

    def _admit(self, name: str, per_sample: float) -> bool:
        copies = working_copies(self.layers[name])
        want = per_sample * self.max_samples
        if self.caps and self.held + want + max(self.work, want * copies) > self.budget:
            return False
        if not self.caps and want * (1 + copies) > self.budget:  # alone too large: fewer samples
            cap = max(1, int(self.budget / (per_sample * (1 + copies))))
            self.limited = True
        else:
            cap = self.max_samples
        self.caps[name], self.records[name], self.samples[name] = cap, [], 0
        self.held += per_sample * cap
        self.work = max(self.work, per_sample * cap * copies)
        return True

    def full(self) -> bool:
        """Only a limited recording stops a pass early; otherwise `max_samples` batches' worth is read, as usual."""
        return self.limited and all(self.samples[n] >= self.caps[n] for n in self.caps)


def record_within_budget(model: nn.Module, layers: dict[str, DendriteLayer], batches: Iterable,
                         forward_loss: Callable[[object], torch.Tensor], max_samples: int,
                         budget_bytes: int) -> dict[str, Pairs]:
    """One pass over the training batches: (x, e) pairs of the targets of `layers` that fit together in
    `budget_bytes` (at least one), plus an empty list for each target the loss does not reach. Targets left
    out are missing from the result: record them with another call."""
    plan = _Plan(layers, max_samples, budget_bytes)
    each_error_signal(model, layers, batches, forward_loss, max_samples, plan.visit, stop=plan.full)
    unreached = {name: [] for name in layers if name not in plan.caps and name not in plan.deferred}
    return {**plan.records, **unreached}
