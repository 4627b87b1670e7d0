"""torch.fx tracing that survives untraceable code by marking the innermost failing submodule a leaf."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import traceback
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..core.layers import DendriteLayer, dendrite_class_for

_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(fx.__file__), os.path.dirname(__file__))


@dataclass
class Fallback:
    """A module fx could not trace through: its targets are reached by module swapping instead."""

    module: str  # fully qualified name, "" for the model itself
    reason: str
    source: str  # the user's line that broke tracing, "file:line: code"


def _reason(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:200]


def _user_line(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and this package: where the user's code broke tracing."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not os.path.abspath(f.filename).startswith(_LIBRARY_DIRS) and not f.filename.startswith("<")
    ]
    if not frames:
        return "unknown"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


class DendriteTracer(fx.Tracer):
    """Keeps targets, torch.nn layers and `leaves` opaque; remembers the innermost module that failed."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves
        self.failure: Fallback | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            module_qualified_name in self.leaves
            or isinstance(m, DendriteLayer)
            or dendrite_class_for(m) is not None
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if self.failure is None:  # the first record during unwinding is the innermost module
                self.failure = Fallback(self.path_of_module(m), _reason(exc), _user_line(exc))
            raise


def _concrete_defaults(module: nn.Module) -> dict:
    """Arguments with defaults are traced at their default (fx guards None defaults with an assert)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


@dataclass
class TraceResult:
    graph: fx.Graph | None  # None when the module's own forward is not traceable
    leaves: list[Fallback]  # submodules made leaves, relative names
    error: Fallback | None  # why the module itself failed


@contextlib.contextmanager
def _state_kept(module: nn.Module):
    """Tracing runs forward on real buffers and attributes: put back whatever it assigned or updated in place
    (a step counter, say), so that tracing never changes the model it looks at."""
    buffers = [(m, name, b, b.detach().clone()) for m in module.modules() for name, b in m._buffers.items()
               if b is not None]
    plain = [(m, dict(m.__dict__)) for m in module.modules()]
    try:
        yield
    finally:
        for m, before in plain:
            for key, value in before.items():
                if m.__dict__.get(key) is not value:
                    m.__dict__[key] = value
        with torch.no_grad():
            for m, name, buffer, value in buffers:
                m._buffers[name] = buffer
                buffer.copy_(value)


def trace(module: nn.Module, max_leaves: int = 200) -> TraceResult:
    """Trace `module`; each failure inside a submodule makes that submodule a leaf and retries."""
    if isinstance(module, fx.GraphModule):  # e.g. a torch.export program: its graph is already there
        return TraceResult(module.graph, [], None)
    with _state_kept(module):
        return _trace_with_leaves(module, max_leaves)


def _trace_with_leaves(module: nn.Module, max_leaves: int) -> TraceResult:
    leaves: set[str] = set()
    fallbacks: list[Fallback] = []
    while len(leaves) <= max_leaves:
        tracer = DendriteTracer(leaves)
        try:
            graph = tracer.trace(module, concrete_args=_concrete_defaults(module))
            return TraceResult(graph, fallbacks, None)
        except Exception as exc:
            failure = tracer.failure
            if failure is None or failure.module in leaves:
                return TraceResult(None, fallbacks, Fallback("", _reason(exc), _user_line(exc)))
            leaves.add(failure.module)
            fallbacks.append(failure)
    return TraceResult(None, fallbacks, Fallback("", f"more than {max_leaves} untraceable submodules", "unknown"))


_SCALARS = (type(None), bool, int, str, bytes, torch.dtype, torch.device, torch.layout, torch.memory_format)
_REGISTRIES = ("_parameters", "_buffers", "_modules")  # described by structure, not by value


def _frozen(value, depth: int = 0):
    """A hashable stand-in for `value` that is equal only for values a forward cannot tell apart.

    Scalars compare by type and value (floats by repr, so -0.0 and nan stay apart), containers
    element-wise; anything else, tensors and config objects included, by identity: only the same object
    is the same value.
    """
    kind = type(value)
    if kind in (float, complex):
        return kind, repr(value)
    if kind in _SCALARS:
        return kind, value
    if depth < 4 and kind in (tuple, list):
        return kind, tuple(_frozen(v, depth + 1) for v in value)
    if depth < 4 and isinstance(value, dict):
        return kind, tuple((_frozen(k, depth + 1), _frozen(v, depth + 1)) for k, v in value.items())
    if depth < 4 and kind in (set, frozenset):
        return kind, frozenset(_frozen(v, depth + 1) for v in value)
    return kind, "id", id(value)


def _plain_state(module: nn.Module) -> tuple:
    """Everything in the module's __dict__ that forward can read: its plain attributes, the training flag,
    hooks, and which parameter/buffer/submodule slots exist (and are None)."""
    registries = tuple((name, tuple((k, v is None) for k, v in module.__dict__.get(name, {}).items()))
                       for name in _REGISTRIES)
    plain = tuple((k, _frozen(v)) for k, v in module.__dict__.items() if k not in _REGISTRIES)
    return registries, plain


def forward_key(module: nn.Module) -> tuple:
    """Equal for two modules only when fx traces them to the same graph, so that one trace can serve both.

    Covers every module fx may walk into: classes, names, which modules and tensors are shared (the same
    object under two names), tensor shapes and dtypes, and each module's plain state. Objects are compared
    by identity, and a key is only meaningful while the modules it describes are alive.
    """
    first_seen: dict[int, int] = {}

    def ref(obj) -> int:
        return first_seen.setdefault(id(obj), len(first_seen))

    modules = tuple((name, type(m), ref(m), _plain_state(m)) for name, m in module.named_modules(remove_duplicate=False))
    tensors = tuple((name, ref(t), tuple(t.shape), t.dtype, t.requires_grad) for name, t in itertools.chain(
        module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)))
    return type(module), modules, tensors
