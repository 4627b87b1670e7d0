"""`--gemm-layout auto` for ONNX: keep the concat layout where onnxruntime runs it clearly faster (issue 19).

Exporting the whole model once per layout and timing both in onnxruntime doubled the export time. Instead only
the targets that can use the concat layout are timed, each alone: one ONNX export (static shapes, by the fast
exporter the caller passes) holds one target of each distinct kind (structure and input shape) in both
layouts, each layout of each kind is cut out of it (`onnx.utils.Extractor`) and timed in onnxruntime on the
input that target sees, and every target keeps concat only where its kind is clearly faster. The model is then
exported once. Without a nonlinear dendrite that can be concatenated nothing is timed or exported twice.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from ..core.words import plural
from .fold import FoldResult, replace_layer
from .folded import FoldedDendrites
from .latency import faster_layout, onnx_runner


class _Pairs(nn.Module):
    """One target of each kind in both layouts: inputs x0, x1, ...; outputs separate0, concat0, separate1, ..."""

    def __init__(self, pairs: list[tuple[nn.Module, nn.Module]]):
        super().__init__()
        self.pairs = nn.ModuleList(nn.ModuleList(pair) for pair in pairs)

    def forward(self, *xs):
        return tuple(y for (separate, concat), x in zip(self.pairs, xs) for y in (separate(x), concat(x)))


def choose_layouts(separate: FoldResult, concat: FoldResult, paths: dict[str, list[str]], inputs, onnx_export
                   ) -> tuple[FoldResult, str]:
    """`separate` with the targets that measure faster in the concat layout swapped in, and a note saying so.

    `onnx_export(module, args, path, input_names, output_names)` writes the timing graph (static shapes)."""
    candidates = [n for n, (s, c) in enumerate(zip(separate.records, concat.records))
                  if c.layout == "concat" and s.name == c.name]
    seen = _first_inputs(separate.model, [separate.records[n].name for n in candidates], inputs)
    kinds: dict[tuple, list[int]] = {}
    for n in candidates:
        module, x = seen.get(separate.records[n].name, (None, None))
        if x is not None:
            kinds.setdefault(_kind(module, x), []).append(n)
    if not kinds:
        return separate, "--gemm-layout auto: no target with concatenable dendrites runs on the example -> separate"
    names = [separate.records[members[0]].name for members in kinds.values()]
    pairs = [(seen[name][0], _folded_in(concat.model.get_submodule(name))) for name in names]
    with tempfile.TemporaryDirectory(prefix="dendrite-layout-") as tmp:
        times = _time_pairs(pairs, [seen[name][1] for name in names], Path(tmp), onnx_export)
    chosen = {n for (layout, _), members in zip(times, kinds.values()) if layout == "concat" for n in members}
    model, records = separate.model, list(separate.records)
    for n in sorted(chosen):
        name = records[n].name
        model = replace_layer(model, paths[name], concat.model.get_submodule(name))
        records[n] = concat.records[n]
    total = {layout: sum(len(members) * t[layout] for (_, t), members in zip(times, kinds.values()))
             for layout in ("separate", "concat")}
    note = (f"--gemm-layout auto: onnxruntime separate {total['separate']:.3g} ms, concat {total['concat']:.3g} ms "
            f"for the {plural(sum(map(len, kinds.values())), 'concatenable target')} ({plural(len(kinds), 'kind')}, each timed "
            f"alone) -> concat for {len(chosen)}, separate for the rest")
    return FoldResult(model, records), note


def _folded_in(module: nn.Module) -> nn.Module:
    """The FoldedDendrites a target folded into: itself, or inside the plain layer around it (recurrent gates)."""
    return next(m for m in module.modules() if isinstance(m, FoldedDendrites))


def _first_inputs(model: nn.Module, names: list[str], inputs) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """The input each target's FoldedDendrites sees first when `model` runs on `inputs`."""
    seen: dict[str, tuple[nn.Module, torch.Tensor]] = {}

    def hook(name, module):
        def record(_, args, kwargs):
            x = args[0] if args else kwargs.get("x")
            if isinstance(x, torch.Tensor):
                seen.setdefault(name, (module, x.detach().clone()))
        return record

    modules = {name: _folded_in(model.get_submodule(name)) for name in names}
    handles = [m.register_forward_pre_hook(hook(name, m), with_kwargs=True) for name, m in modules.items()]
    try:
        with torch.no_grad():
            model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _kind(module: FoldedDendrites, x: torch.Tensor) -> tuple:
    """What decides a layout's speed: the layers, the dendrite structure and the input's shape."""
    buffers = tuple((name, tuple(b.shape)) for name, b in module.named_buffers())
    return (repr(module), module.activation, str(module.links), str(module.emits), buffers, tuple(x.shape), x.dtype)


def _time_pairs(pairs, xs, tmp: Path, onnx_export) -> list[tuple[str, dict[str, float]]]:
    """(faster layout, median ms of each) per pair, from one export cut into one graph per layout and pair."""
    import onnx
    from onnx.utils import Extractor

    path = tmp / "pairs.onnx"
    inputs = [f"x{i}" for i in range(len(pairs))]
    outputs = [f"{layout}{i}" for i in range(len(pairs)) for layout in ("separate", "concat")]
    onnx_export(_Pairs(pairs).eval(), tuple(xs), path, inputs, outputs)
    extractor = Extractor(onnx.load(str(path)))
    result = []
    for i, x in enumerate(xs):
        runners = {}
        for layout in ("separate", "concat"):
            part = tmp / f"{layout}{i}.onnx"
            onnx.save(extractor.extract_model([f"x{i}"], [f"{layout}{i}"]), str(part))
            runners[layout] = onnx_runner(part, (x,))
        result.append(faster_layout(runners, budget_s=0.05))
    return result
