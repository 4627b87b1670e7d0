"""Conversion: find targets in the fx graph, rewrite it, and swap modules where tracing fell back.

The traced graph is the source of truth: it says which targets forward really calls, which of
them feed a BatchNorm alone (one neuron), which are called at several sites, and which
`F.linear`/`F.conv*` calls use the model's own parameters. Replacing a `call_module` target in
the graph is the same as swapping the submodule it names, so the user's own classes are kept
(their methods and signatures survive) and a `GraphModule` is generated only where the graph
itself changes: functional calls become `call_module` nodes of new dendrite layers. Inside
modules fx cannot trace (recorded as fallbacks), targets are reached by module swapping alone.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import torch
from torch import fx, nn

from .config import DendriteConfig
from ..core.errors import ConversionError
from ..core.layers import (FUNCTIONAL, NORM_LAYERS, DendriteLayer, count_parameters, dendrite_class_for,
                           one_layer_key)
from .report import ConversionReport, SkippedRecord, TargetRecord
from .tracing import Fallback, TraceResult, forward_key, trace

_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")  # of F.linear/F.conv* (FUNCTIONAL)
UNSUPPORTED = (nn.RNNBase, nn.EmbeddingBag, nn.MultiheadAttention, nn.Bilinear)
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _is_torch_leaf(module: nn.Module) -> bool:
    """fx's default leaves: torch.nn layers, which may read their submodules' weights directly."""
    return type(module).__module__.startswith("torch.nn") and not isinstance(module, (nn.Sequential, *_CONTAINERS))


@dataclass
class _FunctionalSite:
    node: fx.Node
    name: str  # the new submodule's name, relative to the traced module
    module: nn.Module  # an nn.Linear/ConvNd sharing the call's Parameters
    call: str


@dataclass
class _Plan:
    graph_calls: Counter = field(default_factory=Counter)  # target fqn -> call sites in traced graphs
    norm_calls: Counter = field(default_factory=Counter)
    pairs: dict[str, str] = field(default_factory=dict)  # target fqn -> norm fqn fed only by it
    swaps: dict[str, str] = field(default_factory=dict)  # target fqn -> untraceable module it sits in
    functional: dict[str, tuple[nn.Module, fx.Graph, list[_FunctionalSite]]] = field(default_factory=dict)
    fallbacks: list[Fallback] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)
    traces: dict[tuple, TraceResult] = field(default_factory=dict)


def _analyze(module: nn.Module, prefix: str, plan: _Plan, reported: bool = False) -> None:
    if isinstance(module, _CONTAINERS):  # no forward of their own: look inside
        for name, child in module.named_children():
            _analyze_child(child, _join(prefix, name), prefix, plan)
        return
    result = _trace_cached(module, plan)
    for leaf in result.leaves:
        full = _join(prefix, leaf.module)
        plan.fallbacks.append(replace(leaf, module=full))
        _analyze(module.get_submodule(leaf.module), full, plan, reported=True)
    if result.graph is None:
        if not reported:
            plan.fallbacks.append(replace(result.error, module=prefix))
        for name, child in module.named_children():
            _analyze_child(child, _join(prefix, name), prefix, plan)
        return
    _scan_graph(module, prefix, result.graph, plan)


def _trace_cached(module: nn.Module, plan: _Plan) -> TraceResult:
    """Repeated blocks (the 12 layers of a BERT) are traced once, about 5x faster on transformers models.

    Only modules whose forward provably traces the same share a graph (`forward_key`: structure and every
    plain attribute, so sibling blocks that differ in a flag are traced apart). A graph with functional
    targets is never shared, because it is rewritten for its own module.
    """
    key = forward_key(module)
    result = plan.traces.get(key)
    if result is None:
        result = trace(module)
        has_functional = result.graph is not None and any(
            n.op == "call_function" and n.target in FUNCTIONAL for n in result.graph.nodes)
        if not has_functional:
            plan.traces[key] = result
    return result


def _analyze_child(child: nn.Module, fqn: str, via: str, plan: _Plan) -> None:
    if dendrite_class_for(child) is not None:
        plan.swaps.setdefault(fqn, via or "<model>")
    elif not _is_torch_leaf(child) and not isinstance(child, DendriteLayer):
        _analyze(child, fqn, plan)


def _scan_graph(module: nn.Module, prefix: str, graph: fx.Graph, plan: _Plan) -> None:
    modules = dict(module.named_modules())
    sites: list[_FunctionalSite] = []
    for node in graph.nodes:
        if node.op == "call_module":
            m = modules.get(node.target)
            if m is not None and dendrite_class_for(m) is not None:
                plan.graph_calls[_join(prefix, node.target)] += 1
            elif isinstance(m, NORM_LAYERS):
                plan.norm_calls[_join(prefix, node.target)] += 1
                src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
                if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                        and dendrite_class_for(modules.get(src.target, nn.Identity())) is not None):
                    plan.pairs[_join(prefix, src.target)] = _join(prefix, node.target)
        elif node.op == "call_function" and node.target in FUNCTIONAL:
            site = _functional_site(module, node, len(sites))
            if isinstance(site, _FunctionalSite):
                sites.append(site)
            elif site:
                plan.skipped.append(SkippedRecord(_join(prefix, node.name), _call_name(node), site))
    if sites:
        plan.functional[prefix] = (module, graph, sites)


def _functional_site(module: nn.Module, node: fx.Node, index: int) -> _FunctionalSite | str:
    """A module equivalent to a functional call on the model's own Parameters, or why there is none."""
    args = dict(zip(_ARG_NAMES, node.args)) | dict(node.kwargs)
    weight, bias = args["weight"], args.get("bias")
    params = []
    for arg in (weight, bias):
        if arg is None:
            params.append(None)
            continue
        if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
            return "functional call whose weight is computed, not a parameter"
        try:
            params.append(module.get_parameter(arg.target))
        except AttributeError:
            return f"functional call on {arg.target}, which is a buffer, not a parameter"
    options = {k: args[k] for k in ("stride", "padding", "dilation", "groups") if k in args}
    if any(isinstance(v, fx.Node) for v in options.values()):
        return "functional convolution with computed hyper-parameters"
    w, b = params
    layer = FUNCTIONAL[node.target].from_functional(w, b, options)
    layer.weight = w
    if b is not None:
        layer.bias = b
    name = "fn_" + weight.target.replace(".", "_")
    return _FunctionalSite(node, name, layer, f"{_call_name(node)} on {weight.target}")


