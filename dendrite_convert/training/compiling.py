"""`--compile`: the module that runs the training step, through torch.compile, with a clean way back to eager.

Compiled graphs hold the module's structure, and growth changes it (a dendrite added is a new submodule),
so the loop compiles afresh at every phase, after dropping the previous phase's graphs (which also keeps
dynamo below its recompile limit however many dendrites are added). torch.compile compiles lazily, at the
first call: a failure there (no C++ compiler, an op inductor cannot lower, an unsupported Python) is
reported once and the run continues eagerly.
"""

from __future__ import annotations

import torch
from torch import nn

BACKEND = "inductor"  # torch.compile's default; tests use "aot_eager" (the same capture, no C++ code generation)


def compile_module(module: nn.Module) -> nn.Module:
    """`module` wrapped by torch.compile, with the graphs of earlier phases dropped; raises what torch.compile
    raises when it cannot compile at all on this platform."""
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(module, backend=BACKEND)


def is_compile_error(exc: BaseException) -> bool:
    """Whether `exc` comes from dynamo or inductor (the model itself raising is not a compile failure)."""
    return type(exc).__module__.startswith(("torch._dynamo", "torch._inductor"))


def reason(exc: BaseException) -> str:
    """What failed, in one line: the innermost cause's first line (dynamo wraps a backend's own error, and the
    rest is a long traceback)."""
    while (inner := getattr(exc, "inner_exception", None) or exc.__cause__) is not None:
        exc = inner
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")

