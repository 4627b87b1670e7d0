"""The folded-model directory: `model.safetensors` (folded weights) + `folded_config.json` (the recipe).

Like the converted-model directory it never pickles code and carries copies of the source's files:
`load_folded` rebuilds the source architecture (running code only with the user's consent, docs/design.md §9),
converts it again (deterministic), replaces every target by the plain layers its recipe entry describes and
loads the folded weights strictly.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from ..core.errors import DendriteError, LoadError
from ..core.files import atomic_directory
from .fold import replace_layer
from .folded import FoldedDendrites, module_from_spec, module_spec
from ..core.layers import dendrite_layer_paths
from ..core.version import __version__
from ..conversion.modeldir import ConvertedModel
from ..conversion.validate import check_folded
from .verify import VerifyReport, compare, reference_outputs

FOLDED_CONFIG = "folded_config.json"
FOLDED_WEIGHTS = "model.safetensors"
FOLDED_SCHEMA = 2  # 2: source copies (bundle) in the directory


def save_folded(converted: ConvertedModel, folded: nn.Module, output: Path, inputs, config, report, check) -> None:
    """Write the folded directory atomically; with example inputs, what `load_folded` rebuilds is verified first."""
    from safetensors.torch import save_model

    targets = {}
    for name, paths in dendrite_layer_paths(converted.model).items():
        module = folded.get_submodule(name) if name else folded
        targets[name] = {"paths": paths, "module": module_spec(module)}
    recipe = {
        "schema_version": FOLDED_SCHEMA, "kind": "folded", "tool_version": __version__,
        "torch_version": torch.__version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": converted.source.to_dict(), "dendrite_config": converted.config.to_dict(),
        "targets": targets, "example_inputs": inputs.specs if inputs else converted.example_inputs,
        "folds": [r.to_dict() for r in report.folds],
    }
    with atomic_directory(output, force=True) as tmp:
        save_model(folded, str(tmp / FOLDED_WEIGHTS), metadata={"format": "pt"})
        converted.source.copy_files(tmp)
        (tmp / FOLDED_CONFIG).write_text(json.dumps(recipe, indent=2) + "\n")
        if inputs is not None:  # verify what load_folded rebuilds, not what is in memory
            rebuilt = load_folded(tmp, **converted.consent.keywords())
            expected = reference_outputs(converted.model, inputs.fresh)
            actual = reference_outputs(rebuilt, inputs.fresh)
            report.verify = VerifyReport(config.atol, config.rtol, [list(t.shape) for t in
                                         (inputs.fresh.values() if isinstance(inputs.fresh, dict) else inputs.fresh)])
            report.verify.outputs = [compare(f"output_{i}", e, a, config.atol, config.rtol)
                                     for i, (e, a) in enumerate(zip(expected, actual))]
            check(report.verify, output)
        else:
            report.notes.append("not verified: no example input (pass --input-shape or --adapter)")


def load_folded(path: str | Path, *, trust_code: bool = False, factory: str | None = None, allow_modules=(),
                trust_pickle: bool | None = None) -> nn.Module:
    """The folded model written by `export(..., ExportConfig(format="safetensors"))`, in eval mode.

    The source architecture is rebuilt as for a converted directory (the same keywords: code the directory
    names runs only with `factory` named again or `trust_code`), every target is replaced by the plain layers
    of its recorded fold, and the folded weights are loaded strictly. No pickle of this tool is involved.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from ..conversion.config import DendriteConfig
    from ..conversion.consent import Consent
    from ..conversion.loading import Source, read_json
    from ..conversion.rebuild import rebuild
    from ..conversion.rewrite import convert_model

    path = Path(path)
    file = path / FOLDED_CONFIG
    if not file.is_file():
        raise LoadError(f"{path} is not a folded-model directory: {FOLDED_CONFIG} is missing.")
    data = read_json(file)
    if data.get("kind") != "folded" or not isinstance(data.get("schema_version"), int):
        raise LoadError(f"{file} was not written by a safetensors export of dendrite_convert.")
    if data["schema_version"] > FOLDED_SCHEMA:
        raise LoadError(f"{file} has schema version {data['schema_version']}; upgrade dendrite_convert to load it.")
    try:
        source = Source.from_dict(data["source"], path)
        config = DendriteConfig.from_dict(data["dendrite_config"])
        targets = dict(data["targets"])
    except (TypeError, ValueError, KeyError, DendriteError) as exc:
        raise LoadError(f"{file} has malformed fields ({type(exc).__name__}: {exc}).") from exc
    consent = Consent.of(trust_code, factory, allow_modules, trust_pickle)

    def build():
        model, _ = convert_model(rebuild(source, consent, path), replace(config, dendrites=0, strict_graph=False))
        found = dendrite_layer_paths(model)
        if set(found) != set(targets):
            diff = sorted(set(found).symmetric_difference(targets))[:5]
            raise LoadError(f"{path}: the rebuilt model's targets differ from the recorded ones ({', '.join(diff)}).")
        for name, entry in targets.items():
            try:
                module = module_from_spec(entry["module"])
            except (TypeError, ValueError, KeyError) as exc:
                raise LoadError(f"{file}: target {name!r} has a malformed module spec ({type(exc).__name__}: {exc}).") from exc
            model = replace_layer(model, found[name], module)
        return model, found

    weights = path / FOLDED_WEIGHTS
    check_folded(weights, lambda: build()[0], targets)  # before allocating anything
    model, found = build()
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, RuntimeError, OSError, FileNotFoundError) as exc:
        raise LoadError(f"{weights} cannot be loaded ({type(exc).__name__}: {str(exc).strip()[:200]}).") from exc
    if missing or unexpected:
        raise LoadError(f"{weights} does not match the rebuilt folded model: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}.")
    for name, paths in found.items():
        for module in model.get_submodule(paths[0]).modules():  # a folded recurrent layer holds one inside
            if isinstance(module, FoldedDendrites) and not module.valid_channels():
                raise LoadError(f"{weights}: the channel sets of {name} are not increasing indices below "
                                f"{module.out_channels}; the file is damaged.")
    return model.eval().requires_grad_(False)