def _call_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _materialize(module: nn.Module, graph: fx.Graph, sites: list[_FunctionalSite]) -> fx.GraphModule:
    """The traced module as a GraphModule whose functional target calls are `call_module` nodes."""
    gm = module if isinstance(module, fx.GraphModule) else fx.GraphModule(module, graph)
    moved = set()
    for site in sites:
        moved.update(a.target for a in (*site.node.args, *site.node.kwargs.values())
                     if isinstance(a, fx.Node) and a.op == "get_attr")
        gm.add_submodule(site.name, site.module)
        with gm.graph.inserting_before(site.node):
            new = gm.graph.call_module(site.name, (site.node.args[0] if site.node.args else site.node.kwargs["input"],))
        site.node.replace_all_uses_with(new)
        gm.graph.erase_node(site.node)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in moved - still_read:  # those parameters now live in the new layers only
        owner, _, attr = target.rpartition(".")
        delattr(gm.get_submodule(owner), attr)
    gm.graph.lint()
    gm.recompile()
    return gm


def _groups(model: nn.Module, names: list[str]) -> list[list[str]]:
    """Targets that are one layer: the same module under several names, or modules with all parameters tied."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name in names:
        m = model.get_submodule(name)
        groups[one_layer_key(m)].append(name)
    return list(groups.values())


def _set_module(model: nn.Module, fqn: str, new: nn.Module) -> nn.Module:
    if not fqn:
        return new
    parent, _, leaf = fqn.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)
    return model


def _all_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = defaultdict(list)
    for name, m in model.named_modules(remove_duplicate=False):
        names[id(m)].append(name)
    return names


def _uncopyable(module: nn.Module) -> str | None:
    """Why a dendrite cannot copy `module`, or None: the old hook-based weight/spectral norm keeps a computed
    weight that deepcopy refuses. The hook is what tells: a forward under no_grad (the self-check's run of
    the original) leaves a computed weight without its grad_fn."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    weight = module.__dict__.get("weight")
    hooked = any(isinstance(hook, (WeightNorm, SpectralNorm)) for hook in module._forward_pre_hooks.values())
    if hooked or (isinstance(weight, torch.Tensor) and weight.grad_fn is not None):
        return ("its weight is computed by a hook (torch.nn.utils.weight_norm/spectral_norm) and cannot be copied; "
                "use torch.nn.utils.parametrizations instead")
    return None


