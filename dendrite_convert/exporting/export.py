"""`export`: fold a dendritic model into plain layers and write verified ONNX or safetensors (DESIGN §5).

ONNX: `torch.onnx.export(dynamo=True)` of the folded model with a dynamic batch axis (and sequence axis for
integer token inputs) into one file, `onnx.checker`, then onnxruntime against the *unfolded* model on fresh
inputs at another batch size. safetensors: the folded weights plus `folded_config.json`, the recipe
`load_folded` needs to rebuild the folded module with plain torch. Outputs are written under a temporary
name and renamed only after verification, so a failure leaves nothing that looks like a success.
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
from ..core.files import atomic_file, check_writable
from ..core.outputs import check_output_location
from .fold import LAYOUTS, FoldRecord, fold, strip_dendrites
from .folded import FoldedDendrites
from .foldeddir import save_folded
from ..conversion.modeldir import ConvertedModel, load_converted
from .verify import VerifyReport, compare, reference_outputs, verify_onnx

log = logging.getLogger(__name__)
_PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # keep a margin for the graph itself below 2 GiB
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "int64": torch.int64, "int32": torch.int32}


@dataclass
class ExportConfig:
    """How to fold, write and verify (DESIGN §5)."""

    format: str = "onnx"  # onnx | safetensors
    opset: int | None = None  # ONNX opset; None: the exporter's default (20 on torch 2.13)
    atol: float = 1e-4
    rtol: float = 1e-4
    input_shape: list[int] | None = None  # float input; overrides the recorded example
    adapter: str | None = None  # a data adapter: its first validation batch is the example
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
        if self.format not in ("onnx", "safetensors"):
            raise UsageError(f"format must be onnx or safetensors, not {self.format!r}.")
        if self.gemm_layout not in LAYOUTS:
            raise UsageError(f"--gemm-layout must be one of {', '.join(LAYOUTS)}, not {self.gemm_layout!r}.")
        if self.atol < 0 or self.rtol < 0 or self.prune_below < 0:
            raise UsageError("--atol, --rtol and --prune-below must be 0 or more.")
        if self.opset is not None and not 18 <= self.opset <= 23:
            raise UsageError(f"--opset must be between 18 and 23 for the dynamo exporter, not {self.opset}.")


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
            raise LoadError(f"a recorded example input {spec!r} has no shape; pass --input-shape.")
    sizes = {name: spec["shape"][axis] for spec in specs for axis, name in spec_axes(spec).items()}
    if "batch" in sizes:
        sizes["batch"] = max(2, sizes["batch"])  # a batch of 1 lets the exporter specialise the batch axis
    gen = torch.Generator().manual_seed(0)
    example = tuple(_make(s, sizes, gen) for s in specs)
    fresh = tuple(_make(s, {n: v + 1 for n, v in sizes.items()}, gen) for s in specs)  # every dynamic axis grows
    return _Inputs(example, fresh, specs)


def _from_adapter(spec: str) -> _Inputs:
    from ..training.adapter import load_adapter

    adapter = load_adapter(spec)
    try:
        batch = next(iter(adapter.val_data()))
        args, kwargs = adapter.model_inputs(batch)
    except Exception as exc:
        raise LoadError(f"--adapter {spec}: the first validation batch cannot be read ({type(exc).__name__}: {exc}).") from exc
    if args and kwargs:
        raise UsageError(f"--adapter {spec}: export takes positional or keyword inputs, not both; make inputs(batch) return one.")
    values = list(kwargs.values()) if kwargs else list(args)
    if not values or not all(isinstance(v, torch.Tensor) and v.ndim >= 1 for v in values):
        raise UsageError(f"--adapter {spec}: the model inputs of a batch must be tensors with a batch axis.")
    size = values[0].shape[0]
    fresh = [v if size > 2 else torch.cat([v] * 2)[: size + 1] for v in values]
    example = [v[:2] if size > 2 else v for v in values]
    specs = [{"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for v in example]
    pack = (lambda vs: dict(zip(kwargs, vs))) if kwargs else tuple
    return _Inputs(pack(example), pack(fresh), specs)


def resolve_inputs(config: ExportConfig, recorded: list[dict]) -> _Inputs | None:
    """--input-shape, then --adapter, then the example recorded at conversion; None when there is none."""
    if config.input_shape:
        return _from_specs([{"shape": list(config.input_shape), "dtype": "float32"}])
    if config.adapter:
        return _from_adapter(config.adapter)
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
                         "pass a matching --input-shape.") from exc


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
           *, folded: nn.Module | None = None) -> ExportReport:
    """Fold `model` (a converted directory, ConvertedModel or module with dendrite layers) and write `output`.

    `folded` replaces the fold's result (for tests and custom folds); it is verified like any other.

    Example:
        export("run/best", "model.onnx", ExportConfig(format="onnx", atol=1e-5))
    """
    config = config or ExportConfig()
    output = Path(output)
    check_output_location(output)
    check_writable(output, config.force)
    converted = model if isinstance(model, ConvertedModel) else None
    if converted is None and not isinstance(model, nn.Module):
        converted = load_converted(Path(model), trust_code=config.trust_code, factory=config.factory,
                                   allow_modules=config.allow_modules, trust_pickle=config.trust_pickle)
    if converted is None and config.format == "safetensors":
        raise UsageError("--safetensors needs a converted directory or a ConvertedModel with a source to rebuild "
                         "the architecture from; save the model with dendrite-convert first.")
    unfolded = _on_cpu(converted.model if converted else model).eval()
    inputs = resolve_inputs(config, converted.example_inputs if converted else [])
    if inputs is None and config.format == "onnx":
        raise UsageError("no example input: pass --input-shape (e.g. 2,3,32,32), --adapter, or convert with --input-shape.")
    example = inputs.example if inputs else None
    if inputs is not None:
        _check_runs(unfolded, inputs)
    if folded is None and config.format == "onnx" and config.gemm_layout == "auto":
        # decide on the runtime that will run it: both layouts are exported and timed in onnxruntime
        results = {layout: fold(unfolded, config.prune_below, layout) for layout in ("separate", "concat")}
        if not any(isinstance(m, FoldedDendrites) for m in results["separate"].model.modules()):
            results.pop("concat")
    else:
        results = {config.gemm_layout: fold(unfolded, config.prune_below, config.gemm_layout,
                                            example if isinstance(example, tuple) else None)}
    if folded is not None:
        results = {"given": replace(next(iter(results.values())), model=folded.eval())}
    result = next(iter(results.values()))
    report = ExportReport(str(output), config.format, result.records, float("nan"))
    if config.format == "onnx":
        chosen = _write_onnx({name: r.model for name, r in results.items()}, unfolded, output, inputs, config, report)
        result = results[chosen]
        report.folds = result.records
    folded = result.model
    if inputs is not None:
        expected = reference_outputs(unfolded, inputs.fresh)
        got = reference_outputs(folded, inputs.fresh)
        report.fold_max_abs = max((compare("", e, g, 0, 0).max_abs for e, g in zip(expected, got)), default=0.0)
    if any(r.pruned for r in result.records):
        report.notes.append(f"--prune-below {config.prune_below:g} pruned "
                            f"{sum(len(r.pruned) for r in result.records)} dendrites; max output change "
                            f"{report.fold_max_abs:.3g} on the verification inputs")
    if config.format == "safetensors":
        save_folded(converted, folded, output, inputs, config, report, _raise_if_failed)
    if config.latency and inputs is not None:
        from .latency import latency_table

        models = {"base (no dendrites)": strip_dendrites(unfolded), "unfolded dendritic": unfolded, "folded torch": folded}
        if config.format == "onnx":
            models["onnxruntime"] = output
        report.latency = latency_table(models, inputs.fresh, threads=config.latency_threads or None)
        report.latency_threads = config.latency_threads or torch.get_num_threads()
        report.latency_inputs = [list(v.shape) for v in (inputs.fresh.values() if isinstance(inputs.fresh, dict) else inputs.fresh)]
    return report


def _write_onnx(candidates: dict[str, nn.Module], unfolded, output: Path, inputs: _Inputs, config: ExportConfig,
                report: ExportReport) -> str:
    """Export each candidate fold, keep the fastest in onnxruntime, check and verify it; returns its name."""
    import onnx

    from .latency import faster_layout, onnx_runner

    with atomic_file(output) as tmp:
        paths = {name: tmp if len(candidates) == 1 else tmp.with_name(f"{tmp.name}.{name}") for name in candidates}
        try:
            for name, folded in candidates.items():
                _torch_export(folded, paths[name], inputs, config, report)
            chosen = next(iter(candidates))
            if len(candidates) > 1:
                chosen, times = faster_layout({n: onnx_runner(p, inputs.fresh) for n, p in paths.items()}, budget_s=0.5)
                report.notes.append("--gemm-layout auto: onnxruntime " + ", ".join(f"{n} {t:.3g} ms" for n, t in times.items())
                                    + f" -> {chosen}")
                paths[chosen].replace(tmp)
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
        finally:
            for path in paths.values():
                if path != tmp:
                    path.unlink(missing_ok=True)
    return chosen


def _torch_export(folded: nn.Module, path: Path, inputs: _Inputs, config: ExportConfig, report: ExportReport) -> None:
    example = inputs.example
    size = sum(t.numel() * t.element_size() for t in [*folded.parameters(), *folded.buffers()])
    if size > _PROTOBUF_LIMIT:
        raise ConversionError(f"the folded model holds {size / 1024**3:.2f} GiB of weights, above the 2 GB limit of a "
                              "single ONNX file; export --safetensors instead.")
    args, kwargs = ((), example) if isinstance(example, dict) else (example, None)
    hf_config = getattr(folded, "config", None)
    if getattr(hf_config, "use_cache", False):  # a KV cache is not an inference output of the exported graph
        hf_config.use_cache = False
        report.notes.append("use_cache=False for export: the graph returns no key/value cache")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_exporter():
            warnings.simplefilter("ignore")
            torch.onnx.export(folded, args, str(path), kwargs=kwargs, dynamo=True, external_data=False,
                              verbose=False, opset_version=config.opset, dynamic_shapes=_dynamic_shapes(inputs),
                              output_names=_output_names(folded, example), optimize=True)
    except OSError:
        raise  # writing the file failed (disk full, permissions): a write error, not a failed conversion
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"torch.onnx.export could not export the folded model ({type(exc).__name__}: {first}); "
                              "set DENDRITE_DEBUG=1 for the traceback.") from exc


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
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
