"""The data adapter of docs/design.md §4: a Python file (or `pkg.module`) the user writes once.

Only `train_data`, `val_data` and `loss` are required. Everything is checked when the adapter is
loaded, so a missing or mistyped function is one sentence naming it and its expected signature
(exit 3), never a traceback from the middle of training.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..core.errors import DendriteError, LoadError, UsageError
from ..conversion.factories import import_file

log = logging.getLogger(__name__)

# name -> (signature shown in errors, number of positional arguments it is called with)
REQUIRED = {
    "train_data": ("def train_data(): return DataLoader(...)", 0),
    "val_data": ("def val_data(): return DataLoader(...)", 0),
    "loss": ("def loss(outputs, batch) -> torch.Tensor  # a scalar", 2),
}
OPTIONAL = {
    "test_data": ("def test_data(): return DataLoader(...)", 0),
    "score": ("def score(outputs, batch) -> float", 2),
    "inputs": ("def inputs(batch): return batch[0]  # or (args, kwargs)", 1),
    "optimizer": ("def optimizer(params): return torch.optim.Adam(params, lr=1e-3)", 1),
    "scheduler": ("def scheduler(optimizer): return torch.optim.lr_scheduler.StepLR(optimizer, 10)", 1),
}

TEMPLATE = '''"""Data adapter for dendrite-train: only train_data, val_data and loss are required."""

import torch
from torch.utils.data import DataLoader


def train_data():
    """Re-iterable training batches; called once, iterated every epoch (shuffle=True is fine).

    The loaders are used as they are; dendrite-train moves each batch to --device itself (non_blocking).
    On a GPU, pin_memory=True lets that copy overlap the computation, and num_workers=4 (or so) prepares
    batches in other processes while the GPU trains (with persistent_workers=True they survive between
    epochs). Batches already on the device are left where they are."""
    return DataLoader(..., batch_size=32, shuffle=True)  # on a GPU: pin_memory=True, num_workers=4


def val_data():
    """Validation batches: their score decides when dendrites are added and which model is best."""
    return DataLoader(..., batch_size=256)


# def test_data():
#     """Optional: recorded beside validation in scores.csv, never used for decisions."""
#     return DataLoader(..., batch_size=256)


def loss(outputs, batch):
    """A scalar tensor to minimise; `batch` is what the DataLoader yielded."""
    return torch.nn.functional.cross_entropy(outputs, batch[1])


# def score(outputs, batch):
#     """Optional per-batch metric (a float), averaged weighted by batch size; default: -loss."""
#     return (outputs.argmax(-1) == batch[1]).float().mean().item()
#
# MAXIMIZE = True  # direction of score (with the default score, -loss, leave it True)


# def inputs(batch):
#     """Optional: the model inputs from a batch. Default: batch[0], or **batch for a dict.
#     Return a tensor, a tuple of positional arguments, a dict of keyword arguments, or (args, kwargs)."""
#     return batch[0]


# def optimizer(params):
#     """Optional, rebuilt at every phase change. Default: Adam(lr=1e-3)."""
#     return torch.optim.Adam(params, lr=1e-3)


