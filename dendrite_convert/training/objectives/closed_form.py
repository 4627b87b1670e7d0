"""The closed-form objective (issue 18): each new dendrite is computed, not trained, from its target's error.

At a switch, with the network frozen, training batches run forward and backward and, per target, the
statistics of its input x and error signal e = dloss/dy are summed (closed_form_fit.py). The new dendrite's
weights are the fit that lowers the loss most (order 2, the default: along the directions where the loss
bends most, which still pays at a plateau where the error no longer correlates linearly with x; order 1:
the ridge least-squares map from x to -e, reduced to the dendrite's rank), and its scale is line-searched
on a quarter of those batches kept out of the fits (closed_form_growth.py), so insertion lowers the training
loss at once instead of starting at zero. "Where to grow" (`top_k`, `min_relative_score`) limits growth to
the targets whose statistics promise the largest loss decrease per added parameter. After insertion the dendrites train
jointly with the network, as gradient dendrites do: they start at a useful point, and training moves them on.

Under DDP rank 0 alone fits and inserts (on its shard of the training data); the other ranks add matching
dendrites to the targets rank 0 grew, and the loop then gives every rank rank 0's weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.distributed as dist
from torch import nn

from ...core.errors import UsageError
from ...core.layers import dendrite_layers
from .. import distributed
from .base import Objective, TrainingData
from .closed_form_growth import ClosedFormConfig, TargetReport, add_closed_form_dendrites

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClosedForm(Objective):
    """Grow dendrites fitted in closed form to the error signal (network frozen), each scaled by a line search.

    Args:
        order: 2 fits the loss's curvature along each target's input (works at a plateau); 1 fits the
            error signal linearly (what the target's own weights could still learn).
        ridge: regularisation of the fits, relative to the mean square of the target's input.
        top_k: grow only the k targets with the largest predicted loss decrease per added parameter
            (None: every target whose fit lowers the loss).
        min_relative_score: grow only targets scoring at least this fraction of the best target's score.
        samples: training samples read: three quarters are fitted, the step is line-searched on the rest.

    A dendrite's rank (and whether it is channel-selective) comes from the converted model's config.
    """

    name = "closed-form"
    dendrite_phase_epochs = 1
    order: int = 2
    ridge: float = 1e-3
    top_k: int | None = None
    min_relative_score: float = 0.0
    samples: int = 4096

    def __post_init__(self):
        if self.order not in (1, 2):
            raise UsageError(f"order must be 1 or 2, not {self.order!r}.", parameter="order")
        if not self.ridge > 0:
            raise UsageError(f"ridge must be positive, not {self.ridge!r}.", parameter="ridge")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"top_k must be at least 1 (or None for every target), not {self.top_k!r}.",
                             parameter="top_k")
        if not 0.0 <= self.min_relative_score <= 1.0:
            raise UsageError(f"min_relative_score must be between 0 and 1, not {self.min_relative_score!r}.",
                             parameter="min_relative_score")
        if self.samples < 1:
            raise UsageError(f"samples must be at least 1, not {self.samples!r}.", parameter="samples")

    @property
    def config(self) -> ClosedFormConfig:
        return ClosedFormConfig(order=self.order, max_samples=self.samples, ridge=self.ridge, top_k=self.top_k,
                                min_relative_score=self.min_relative_score)

    def grow(self, model: nn.Module, data: TrainingData | None) -> None:
        grown = None
        if distributed.is_main():
            reports = add_closed_form_dendrites(model, data.batches, data.loss, self.config)
            log.info(describe(reports))
            grown = [name for name, report in reports.items() if report.grown]
        if distributed.active():  # every rank takes rank 0's structure; the loop then broadcasts its weights
            box = [grown]
            dist.broadcast_object_list(box, src=0)
            if not distributed.is_main():
                layers = dendrite_layers(model)
                for name in box[0]:
                    layers[name].add_dendrite()


def describe(reports: dict[str, TargetReport]) -> str:
    """One line: how many targets grew and how the training loss moved (the targets grow one after another)."""
    grown = [r for r in reports.values() if r.grown]
    text = f"closed-form growth: {len(grown)} of {len(reports)} targets grew"
    if grown:  # each insertion starts from the loss the previous one reached
        text += (f"; training loss {max(r.loss_before for r in grown):.6g} -> "
                 f"{min(r.loss_after for r in grown):.6g}")
    reasons = sorted({r.reason for r in reports.values() if not r.grown})
    return text + (f" (not grown: {'; '.join(reasons)})" if reasons else "")
