"""`export`: fold a dendritic model into plain layers and write verified ONNX, safetensors or .pt2 (docs/design.md §5).

ONNX: `torch.onnx.export(dynamo=True)` of the folded model with a dynamic batch axis (and sequence axis for
integer token inputs and a recurrent model's time axis) into one file, `onnx.checker`, then onnxruntime against
the *unfolded* model on fresh inputs at another batch size (`--gemm-layout auto` picks each target's layout as
layout.py says).
safetensors: the folded weights plus `folded_config.json`, the recipe `load_folded` needs to rebuild the
folded module with plain torch. pt2: a torch.export program that loads with torch alone (pt2.py). Outputs
are written under a temporary name and renamed only after verification, so a failure leaves nothing that
looks like a success.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ConversionError, DendriteError, LoadError, UsageError, VerificationError
from ..core.files import atomic_file, check_writable, output_lock
from ..core.outputs import check_output_location
from .fold import LAYOUTS, FoldRecord, FoldResult, fold, strip_dendrites
from .folded import FoldedDendrites
from ..core.layers import dendrite_layer_paths
from ..core.words import plural
from .diagnose import disable_caches, explain
from .foldeddir import save_folded
from .recurrence import beyond_batch, has_recurrence, recurrent_export
from ..conversion.modeldir import ConvertedModel, load_converted
from .verify import VerifyReport, compare, reference_outputs, verify_onnx

log = logging.getLogger(__name__)
_PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # keep a margin for the graph itself below 2 GiB
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "int64": torch.int64, "int32": torch.int32}


@dataclass
class ExportConfig:
    """How to fold, write and verify (docs/design.md §5)."""

    format: str = "onnx"  # onnx | safetensors | pt2 (a torch.export program)
    opset: int | None = None  # ONNX opset; None: the exporter's default (20 on torch 2.13)
    atol: float = 1e-4
    rtol: float = 1e-4
    input_shape: list[int] | None = None  # float input; overrides the recorded example (and `inputs`)
    prune_below: float = 0.0  # drop dendrites whose |scale| is below this everywhere (output change reported)
    gemm_layout: str = "auto"  # auto | separate | concat
    force: bool = False
    latency: bool = True
    latency_threads: int = 1  # intra-op threads for the latency table (0: torch's default)
    trust_code: bool = False  # run the code the directory records (its factory, its stored model's classes)
    factory: str | None = None  # the directory's factory, named again: your own code may run
    allow_modules: tuple[str, ...] = ()  # modules whose classes a stored pickled model may use
    trust_pickle: bool | None = None  # deprecated name of trust_code

    def __post_init__(self):
        if self.format not in ("onnx", "safetensors", "pt2"):
            raise UsageError(f"format must be onnx, safetensors or pt2, not {self.format!r}.")
        if self.gemm_layout not in LAYOUTS:
            raise UsageError(f"gemm_layout must be one of {', '.join(LAYOUTS)}, not {self.gemm_layout!r}.",
                             parameter="gemm_layout")
        for name in ("atol", "rtol", "prune_below"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be 0 or more, not {getattr(self, name)}.", parameter=name)
        if self.opset is not None and not 18 <= self.opset <= 23:
            raise UsageError(f"opset must be between 18 and 23 for the dynamo exporter, not {self.opset}.",
                             parameter="opset")


@dataclass
class ExportReport:
    output: str
    format: str
    folds: list[FoldRecord]
    fold_max_abs: float  # folded torch vs unfolded, on the verification inputs (includes any pruning)
    verify: VerifyReport | None = None
    latency: list = field(default_factory=list)
    latency_threads: int = 0
    latency_inputs: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["verify"] = self.verify.to_dict() if self.verify else None
        return data


# ---- example inputs -----------------------------------------------------------------------------------------

@dataclass
class _Inputs:
    """Example inputs for export and fresh ones at another batch (and sequence) size for verification."""

    example: tuple | dict
    fresh: tuple | dict
    specs: list[dict]


def spec_axes(spec: dict) -> dict[int, str]:
    """The dynamic axes of an input spec: its own `axes` ({"0": "nodes"}), else batch (and sequence for tokens)."""
    if "axes" in spec:
        return {int(axis): str(name) for axis, name in spec["axes"].items()}
    tokens = not _DTYPES.get(spec.get("dtype", "float32"), torch.float32).is_floating_point
    return {0: "batch", 1: "sequence"} if tokens and len(spec["shape"]) >= 2 else {0: "batch"}


def _make(spec: dict, sizes: dict[str, int], generator) -> torch.Tensor:
    shape = list(spec["shape"])
    for axis, name in spec_axes(spec).items():
        shape[axis] = sizes.get(name, shape[axis])
    dtype = _DTYPES.get(spec.get("dtype", "float32"))
    if dtype is None:
        raise UsageError(f"example input dtype {spec.get('dtype')!r} is not one of {', '.join(_DTYPES)}.")
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(0, int(spec.get("high", 2)), shape, dtype=dtype, generator=generator)


def _from_specs(specs: list[dict]) -> _Inputs:
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list) or not spec["shape"]:
            raise LoadError(f"a recorded example input {spec!r} has no shape; pass input_shape=.")
    sizes = {name: spec["shape"][axis] for spec in specs for axis, name in spec_axes(spec).items()}
    if "batch" in sizes:
        sizes["batch"] = max(2, sizes["batch"])  # a batch of 1 lets the exporter specialise the batch axis
    gen = torch.Generator().manual_seed(0)
    example = tuple(_make(s, sizes, gen) for s in specs)
    fresh = tuple(_make(s, {n: v + 1 for n, v in sizes.items()}, gen) for s in specs)  # every dynamic axis grows
    if len(specs) > 1 and all("name" in s for s in specs):  # several named inputs (input_ids, decoder_input_ids)
        example, fresh = ({s["name"]: v for s, v in zip(specs, values)} for values in (example, fresh))
    return _Inputs(example, fresh, specs)


def _from_example(example: tuple | dict) -> _Inputs:
    """Inputs given as tensors (a batch's model inputs): the first two rows export, all of them (at least
    three) verify at another batch size."""
    values = list(example.values()) if isinstance(example, dict) else list(example)
    if not values or not all(isinstance(v, torch.Tensor) and v.ndim >= 1 for v in values):
        raise UsageError("inputs must be tensors with a batch axis: a tuple of positional inputs or a dict of "
                         "keyword ones.", parameter="inputs")
    size = values[0].shape[0]
    fresh = [v if size > 2 else torch.cat([v] * 2)[: size + 1] for v in values]
    first = [v[:2] if size > 2 else v for v in values]
    specs = [{"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for v in first]
    pack = (lambda vs: dict(zip(example, vs))) if isinstance(example, dict) else tuple
    return _Inputs(pack(first), pack(fresh), specs)


def resolve_inputs(config: ExportConfig, recorded: list[dict], given: tuple | dict | None = None) -> _Inputs | None:
    """input_shape, then the `given` example tensors, then the example recorded at conversion; None when none."""
    if config.input_shape:
        return _from_specs([{"shape": list(config.input_shape), "dtype": "float32"}])
    if given is not None:
        return _from_example(given)
    if recorded:
        return _from_specs(recorded)
    return None


def _check_runs(model: nn.Module, inputs: _Inputs) -> None:
    """A wrong example shape is a usage error with one sentence, not a traceback from inside the model."""
    shapes = [s["shape"] for s in inputs.specs]
    try:
        reference_outputs(model, inputs.example)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"the model cannot run on example inputs of shape {shapes} ({type(exc).__name__}: {first}); "
                         "pass a matching input_shape=.", parameter="input_shape") from exc


def _dynamic_shapes(inputs: _Inputs):
    axes = [spec_axes(spec) for spec in inputs.specs]
    if isinstance(inputs.example, dict):
        return dict(zip(inputs.example, axes))
    return tuple(axes)


# ---- the verb -----------------------------------------------------------------------------------------------

def _on_cpu(model: nn.Module) -> nn.Module:
    """Folding and verification run on the CPU (exact, where onnxruntime runs): a model trained on an accelerator
    is copied there, leaving the caller's module where it was."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type in ("cpu", "meta") for t in tensors):
        return model
    return copy.deepcopy(model).to("cpu")