def _opted_out(module: nn.Module, fqn: str, config: DendriteConfig) -> str | None:
    """Why a target of an opt-in family (Embedding) is left alone: no include pattern names it."""
    family = dendrite_class_for(module)
    if family.by_default or (config.include and config.selects(module, fqn) is None):
        return None
    return f"{type(module).__name__} layers get dendrites only when --include names them (its type, name or '*')"


def _unreached_reason(model: nn.Module, fqn: str) -> str:
    parts = fqn.split(".")
    for i in range(len(parts) - 1, 0, -1):
        owner = model.get_submodule(".".join(parts[:i]))
        if _is_torch_leaf(owner):
            return f"used inside {type(owner).__name__} {'.'.join(parts[:i])}, which reads its weights directly"
    return "never called by forward (fx graph)"


def convert_model(model: nn.Module, config: DendriteConfig,
                  unreached: dict[str, str] | None = None) -> tuple[nn.Module, ConversionReport]:
    """Insert dendrite layers into `model` in place; returns the converted root and the report.

    `unreached`: {target name: reason} for targets to skip although they are reached (see liveness.py).
    """
    plan = _Plan()
    _analyze(model, "", plan)
    if config.strict_graph and plan.fallbacks:
        first = plan.fallbacks[0]
        raise ConversionError(
            f"{first.module or 'the model'} cannot be traced by torch.fx ({first.reason}) at {first.source}; make "
            "that code traceable or drop strict_graph=True to convert it by module swapping.", parameter="strict_graph"
        )
    report = ConversionReport(fallbacks=plan.fallbacks, skipped=plan.skipped, params_before=count_parameters(model))
    aliases = _all_names(model)

    for prefix, (module, graph, sites) in plan.functional.items():
        gm = _materialize(module, graph, sites)
        model = _set_module(model, prefix, gm)
        for site in sites:
            plan.graph_calls[_join(prefix, site.name)] += 1
            plan.swaps.pop(_join(prefix, site.name), None)
        report.notes.append(f"{prefix or 'the model'} is now an fx GraphModule: its functional calls became dendrite layers")
    functional_calls = {_join(p, s.name): s.call for p, (_, _, sites) in plan.functional.items() for s in sites}

    reached = [n for n in dict.fromkeys([*plan.graph_calls, *plan.swaps])]
    selected = []
    for name in reached:
        m = model.get_submodule(name)
        why = config.selects(m, name) or _opted_out(m, name, config) or dendrite_class_for(m).refusal(m) or _uncopyable(m) or (unreached or {}).get(name)
        if why:
            report.skipped.append(SkippedRecord(name, type(m).__name__, why))
        else:
            selected.append(name)
    seen = {id(model.get_submodule(n)) for n in reached}
    for name, m in model.named_modules():
        if id(m) in seen:
            continue
        if dendrite_class_for(m) is not None:
            report.skipped.append(SkippedRecord(name, type(m).__name__, _unreached_reason(model, name)))
        elif isinstance(m, UNSUPPORTED):
            report.skipped.append(SkippedRecord(name, type(m).__name__, "layer type not supported as a dendrite target"))
    if not selected and any(isinstance(m, DendriteLayer) for m in model.modules()):
        raise ConversionError("The model already holds dendrite layers; train or export it instead of converting again.")
    if not selected:
        types = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
        filtered = reached and (config.include or config.exclude)
        why = "the include=/exclude= filters left none" if filtered else f"layer types found: {', '.join(types)}"
        raise ConversionError(
            f"No Linear, ConvNd, ConvTransposeNd or Conv1D layer to convert ({why}; Embedding, LSTM and GRU layers "
            "convert when include= names them); check the model or the filters."
        )

    param_names: dict[int, list[str]] = defaultdict(list)
    for pname, p in model.named_parameters(remove_duplicate=False):
        param_names[id(p)].append(pname)
    for group in _groups(model, selected):
        name = group[0]
        base = model.get_submodule(name)
        sites = sum(plan.graph_calls[n] for n in group)
        owners = [*group, *aliases[id(base)]]
        tied = [f"tied to {other}" for p in base.parameters() for other in param_names[id(p)]
                if not any(other.startswith(o + ".") for o in owners)]
        shared = group[1:] + [n for n in aliases[id(base)] if n not in group] + tied
        shared += [f"called {sites}×"] if sites > 1 else []
        norm_name = plan.pairs.get(name) if config.pair_norms and len(group) == 1 and sites <= 1 else None
        norm = model.get_submodule(norm_name) if norm_name else None
        if norm is not None and (plan.norm_calls[norm_name] != 1 or len(aliases[id(norm)]) != 1):
            norm_name, norm = None, None
        whole = dendrite_class_for(base).split(base)  # a stacked LSTM: one target per layer and direction
        parts = {name: base} if whole is None else {_join(name, p): m for p, m in whole.named_children()}
        layers = {}
        for part_name, part in parts.items():
            layer = layers[part_name] = dendrite_class_for(part)(
                part, norm=norm, activation=config.activation, init_std=config.init_std, rank=config.rank,
                channel_fraction=config.channel_fraction)
            if whole is not None:
                setattr(whole, part_name.rpartition(".")[2], layer)
        for alias in dict.fromkeys([*group, *aliases[id(base)]]):
            model = _set_module(model, alias, layers[name] if whole is None else whole)
        if norm_name:
            model = _set_module(model, norm_name, nn.Identity())
        if name in functional_calls:
            how, via = "fx functional", functional_calls[name]
        elif any(n in plan.graph_calls for n in group):
            how, via = "fx graph", f"+ {type(norm).__name__} {norm_name}" if norm_name else ""
        else:
            how, via = "module swap", f"inside {plan.swaps[name]}"
        for part_name, layer in layers.items():
            before = count_parameters(layer)
            for _ in range(config.dendrites):
                layer.add_dendrite()
            weight = layer.main_weight(layer.base_layer)
            report.targets.append(TargetRecord(
                name=part_name, type=type(layer.base_layer).__name__, weight_shape=list(weight.shape),
                out_channels=layer.out_channels, reached=how, via=via, shared=shared, dendrites=layer.num_dendrites,
                params_before=before, params_after=count_parameters(layer),
            ))
    report.params_after = count_parameters(model)
    retie_weight_keys(model)  # transformers' save_pretrained then finds tied weights inside dendrite layers
    return model, report


