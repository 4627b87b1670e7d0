"""Which axis of a recurrent model's example input is time, so that its export takes sequences of any length.

An input spec may name its dynamic axes (`axes`); a float input without them exports with a dynamic batch only. A
model whose LSTM/GRU layers get dendrites runs on sequences of any length, and conversion finds the time axis by
running it: an axis (besides the batch, axis 0) whose size is the sequence length a recurrent target sees, and
which lengthens that sequence by one step when it grows by one. The spec then records it as "sequence" next to
"batch"; the export makes both dynamic and verifies at other sizes than the example's. A model that does not run
on the longer input (a Linear over every step) keeps its fixed length.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.recurrent import DendriteRecurrent
from ..core.recurrent_stack import RecurrentStack
from .selfcheck import example_tensors, isolated, model_device, run_on


def with_sequence_axes(model: nn.Module, specs: list[dict]) -> list[dict]:
    """`specs` with the time axis of each float input named ("sequence"), where the model's recurrent targets
    show one; specs that name their own axes, and models without recurrent targets, are left as they are."""
    recurrent = [m for m in model.modules() if isinstance(m, (DendriteRecurrent, RecurrentStack))]
    lengths = _sequence_lengths(model, specs, recurrent) if recurrent and specs else {}
    specs = list(specs)
    for i, spec in enumerate(specs):
        dtype = getattr(torch, str(spec.get("dtype", "float32")), None)
        if "axes" in spec or not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            continue
        for axis, size in list(enumerate(spec["shape"]))[1:]:
            if size not in lengths.values():
                continue
            grown = {**spec, "shape": [n + (a == axis) for a, n in enumerate(spec["shape"])]}
            longer = _sequence_lengths(model, [*specs[:i], grown, *specs[i + 1:]], recurrent)
            if any(longer.get(key) == length + 1 for key, length in lengths.items()):
                specs[i] = {**spec, "axes": {"0": "batch", str(axis): "sequence"}}
                break
    return specs


def _sequence_lengths(model: nn.Module, specs: list[dict], recurrent: list[nn.Module]) -> dict[int, int]:
    """The sequence length each recurrent module sees first on inputs made from `specs` ({} if the model fails)."""
    seen: dict[int, int] = {}

    def record(module, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() in (2, 3):  # unbatched [T, in], or batched
            seen.setdefault(id(module), x.shape[1 if x.dim() == 3 and module.batch_first else 0])

    handles = [m.register_forward_pre_hook(record) for m in recurrent]
    try:
        device = model_device(model)
        with isolated(model, device):
            run_on(model, example_tensors(specs, device))
    except Exception:  # a model that does not run on the longer input keeps its fixed length
        return {}
    finally:
        for handle in handles:
            handle.remove()
    return seen
