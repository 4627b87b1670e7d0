"""Check a directory's recipe against its weights file before any real tensor is allocated.

A converted or folded directory is a small JSON recipe plus `model.safetensors`. The recipe alone decides
how much memory rebuilding takes (1,000 dendrites on a 4096x4096 Linear is 67 GB, in an 849-byte folder),
so it is checked against the weights file's header (names, shapes, dtypes; no tensor data is read) first:
the declared size must be backed by the file, then the model is built on the meta device (no memory)
and every tensor it would hold must be in the file with the same shape and kind of dtype. Only then does the caller build
the real model.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.errors import LoadError
from ..core.header import read_header
from ..core.layers import dendrite_layers

_SCALE = re.compile(r"(?:^|\.)dendrite_scales\.\d+$")
_KINDS = {"F": "floating", "B": "floating", "I": "integer", "U": "integer"}  # F32, BF16, I64, U8; BOOL below


def check_converted(weights: Path, build: Callable[[], tuple[nn.Module, object]], counts: Mapping[str, int]) -> None:
    """Refuse a converted directory whose recipe (`build()`: the converted model without dendrites, and
    `counts`: dendrites per target) does not match `weights`, without allocating what the recipe declares."""
    header = read_header(weights)
    declared, held = sum(counts.values()), sum(1 for name in header if _SCALE.search(name))
    if declared > held:
        raise LoadError(f"{weights.parent}: the recipe declares {declared} dendrites but {weights.name} holds "
                        f"{held}; the directory is damaged or was not written by dendrite_convert.")
    model = _on_meta(lambda: build()[0])
    layers = dendrite_layers(model)
    unknown = sorted(set(counts) - set(layers))
    if unknown:
        raise LoadError(f"{weights.parent}: the recipe names targets the rebuilt model does not have "
                        f"({', '.join(unknown[:5])}).")
    prefixes = _names_of(model)
    for i in range(max(counts.values(), default=0)):  # grow one dendrite at a time: a lie fails at its first one
        for name, layer in layers.items():
            if counts[name] > i:
                with _NoDrawsOnMeta():
                    layer.add_dendrite()
                entries = {f"dendrite_scales.{i}": layer.dendrite_scales[i], f"dendrite_cascade.{i}": layer.dendrite_cascade[i],
                           **layer.dendrite_layers[i].state_dict(prefix=f"dendrite_layers.{i}.", keep_vars=True)}
                for key, tensor in entries.items():
                    _expect(weights, header, [f"{p}{key}" for p in prefixes[id(layer)]], tensor)
    _compare(weights, header, model)


def check_folded(weights: Path, build: Callable[[], nn.Module], targets: Mapping) -> None:
    """Refuse a folded directory whose specs (`targets`; `build()` makes the folded model from them) do not
    match `weights`, without allocating what the specs declare."""
    header = read_header(weights)
    modules = 0  # layers the specs declare: one per target, plus one per folded dendrite
    for entry in targets.values():
        spec = entry.get("module") if isinstance(entry, dict) else None
        k = spec.get("dendrites") if isinstance(spec, dict) else None
        modules += 1 + (k if type(k) is int and k > 0 else 0)
    if modules > len(header):  # every declared layer has a weight in the file
        raise LoadError(f"{weights.parent}: the recipe declares {modules} layers but {weights.name} holds only "
                        f"{len(header)} tensors; the directory is damaged or was not written by dendrite_convert.")
    _compare(weights, header, _on_meta(build))


def _on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """The model `build` makes, with every parameter and buffer on the meta device (holding no memory).

    This is a dry run: it is silent (the real build says the same) and leaves the caller's RNG as it was.
    What cannot be built on meta (code that needs real values, `torch.export.load`) is built for real, which
    allocates the architecture of the original file or of the user's own code, never more; a genuine error
    is raised by that second attempt."""
    with torch.random.fork_rng(devices=[]), _silent():
        try:
            with torch.device("meta"), _NoDrawsOnMeta():
                model = build()
        except Exception:  # noqa: BLE001 - any failure of meta construction: build for real instead
            model = build()
        return model.to("meta")


class _NoDrawsOnMeta(TorchFunctionMode):
    """Random draws into meta tensors do nothing, yet the first one imports torch._dynamo (seconds): skip them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _DRAWS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


_DRAWS = {torch.Tensor.normal_, torch.Tensor.uniform_}


@contextlib.contextmanager
def _silent():
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _names_of(model: nn.Module) -> dict[int, list[str]]:
    """State-dict prefixes of every module (a shared module has several)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(f"{name}." if name else "")
    return names


def _expect(weights: Path, header: dict, names: list[str], tensor: torch.Tensor) -> None:
    """One tensor of the model must be in the file under one of its names, with its shape and kind of dtype."""
    found = [n for n in names if n in header]
    if not found:
        raise LoadError(f"{weights} does not match the recipe: {names[0]} (shape {list(tensor.shape)}) is missing.")
    for name in found:
        dtype, shape = header[name]
        if shape != tuple(tensor.shape) or _kind(dtype) != _torch_kind(tensor.dtype):
            raise LoadError(f"{weights} does not match the recipe: {name} is {dtype} {list(shape)} in the file but "
                            f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)} in the model.")


def _compare(weights: Path, header: dict, model: nn.Module) -> None:
    """Every tensor of `model` is in the file (tied ones under any of their names) with its shape. Extra
    tensors in the file allocate nothing; the strict load that follows names them."""
    state = model.state_dict(keep_vars=True)
    tied: dict[int, list[str]] = {}
    for name, tensor in state.items():
        tied.setdefault(id(tensor), []).append(name)
    for names in tied.values():
        _expect(weights, header, names, state[names[0]])


def _kind(dtype: str) -> str:
    """The kind of a safetensors dtype: floats may be cast on load (as `load_model` does), integers may not
    become floats."""
    return "bool" if dtype == "BOOL" else "complex" if dtype.startswith("C") else _KINDS.get(dtype[:1], dtype)


def _torch_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "complex" if dtype.is_complex else "floating" if dtype.is_floating_point else "integer"
