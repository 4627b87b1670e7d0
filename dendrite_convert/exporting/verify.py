"""Strict verification of an exported ONNX file against the reference PyTorch model (DESIGN §5).

Shaped on optimum's `validate_model_outputs`: run both on the same fresh inputs, compare every output
(names/count, shape, then max abs/rel error), record a ✓/✗ line per output, and raise one
`VerificationError` listing every bad output. A tolerance failure is never downgraded to a warning.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..core.errors import VerificationError


@dataclass
class OutputCheck:
    name: str
    shape: list[int]
    max_abs: float
    max_rel: float
    ok: bool
    problem: str = ""

    def line(self, atol: float, rtol: float) -> str:
        if self.problem:
            return f"✗ {self.name}: {self.problem}"
        mark = "✓" if self.ok else "✗"
        return (f"{mark} {self.name} {tuple(self.shape)}: max abs error {self.max_abs:.3g}, max rel error "
                f"{self.max_rel:.3g} (atol {atol:g}, rtol {rtol:g})")


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
    """One output: shape first, then `|a - e| <= atol + rtol·|e|` everywhere (numpy allclose semantics)."""
    if tuple(expected.shape) != tuple(actual.shape):
        return OutputCheck(name, list(expected.shape), float("inf"), float("inf"), False,
                           f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    expected, actual = expected.astype(np.float64), actual.astype(np.float64)
    diff = np.abs(actual - expected)
    if diff.size == 0:
        return OutputCheck(name, list(expected.shape), 0.0, 0.0, True)
    max_abs = float(np.nanmax(diff)) if not np.isnan(diff).all() else float("nan")
    max_rel = float(np.max(diff / np.maximum(np.abs(expected), np.finfo(np.float32).tiny)))
    ok = bool(np.all(diff <= atol + rtol * np.abs(expected)))  # NaN anywhere fails
    return OutputCheck(name, list(expected.shape), max_abs, max_rel, ok)


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
        report.outputs.append(OutputCheck("outputs", [], float("inf"), float("inf"), False,
                                          f"the ONNX model has {len(actual)} outputs, the PyTorch model {len(expected)}"))
    else:
        report.outputs = [compare(n, e, a, atol, rtol) for n, e, a in zip(names, expected, actual)]
    if raise_on_failure and not report.ok:
        bad = [o for o in report.outputs if not o.ok]
        figures = "; ".join(o.line(atol, rtol)[2:] for o in bad)
        raise VerificationError(
            f"{onnx_path} does not reproduce the PyTorch model on inputs {report.input_shapes}: {figures}.")
    return report
