"""Strict verification of an exported ONNX file against the reference PyTorch model (docs/design.md §5).

Shaped on optimum's `validate_model_outputs`: run both on the same fresh inputs, compare every output
(names/count, shape, then `|a - b| <= atol + rtol·|b|` per element), record a ✓/✗ line per output that
states that criterion and its worst element, and raise one
`VerificationError` listing every bad output. A tolerance failure is never downgraded to a warning.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..core.errors import VerificationError


CRITERION = "|a - b| <= atol + rtol·|b|"


@dataclass
class OutputCheck:
    """One output against its reference: `a` the exported value, `b` the PyTorch one (numpy allclose semantics).

    The worst element is the one that uses the largest share of its own bound `atol + rtol·|b|`: a max abs and a
    max rel error taken from different elements can both exceed the tolerances while every element passes.
    """

    name: str
    shape: list[int]
    max_abs: float
    ok: bool
    problem: str = ""
    failing: int = 0  # elements outside their bound
    worst_index: list[int] | None = field(default_factory=list)  # None: an empty output
    worst_actual: float = float("nan")
    worst_expected: float = float("nan")
    worst_excess: float = float("nan")  # |a - b| minus its bound: > 0 fails, <= 0 is the margin left

    def line(self, atol: float, rtol: float) -> str:
        if self.problem:
            return f"✗ {self.name}: {self.problem}"
        if self.worst_index is None:
            return f"✓ {self.name} {tuple(self.shape)}: no elements to compare"
        held = "holds everywhere" if self.ok else f"fails at {self.failing} of {math.prod(self.shape)} elements"
        a, b = self.worst_actual, self.worst_expected
        diff, bound = abs(a - b), atol + rtol * abs(b)
        if math.isnan(diff):
            verdict = "NaN"
        elif diff == 0:
            verdict = "0 (equal)"
        elif self.ok:
            verdict = f"{diff:.3g}, {100 * diff / bound:.2g}% of its bound {bound:.3g}"
        else:
            verdict = f"{diff:.3g}, beyond its bound {bound:.3g} by {diff - bound:.3g}"
        return (f"{'✓' if self.ok else '✗'} {self.name} {tuple(self.shape)}: {CRITERION} {held} (a exported, "
                f"b PyTorch, atol {atol:g}, rtol {rtol:g}); worst element {self.worst_index}: a = {a:.7g}, "
                f"b = {b:.7g}, |a - b| = {verdict}")


@dataclass
class VerifyReport:
    atol: float
    rtol: float
    input_shapes: list[list[int]]
    outputs: list[OutputCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.outputs) and all(o.ok for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=float("nan"))

    def lines(self) -> list[str]:
        return [o.line(self.atol, self.rtol) for o in self.outputs]

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def compare(name: str, expected: np.ndarray, actual: np.ndarray, atol: float, rtol: float) -> OutputCheck:
    """One output: shape first, then `|a - b| <= atol + rtol·|b|` everywhere (NaN anywhere fails)."""
    if tuple(expected.shape) != tuple(actual.shape):
        return OutputCheck(name, list(expected.shape), float("inf"), False,
                           f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    expected, actual = expected.astype(np.float64), actual.astype(np.float64)
    diff = np.abs(actual - expected)
    if diff.size == 0:
        return OutputCheck(name, list(expected.shape), 0.0, True, worst_index=None)
    max_abs = float(np.nanmax(diff)) if not np.isnan(diff).all() else float("nan")
    bound = atol + rtol * np.abs(expected)
    excess = diff - bound
    within = excess <= 0  # False for NaN
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero bound: any difference is infinitely beyond it
        used = np.where(diff == 0, 0.0, diff / bound)
    worst = np.unravel_index(int(np.argmax(np.where(np.isnan(used), np.inf, used))), expected.shape)
    return OutputCheck(name, list(expected.shape), max_abs, bool(within.all()), failing=int((~within).sum()),
                       worst_index=[int(i) for i in worst], worst_actual=float(actual[worst]),
                       worst_expected=float(expected[worst]), worst_excess=float(excess[worst]))


def reference_outputs(model: nn.Module, inputs: tuple | dict) -> list[np.ndarray]:
    """The model's outputs as flat numpy arrays (ModelOutput/tuple/dict flattened like the ONNX exporter does)."""
    inputs = copy.deepcopy(inputs)  # some models modify their inputs in place
    with torch.inference_mode():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return [t.detach().cpu().numpy() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def ort_feeds(session, inputs: tuple | dict) -> dict[str, np.ndarray]:
    """Inputs by the ONNX graph's input names: positional in order, keyword by name."""
    names = [i.name for i in session.get_inputs()]
    tensors = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    if isinstance(inputs, dict) and set(inputs) == set(names):
        tensors = [inputs[n] for n in names]
    if len(tensors) != len(names):
        raise VerificationError(f"the ONNX model takes {len(names)} inputs ({', '.join(names)}) but {len(tensors)} were given.")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}


def ort_session(onnx_path: str | Path, spin: bool = False):
    """A CPU session with as many threads as torch uses (fair latency comparisons); without `spin` its threads
    sleep when idle, so they do not slow the torch runs around it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def verify_onnx(reference: nn.Module, onnx_path: str | Path, inputs: tuple | dict, atol: float = 1e-4,
                rtol: float = 1e-4, raise_on_failure: bool = True) -> VerifyReport:
    """Compare onnxruntime on `onnx_path` with `reference(*inputs)`; raise VerificationError once if any output fails."""
    session = ort_session(onnx_path)
    feeds = ort_feeds(session, inputs)
    expected = reference_outputs(reference, inputs)
    names = [o.name for o in session.get_outputs()]
    actual = session.run(None, feeds)
    report = VerifyReport(atol, rtol, [list(v.shape) for v in feeds.values()])
    if len(actual) != len(expected):
        report.outputs.append(OutputCheck("outputs", [], float("inf"), False,
                                          f"the ONNX model has {len(actual)} outputs, the PyTorch model {len(expected)}"))
    else:
        report.outputs = [compare(n, e, a, atol, rtol) for n, e, a in zip(names, expected, actual)]
    if raise_on_failure and not report.ok:
        bad = [o for o in report.outputs if not o.ok]
        figures = "; ".join(o.line(atol, rtol)[2:] for o in bad)
        raise VerificationError(
            f"{onnx_path} does not reproduce the PyTorch model on inputs {report.input_shapes}: {figures}.")
    return report