def export(model: nn.Module | ConvertedModel | str | Path, output: str | Path, config: ExportConfig | None = None,
           *, inputs: tuple | dict | None = None, folded: nn.Module | None = None) -> ExportReport:
    """Fold `model` (a converted directory, ConvertedModel or module with dendrite layers) and write `output`.

    `inputs` is the example to export and verify with instead of the one recorded at conversion: model
    inputs with a batch axis, a tuple of positional tensors or a dict of keyword ones (e.g. a batch's,
    `training.adapter.example_inputs`). `folded` replaces the fold's result (for tests and custom folds);
    it is verified like any other.

    Example:
        export("run/best", "model.onnx", ExportConfig(format="onnx", atol=1e-5))
    """
    config = config or ExportConfig()
    output = Path(output)
    check_output_location(output)
    check_writable(output, config.force)
    with output_lock(output, beside=True):  # one writer per output, for the whole fold-export-verify
        return _export(model, output, config, inputs, folded)


def _export(model, output: Path, config: ExportConfig, inputs, folded: nn.Module | None) -> ExportReport:
    converted = model if isinstance(model, ConvertedModel) else None
    if converted is None and not isinstance(model, nn.Module):
        converted = load_converted(Path(model), trust_code=config.trust_code, factory=config.factory,
                                   allow_modules=config.allow_modules, trust_pickle=config.trust_pickle)
    if converted is None and config.format == "safetensors":
        raise UsageError("format='safetensors' needs a converted directory or a ConvertedModel with a source to "
                         "rebuild the architecture from; convert the model first.")
    unfolded = _on_cpu(converted.model if converted else model).eval()
    inputs = resolve_inputs(config, converted.example_inputs if converted else [], inputs)
    if inputs is None and config.format in ("onnx", "pt2"):
        raise UsageError("no example input: pass input_shape= (the shape of one batch), adapter=, or convert with "
                         "input_shape=.")
    example = inputs.example if inputs else None
    if inputs is not None:
        _check_runs(unfolded, inputs)
    if folded is None and config.format == "onnx" and config.gemm_layout == "auto":
        result, layout_note = _auto_layout(unfolded, inputs, config)
    else:
        layout = "separate" if folded is not None else config.gemm_layout
        result, layout_note = fold(unfolded, config.prune_below, layout, example if isinstance(example, tuple) else None), None
    if folded is not None:
        result = replace(result, model=folded.eval())
    report = ExportReport(str(output), config.format, result.records, float("nan"))
    report.notes += [layout_note] if layout_note else []
    if config.format == "onnx":
        _write_onnx(result.model, unfolded, output, inputs, config, report)
    elif config.format == "pt2":
        from .pt2 import write_pt2

        write_pt2(result.model, unfolded, output, example, inputs.fresh, [spec_axes(s) for s in inputs.specs],
                  _output_names(result.model, example), config, report, _raise_if_failed)
    folded = result.model
    if inputs is not None:
        expected = reference_outputs(unfolded, inputs.fresh)
        got = reference_outputs(folded, inputs.fresh)
        report.fold_max_abs = max((compare("", e, g, 0, 0).max_abs for e, g in zip(expected, got)), default=0.0)
    if any(r.pruned for r in result.records):
        report.notes.append(f"--prune-below {config.prune_below:g} pruned "
                            f"{plural(sum(len(r.pruned) for r in result.records), 'dendrite')}; max output change "
                            f"{report.fold_max_abs:.3g} on the verification inputs")
    if config.format == "safetensors":
        save_folded(converted, folded, output, inputs, config, report, _raise_if_failed)
    if config.latency and inputs is not None:
        from .latency import latency_table

        models = {"base (no dendrites)": strip_dendrites(unfolded), "unfolded dendritic": unfolded, "folded torch": folded}
        if config.format == "onnx":
            models["onnxruntime"] = output
        elif config.format == "pt2":
            with open(output, "rb") as file:
                models["torch.export program"] = torch.export.load(file).module()
        report.latency = latency_table(models, inputs.fresh, threads=config.latency_threads or None)
        report.latency_threads = config.latency_threads or torch.get_num_threads()
        report.latency_inputs = [list(v.shape) for v in (inputs.fresh.values() if isinstance(inputs.fresh, dict) else inputs.fresh)]
    return report


