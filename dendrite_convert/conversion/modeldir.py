"""The converted-model directory: `dendrite_config.json` + `model.safetensors`, never a pickle.

Loading rebuilds the original architecture from the recorded source, re-applies the conversion
(deterministic), adds the recorded number of dendrites to every target and loads the weights
strictly, so a directory written by this version always loads and a changed model fails loudly.
The directory carries copies of the files its architecture comes from (a factory's .py file, a pickled
model or .pt2), so it loads after being moved or after the originals are deleted; code among them runs
only with the user's consent (docs/design.md §9).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from .config import DendriteConfig
from ..core.errors import DendriteError, LoadError, UsageError
from ..core.files import atomic_directory, output_lock
from ..core.structure import set_dendrite_counts
from ..core.layers import dendrite_layers
from ..core.version import __version__
from .consent import Consent
from .liveness import recorded_unreached
from .loading import Source, read_json
from .rebuild import rebuild
from .report import ConversionReport
from .rewrite import convert_model, refresh_report
from .validate import check_converted

SCHEMA_VERSION = 2  # 2: source copies (bundle) in the directory
CONFIG_FILE = "dendrite_config.json"
WEIGHTS_FILE = "model.safetensors"
MAX_DENDRITES = 1000


@dataclass
class ConvertedModel:
    """A converted model and everything needed to save and rebuild it."""

    model: nn.Module
    source: Source
    config: DendriteConfig
    report: ConversionReport
    example_inputs: list[dict] = field(default_factory=list)  # [{"shape": [...], "dtype": "float32", "high": n}]
    consent: Consent = field(default_factory=Consent, repr=False)  # what the user allowed when it was obtained

    def refreshed_report(self) -> ConversionReport:
        return refresh_report(self.model, self.report)

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "tool_version": __version__,
            "torch_version": torch.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": self.source.to_dict(),
            "dendrite_config": self.config.to_dict(),
            "recipe": self.refreshed_report().to_dict(),
            "example_inputs": self.example_inputs,
        }

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the directory atomically; an existing one is replaced only with `force`."""
        from safetensors.torch import save_model

        path = Path(path)
        if self.source.kind == "module":
            raise UsageError(
                "this model was converted in memory without a factory; pass factory='pkg.module:fn' to convert() "
                "so the saved directory can rebuild its architecture."
            )
        with output_lock(path, beside=True), atomic_directory(path, force) as tmp:  # one writer at a time
            save_model(self.model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            self.source.copy_files(tmp)
            (tmp / CONFIG_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def read_config(path: Path) -> dict:
    """The directory's config, checked for the fields and schema version this version understands."""
    if not path.is_dir():
        raise LoadError(f"{path} is not a converted-model directory (expected a folder with {CONFIG_FILE}).")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise LoadError(f"{path} is not a converted-model directory: {CONFIG_FILE} is missing.")
    data = read_json(file)
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise LoadError(f"{file} has no integer schema_version; it was not written by dendrite_convert.")
    if version > SCHEMA_VERSION:
        raise LoadError(
            f"{file} has schema version {version}, newer than this dendrite_convert understands "
            f"({SCHEMA_VERSION}); upgrade: pip install -U dendrite-convert."
        )
    for key, kind in (("source", dict), ("dendrite_config", dict), ("recipe", dict)):
        if not isinstance(data.get(key), kind):
            raise LoadError(f"{file} is missing its {key!r} section or it has the wrong type.")
    return data


def load_converted(path: str | Path, *, trust_code: bool = False, factory: str | None = None,
                   allow_modules=(), trust_pickle: bool | None = None) -> ConvertedModel:
    """Rebuild a converted model directory strictly.

    Code the directory names runs only with consent, never read from a file: `factory` names the factory
    again (your own file or module; it must be the one recorded), `allow_modules` lets a stored pickle use
    those modules' classes, `trust_code` runs whatever the directory records (its stored copies).
    `trust_pickle` is the deprecated name of `trust_code`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    data = read_config(path)
    try:
        source = Source.from_dict(data["source"], path)
        config = DendriteConfig.from_dict(data["dendrite_config"])
        recipe = ConversionReport.from_dict(data["recipe"])
    except (TypeError, ValueError, KeyError, DendriteError) as exc:
        raise LoadError(f"{path / CONFIG_FILE} has malformed fields ({type(exc).__name__}: {exc}).") from exc
    for target in recipe.targets:
        if not isinstance(target.name, str) or type(target.dendrites) is not int or not 0 <= target.dendrites <= MAX_DENDRITES:
            raise LoadError(f"{path / CONFIG_FILE}: target {target.name!r} has an invalid dendrite count {target.dendrites!r}.")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise LoadError(f"{path} has no {WEIGHTS_FILE}.")
    consent = Consent.of(trust_code, factory, allow_modules, trust_pickle)

    def build():
        return convert_model(rebuild(source, consent, path), replace(config, dendrites=0, strict_graph=False),
                             recorded_unreached(recipe))

    check_converted(weights, build, {t.name: t.dendrites for t in recipe.targets})  # before allocating anything
    model, report = build()
    expected = {t.name: t for t in recipe.targets}
    if len(expected) != len(recipe.targets):
        raise LoadError(f"{path / CONFIG_FILE} lists a target twice; the recipe is damaged.")
    found = {t.name for t in report.targets}
    if found != set(expected):
        diff = sorted(found.symmetric_difference(expected))[:5]
        raise LoadError(f"{path}: the rebuilt model's targets differ from the recorded recipe ({', '.join(diff)}).")
    with torch.random.fork_rng(devices=[]):  # the weights drawn here are overwritten: keep the caller's RNG as it was
        set_dendrite_counts(model, {name: target.dendrites for name, target in expected.items()})
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise LoadError(f"{weights} cannot be loaded ({type(exc).__name__}: {str(exc).strip()[:200]}).") from exc
    if missing or unexpected:
        raise LoadError(
            f"{weights} does not match the rebuilt model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}."
        )
    for name, layer in dendrite_layers(model).items():
        if layer.dendrite_channels is not None and not all(map(layer.serves_valid_channels, layer.dendrite_channels)):
            raise LoadError(f"{weights}: {name}.dendrite_channels is not a set of distinct increasing channels below "
                            f"{layer.out_channels}; the file is damaged.")
    return ConvertedModel(model, source, config, refresh_report(model, report), list(data.get("example_inputs") or []),
                          consent)


def load(path: str | Path, *, trust_code: bool = False, factory: str | None = None, allow_modules=(),
         trust_pickle: bool | None = None) -> nn.Module:
    """The converted (or trained) model in a directory, ready to run (keywords as for `load_converted`)."""
    return load_converted(path, trust_code=trust_code, factory=factory, allow_modules=allow_modules,
                          trust_pickle=trust_pickle).model
