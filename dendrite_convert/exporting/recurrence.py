"""nn.LSTM/GRU through torch's exporters with a dynamic sequence length (torch 2.13, onnxscript 0.5).

torch traces a recurrent layer through a decomposition that loops over the time steps in Python, which fixes the
sequence length at the example's. With dynamic axes torch.onnx swaps in one built on `while_loop`; torch.export
alone does not, so `.pt2` captures get it here. Two more gaps are closed for exports whose length varies:

- the op's dispatcher caches whichever kernel served it first, so after the first export of a process the
  swapped decomposition is used or not by chance: the cache is cleared before and after each export;
- onnxscript's graph optimizer can write the example's sequence length into the Reshape after an LSTM/GRU op
  (seen after a time-major one; the graph then fails at any other length), so a graph with LSTM/GRU layers and a
  varying length is written unoptimized; onnxruntime optimizes it when it loads it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

_OPS = (torch.ops.aten.lstm.input, torch.ops.aten.gru.input)


@contextlib.contextmanager
def recurrent_export(model: nn.Module, onnx: bool, any_length: bool):
    """Around one export of `model` (ONNX, or else a torch.export capture), `any_length` when an axis besides the
    batch is dynamic; a no-op for a model without LSTM/GRU layers. A static-length program keeps torch's own
    decomposition, which (unlike `while_loop`) can be trained again after `dendrite-convert model.pt2`."""
    if not has_recurrence(model):
        yield
        return
    _clear_dispatch_caches()
    try:
        with contextlib.ExitStack() as stack:
            if any_length and not onnx:  # torch.onnx enters these itself
                from torch.export._patches import (register_gru_while_loop_decomposition,
                                                   register_lstm_while_loop_decomposition)

                stack.enter_context(register_lstm_while_loop_decomposition())
                stack.enter_context(register_gru_while_loop_decomposition())
            yield
    finally:
        _clear_dispatch_caches()


def has_recurrence(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.LSTM, nn.GRU)) for m in model.modules())


def beyond_batch(axes) -> bool:
    """Whether dynamic axes ({axis: name} per input, in a tuple, list or dict; or None) vary more than the batch."""
    per_input = axes.values() if isinstance(axes, dict) else axes or ()
    return any(name != "batch" for spec in per_input if spec for name in spec.values())


def _clear_dispatch_caches() -> None:
    for op in _OPS:
        getattr(op, "_dispatch_cache", {}).clear()