def _auto_layout(unfolded: nn.Module, inputs: _Inputs, config: ExportConfig) -> tuple[FoldResult, str | None]:
    """The separate fold, with the targets onnxruntime runs faster in the concat layout swapped in (layout.py).

    Nothing is timed (and nothing exported twice) when no target keeps a nonlinear dendrite it can concatenate."""
    from .layout import choose_layouts

    separate = fold(unfolded, config.prune_below, "separate")
    if not any(isinstance(m, FoldedDendrites) for m in separate.model.modules()):
        return separate, None
    concat = fold(unfolded, config.prune_below, "concat")
    if not any(r.layout == "concat" for r in concat.records):
        return separate, "--gemm-layout auto: no target with nonlinear dendrites can use the concat layout -> separate"

    def timing_export(module, args, path, input_names, output_names):
        """The TorchScript exporter writes the same ops (Conv, Gemm, Split, ...) about 10x faster than dynamo,
        which matters here, since the timing graph holds every kind twice; dynamo when it cannot."""
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, str(path), dynamo=False, opset_version=min(config.opset or 18, 20),
                                  input_names=input_names, output_names=output_names)
        except Exception:  # noqa: BLE001 - an op the TorchScript exporter lacks, or a torch without it
            log.debug("TorchScript export of the timing graph failed; using dynamo", exc_info=True)
            _onnx_export(module, args, None, path, config, None, output_names, input_names)

    try:
        return choose_layouts(separate, concat, dendrite_layer_paths(unfolded), inputs.fresh, timing_export)
    except Exception as exc:  # noqa: BLE001 - timing is an optimisation: the model still exports in the default layout
        log.debug("layout timing failed", exc_info=True)
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return separate, f"--gemm-layout auto: the layouts could not be timed ({type(exc).__name__}: {reason}) -> separate"