def retie_weight_keys(model: nn.Module) -> None:
    """Point transformers' tied-weight declarations at the weights inside dendrite layers.

    After conversion `cls.predictions.decoder` is a DendriteLayer whose weight lives at
    `decoder.base_layer.weight`; `save_pretrained` de-duplicates tied tensors only under the declared
    names, so without this it refuses to save (shared tensors "not properly defined").
    """
    def retarget(root: nn.Module, name: str) -> str:
        parent, _, leaf = name.rpartition(".")
        try:
            module = root.get_submodule(parent) if parent else root
        except AttributeError:
            return name  # a regex pattern or a name this model does not have: leave it
        if isinstance(module, DendriteLayer) and leaf in ("weight", "bias"):
            return f"{parent}.base_layer.{leaf}" if parent else f"base_layer.{leaf}"
        return name

    for module in model.modules():
        for attr in ("_tied_weights_keys", "all_tied_weights_keys"):
            keys = getattr(module, attr, None)
            if isinstance(keys, dict) and keys:
                renamed = {retarget(module, k): retarget(module, v) for k, v in keys.items()}
            elif isinstance(keys, (list, tuple)) and keys:  # transformers 4.x: a list of target names
                renamed = [retarget(module, k) for k in keys]
            else:
                continue
            if renamed != keys:
                setattr(module, attr, renamed)  # an instance attribute: the class is untouched


def refresh_report(model: nn.Module, report: ConversionReport) -> ConversionReport:
    """The report with dendrite counts and parameter counts read from the model as it is now."""
    layers = dict(model.named_modules())
    targets = []
    for t in report.targets:
        layer = layers[t.name]
        targets.append(replace(t, dendrites=layer.num_dendrites, params_after=count_parameters(layer)))
    return replace(report, targets=targets, params_after=count_parameters(model))