# def scheduler(optimizer):
#     """Optional, rebuilt with the optimizer, stepped once per epoch. ReduceLROnPlateau is stepped with
#     the validation score in its own direction: mode='min' (its default) gets -score when MAXIMIZE is
#     True, so with the default score it sees the loss; for a positive score such as accuracy use
#     mode='max' (its relative threshold needs positive values)."""
#     return torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
'''


@dataclass
class Adapter:
    """The user's functions, checked; `spec` is where they came from (recorded for --resume)."""

    spec: str
    train_data: Callable[[], Any]
    val_data: Callable[[], Any]
    loss: Callable[[Any, Any], torch.Tensor]
    test_data: Callable[[], Any] | None = None
    score: Callable[[Any, Any], float] | None = None
    maximize: bool = True
    inputs: Callable[[Any], Any] | None = None
    optimizer: Callable[[Any], torch.optim.Optimizer] | None = None
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None

    def model_inputs(self, batch) -> tuple[tuple, dict]:
        """(args, kwargs) for the model: `inputs(batch)` if given, else batch[0] or **batch for dicts."""
        value = self.inputs(batch) if self.inputs is not None else _default_inputs(batch)
        if isinstance(value, Mapping):
            return (), dict(value)
        if isinstance(value, tuple):
            if len(value) == 2 and isinstance(value[0], (tuple, list)) and isinstance(value[1], Mapping):
                return tuple(value[0]), dict(value[1])
            return value, {}
        return (value,), {}

    def build_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer is None:
            return torch.optim.Adam(params, lr=1e-3)
        opt = self.optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise LoadError(f"adapter {self.spec}: optimizer(params) returned {type(opt).__name__}, not a "
                            "torch.optim.Optimizer.", parameter="adapter")
        return opt

    def build_scheduler(self, optimizer: torch.optim.Optimizer):
        return None if self.scheduler is None else self.scheduler(optimizer)


def _default_inputs(batch):
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def batch_size(batch) -> int:
    """Samples in a batch: the leading size of its first tensor (1 when none is found)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for value in values:
        size = batch_size(value)
        if size:
            return size
    return 1


def reiterable(data) -> bool:
    """Whether `data` gives a fresh pass over its batches each time it is iterated (not a generator).

    A DataLoader always does; with worker processes a trial iterator would start them for nothing, so it is
    not asked for one. Without workers the trial is cheap, and kept: it draws the loader's seed, so every
    run's random draws stay what they were."""
    if isinstance(data, DataLoader) and data.num_workers > 0:
        return True
    return hasattr(data, "__iter__") and iter(data) is not data


def _module_for(spec: str):
    try:
        if spec.endswith(".py") or "/" in spec or Path(spec).is_file():
            file = Path(spec)
            if not file.is_file():
                raise LoadError(f"adapter {spec}: file does not exist (adapter.TEMPLATE is one to start from).",
                                parameter="adapter")
            return import_file(file)
        return importlib.import_module(spec)
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(f"adapter {spec} cannot be imported: {type(exc).__name__}: {exc}.",
                        parameter="adapter") from exc


def _check_callable(spec: str, module, name: str, signature: str, nargs: int, required: bool):
    fn = getattr(module, name, None)
    if fn is None:
        if required:
            raise LoadError(f"adapter {spec} has no {name}(); it must define `{signature}`.", parameter="adapter")
        return None
    if not callable(fn):
        raise LoadError(f"adapter {spec}: {name} is a {type(fn).__name__}, not a function; expected `{signature}`.",
                        parameter="adapter")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and C callables: trust them
        return fn
    try:
        sig.bind(*([None] * nargs))
    except TypeError:
        raise LoadError(
            f"adapter {spec}: {name}{sig} cannot be called with {nargs} argument{'s' * (nargs != 1)}; "
            f"expected `{signature}`.", parameter="adapter",
        ) from None
    return fn


def _warn_near_misses(spec: str, module) -> None:
    """A typo in an optional name (`scores`, `optimiser`, `MAXIMISE`) would silently run the default: say so."""
    known = [*REQUIRED, *OPTIONAL, "MAXIMIZE"]
    missing = [name for name in known if not hasattr(module, name)]
    for name, value in vars(module).items():
        if name.startswith("_") or name in known:
            continue
        defined_here = inspect.isfunction(value) and value.__module__ == module.__name__
        if not (defined_here or name.isupper()):
            continue
        close = difflib.get_close_matches(name, missing, n=1, cutoff=0.8)
        if close:
            what = f"{name}()" if defined_here else name
            meant = close[0] if close[0].isupper() else f"{close[0]}()"
            log.warning("--adapter %s defines %s, which dendrite-train does not use; did you mean %s? Without it the "
                        "default applies (rename it, or start a helper's name with _).", spec, what, meant)


def load_adapter(spec: str | Path) -> Adapter:
    """Import an adapter file or module and check every function it must or may define."""
    spec = str(spec)
    module = _module_for(spec)
    spec = str(Path(spec).resolve()) if spec.endswith(".py") or "/" in spec else spec
    _warn_near_misses(spec, module)
    found = {
        name: _check_callable(spec, module, name, sig, nargs, required=name in REQUIRED)
        for name, (sig, nargs) in {**REQUIRED, **OPTIONAL}.items()
    }
    maximize = getattr(module, "MAXIMIZE", True)
    if not isinstance(maximize, bool):
        raise LoadError(f"adapter {spec}: MAXIMIZE must be True or False, not {maximize!r}.", parameter="adapter")
    if found["score"] is None and not maximize:
        raise LoadError(f"adapter {spec}: MAXIMIZE = False needs a score(); the default score is -loss (maximised).",
                        parameter="adapter")
    return Adapter(spec=spec, maximize=maximize, **found)


def example_inputs(spec: str | Path) -> tuple | dict:
    """The model inputs of the adapter's first validation batch, positional (a tuple) or keyword (a dict):
    the example `export(..., inputs=)` traces and verifies with."""
    adapter = load_adapter(spec)
    batch = call(adapter, "val_data()", lambda: next(iter(adapter.val_data())))
    args, kwargs = call(adapter, "inputs(batch)", adapter.model_inputs, batch)
    if args and kwargs:
        raise UsageError(f"adapter {adapter.spec}: an example takes positional or keyword inputs, not both; make "
                         "inputs(batch) return one.", parameter="adapter")
    return dict(kwargs) if kwargs else tuple(args)


def call(adapter: Adapter, name: str, fn, *args):
    """Call one of the adapter's functions; an exception in it becomes one sentence that names the function,
    the original error and the adapter's line it came from (exit 3, like every adapter mistake)."""
    try:
        return fn(*args)
    except DendriteError:
        raise
    except Exception as exc:
        raise LoadError(f"adapter {adapter.spec}: {name} raised {type(exc).__name__}: {exc}"
                        f"{_adapter_line(adapter, exc)}.", parameter="adapter") from exc


def _adapter_line(adapter: Adapter, exc: BaseException) -> str:
    """' (at adapter.py:12: `raise ValueError("boom")`)': the deepest frame of the traceback in the adapter's file."""
    files = {getattr(getattr(f, "__code__", None), "co_filename", None) for f in vars(adapter).values() if callable(f)}
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename in files]
    if not frames:
        return ""
    frame = frames[-1]
    code = f": `{frame.line.strip()}`" if frame.line else ""
    return f" (at {Path(frame.filename).name}:{frame.lineno}{code})"