def _write_onnx(folded: nn.Module, unfolded, output: Path, inputs: _Inputs, config: ExportConfig,
                report: ExportReport) -> None:
    """Export `folded`, check it with onnx.checker and verify it in onnxruntime; nothing is left on failure."""
    import onnx

    with atomic_file(output) as tmp:
        _torch_export(folded, tmp, inputs, config, report)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:
            raise VerificationError(f"the exported graph fails onnx.checker ({type(exc).__name__}: {exc}).") from exc
        try:
            report.verify = verify_onnx(unfolded, tmp, inputs.fresh, config.atol, config.rtol, raise_on_failure=False)
        except DendriteError:
            raise
        except Exception as exc:
            raise VerificationError(f"onnxruntime cannot run the exported graph ({type(exc).__name__}: {exc}).") from exc
        _raise_if_failed(report.verify, output)


def _torch_export(folded: nn.Module, path: Path, inputs: _Inputs, config: ExportConfig, report: ExportReport) -> None:
    example = inputs.example
    size = sum(t.numel() * t.element_size() for t in [*folded.parameters(), *folded.buffers()])
    if size > _PROTOBUF_LIMIT:
        raise ConversionError(f"the folded model holds {size / 1024**3:.2f} GiB of weights, above the 2 GB limit of a "
                              "single ONNX file; export with format='safetensors' instead.")
    args, kwargs = ((), example) if isinstance(example, dict) else (example, None)
    if disable_caches(folded):  # a KV cache is not an inference output of the exported graph
        report.notes.append("use_cache=False for export: the graph returns no key/value cache")
    _onnx_export(folded, args, kwargs, path, config, _dynamic_shapes(inputs), _output_names(folded, example))


def _onnx_export(model: nn.Module, args: tuple, kwargs: dict | None, path: Path, config: ExportConfig, dynamic_shapes,
                 output_names: list[str], input_names: list[str] | None = None) -> None:
    """torch.onnx.export (dynamo) into one file, silenced; a failure is a ConversionError naming its cause."""
    any_length = beyond_batch(dynamic_shapes)  # recurrence.py: then an LSTM/GRU graph is left unoptimized
    try:
        with (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(
              io.StringIO()), _quiet_exporter(), recurrent_export(model, True, any_length)):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=True, external_data=False, verbose=False,
                              opset_version=config.opset, dynamic_shapes=dynamic_shapes, input_names=input_names,
                              output_names=output_names, optimize=not (any_length and has_recurrence(model)))
    except OSError:
        raise  # writing the file failed (disk full, permissions): a write error, not a failed conversion
    except Exception as exc:
        raise ConversionError(f"the folded model cannot be exported to ONNX: {explain(exc)} "
                              "(DENDRITE_DEBUG=1 shows the traceback)") from exc


def _output_names(model: nn.Module, example: tuple | dict) -> list[str]:
    """Names from the output structure: `output` for one tensor, else pytree paths (`last_hidden_state`, `0`)."""
    from torch.utils._pytree import keystr, tree_flatten_with_path

    with torch.no_grad():
        out = model(**example) if isinstance(example, dict) else model(*example)
    if isinstance(out, torch.Tensor):
        return ["output"]
    names = []
    for path, leaf in tree_flatten_with_path(out)[0]:
        if isinstance(leaf, torch.Tensor):
            name = "".join(c if c.isalnum() or c == "_" else "." for c in keystr(path)).strip(".")
            names.append(".".join(p for p in name.split(".") if p) or f"output_{len(names)}")
    return names if len(set(names)) == len(names) else [f"output_{i}" for i in range(len(names))]


def _raise_if_failed(verify: VerifyReport, output: Path) -> None:
    if verify.ok:
        return
    figures = "; ".join(o.line(verify.atol, verify.rtol)[2:] for o in verify.outputs if not o.ok)
    error = VerificationError(
        f"the export does not reproduce the unfolded model on inputs {verify.input_shapes}: {figures}; "
        f"{output} was not written (check the fold, or raise --atol/--rtol if this error is acceptable).")
    error.report = verify
    raise error


@contextlib.contextmanager
def _quiet_exporter():
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
