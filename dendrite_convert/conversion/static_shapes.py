"""A .pt2 program exported with a static batch size accepts no other: say so at conversion (issue 19).

torch.export keeps an input axis dynamic only when asked (`dynamic_shapes`); otherwise the program's module
guards on the example's size ("Guard failed: x.size()[0] == 4") and training at another batch size fails
long after conversion. The unlifted module's placeholders carry the exported shapes: a plain int is static.
"""

from __future__ import annotations

import logging

import torch
from torch import fx, nn

log = logging.getLogger(__name__)


def static_batch_notes(model: nn.Module) -> list[str]:
    """One note per torch.export input whose batch axis is static (also logged as a warning); [] otherwise."""
    if not isinstance(model, fx.GraphModule):
        return []
    notes = []
    for node in model.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor) and value.ndim and isinstance(value.shape[0], int):
            batch = value.shape[0]
            notes.append(
                f"the .pt2 input {node.name} was exported with a static shape {list(value.shape)}: the program only "
                f"accepts batch size {batch}, so training or exporting at another batch size fails on a guard. "
                "Re-export it with a dynamic batch: torch.export.export(model, args, dynamic_shapes=...) with "
                "{0: torch.export.Dim('batch')} for this input, or use batches of exactly that size.")
    for note in notes:
        log.warning("%s", note)
    return notes
