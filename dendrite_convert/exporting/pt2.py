"""`export(format="pt2")`: a torch.export program of the folded model that loads with torch alone (issue 16).

The folded model (plain layers and elementwise ops) is captured by `torch.export.export` with the dynamic axes
the ONNX export uses, saved with `torch.export.save`, then loaded back and run on fresh inputs at another batch
size against the *unfolded* model, like ONNX. Loading it runs none of our code and none of the model's: an
output that is not a tensor or built-in container (a transformers `ModelOutput`, a namedtuple) would need its
class to load, so such outputs come back as a dict of named tensors. The archive must also pass the inspection
`dendrite-convert` applies to an untrusted .pt2 (no pickled entries, only arithmetic in shape expressions).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..core.errors import ConversionError, LoadError
from ..core.files import atomic_file
from .diagnose import disable_caches, explain
from .recurrence import beyond_batch, recurrent_export
from .verify import OutputCheck, VerifyReport, compare, reference_outputs


class NamedOutputs(nn.Module):
    """`model` with its tensor outputs as {name: tensor}, in the order (and with the names) of the ONNX export."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args, **kwargs):
        leaves = [t for t in tree_leaves(self.model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
        return dict(zip(self.names, leaves))


def builtin_only(value) -> bool:
    """True when `value` is tensors (or None, numbers) in plain tuples, lists and dicts: loadable without classes."""
    if type(value) in (tuple, list):
        return all(builtin_only(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and builtin_only(v) for k, v in value.items())
    return value is None or isinstance(value, (torch.Tensor, int, float, bool))


def write_pt2(folded: nn.Module, unfolded: nn.Module, output: Path, example, fresh, axes, names: list[str],
              config, report, raise_if_failed) -> None:
    """Capture `folded` on `example` with dynamic `axes`, write `output` atomically, verify it on `fresh`."""
    notes = report.notes
    if disable_caches(folded):
        notes.append("use_cache=False for export: the program returns no key/value cache")
    args, kwargs = ((), example) if isinstance(example, dict) else (example, None)
    with torch.no_grad():
        sample = folded(*args, **(kwargs or {}))
    dims = [{axis: torch.export.Dim.DYNAMIC for axis in spec} for spec in axes]
    dynamic = dict(zip(example, dims)) if isinstance(example, dict) else tuple(dims)
    if not builtin_only(sample):
        folded = NamedOutputs(folded, names)
        dynamic = {"kwargs": dynamic} if isinstance(dynamic, dict) else {"args": dynamic}  # by the wrapper's names
        notes.append(f"outputs as a dict of tensors ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}): "
                     f"a {type(sample).__name__} would need its class to load")
    try:
        with (warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()),
              recurrent_export(folded, False, beyond_batch(axes))):
            warnings.simplefilter("ignore")
            program = torch.export.export(folded, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        raise ConversionError(f"the folded model cannot be exported with torch.export: {explain(exc)} "
                              "(DENDRITE_DEBUG=1 shows the traceback)") from exc
    with atomic_file(output) as tmp:
        with open(tmp, "wb") as file:  # a file object: torch.export wants a name ending in .pt2, a temporary has none
            torch.export.save(program, file)
        _check_loads_without_code(tmp, output)
        report.verify = _verify(unfolded, tmp, fresh, names, config.atol, config.rtol)
        raise_if_failed(report.verify, output)


def _check_loads_without_code(path: Path, output: Path) -> None:
    from ..conversion.consent import check_pt2

    try:
        check_pt2(path)
    except LoadError as exc:  # our own program must load without --trust-code: anything else is a bug here
        raise ConversionError(f"{output}: the program torch.export wrote would need the full unpickler to load "
                              f"({exc}); export with format='onnx' or format='safetensors' instead.") from exc


def _verify(unfolded: nn.Module, path: Path, fresh, names: list[str], atol: float, rtol: float) -> VerifyReport:
    """The saved program, loaded back as a user would, against the unfolded model on `fresh` inputs."""
    with open(path, "rb") as file:
        module = torch.export.load(file).module()
    values = list(fresh.values()) if isinstance(fresh, dict) else list(fresh)
    verify = VerifyReport(atol, rtol, [list(v.shape) for v in values])
    expected = reference_outputs(unfolded, fresh)
    try:
        actual = reference_outputs(module, fresh)
    except Exception as exc:  # a guard the example specialised (a static batch size) fails here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        verify.outputs = [_failed(f"the loaded program cannot run on inputs {verify.input_shapes} "
                                  f"({type(exc).__name__}: {first})")]
        return verify
    if len(actual) != len(expected):
        verify.outputs = [_failed(f"the program has {len(actual)} outputs, the PyTorch model {len(expected)}")]
    else:
        names = names if len(names) == len(expected) else [f"output_{i}" for i in range(len(expected))]
        verify.outputs = [compare(n, e, a, atol, rtol) for n, e, a in zip(names, expected, actual)]
    return verify


def _failed(problem: str) -> OutputCheck:
    return OutputCheck("outputs", [], float("inf"), False, problem)
