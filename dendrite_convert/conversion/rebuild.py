"""Rebuild the original architecture of a directory the tool wrote, under the consent rule of docs/design.md §9.

A directory records how its model was obtained (`Source`) and carries copies of the files that are its
architecture. Rebuilding runs code only as the user allows: a factory they name again (whose file must be
the one recorded), or `trust_code` for the recorded factory or the stored copy. A pickled model's copy is
unpickled under the same allow-list as any other pickle; a Hugging Face config needs no code at all.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from torch import nn

from ..core.errors import LoadError
from .consent import FLAG, Consent, load_pickle
from .factories import (attribute, build_from_factory, call_factory, exec_file, factory_file, is_file_target,
                        resolve_factory, split_factory)
from .loading import Source, _load_pt2, sha256

log = logging.getLogger(__name__)


def rebuild(source: Source, consent: Consent, where: Path | str) -> nn.Module:
    """The original architecture again (weights will be overwritten by the directory's weights).

    Code recorded in `where` (a factory, the classes of a pickled model) runs only as `consent` allows:
    a factory the user names again, or `trust_code` for the recorded one (its stored copy when there is one).
    """
    if source.kind == "huggingface":
        return _rebuild_huggingface(source)
    if source.kind in ("state_dict", "torchscript", "factory"):
        return _rebuild_factory(source, consent, where)
    if source.kind not in ("pickle", "pt2"):
        raise LoadError(f"a model of source kind {source.kind!r} cannot be rebuilt; convert it from a file or with a factory.")
    name = source.bundle.get("model")
    path = source.files.get(name) if name else Path(source.path or "")
    if not name and not path.is_absolute():
        raise LoadError(f"the recorded source path {source.path!r} is not absolute; the directory's config is damaged.")
    if not path.is_file():
        raise LoadError(f"{path} is gone; {where} rebuilds the architecture from it"
                        f"{' (a copy of the original model, written with the directory)' if name else ''}.")
    _check_hash(path, source.sha256, "the model file")
    if source.kind == "pt2":
        return _load_pt2(path, consent)
    model = load_pickle(path, consent)
    if not isinstance(model, nn.Module):
        raise LoadError(f"the original model {path} no longer holds a whole model.")
    return model


def _check_hash(path: Path, recorded: str | None, what: str) -> None:
    if recorded is not None and sha256(path) != recorded:
        raise LoadError(f"{path} is not {what} recorded at conversion: its sha256 is {sha256(path)}, the record says "
                        f"{recorded}; the directory or the file was changed.")


def _rebuild_factory(source: Source, consent: Consent, where) -> nn.Module:
    recorded, kwargs = source.factory, source.factory_kwargs
    if not isinstance(recorded, str) or not isinstance(kwargs, dict):
        raise LoadError(f"{where}: the recorded source has no usable factory; the directory's config is damaged.")
    copy = source.bundle.get("factory")
    if consent.factory:  # the user's own code, named again; it must be the code the directory was made with
        spec = consent.factory
        file = factory_file(spec)
        if file is not None and is_file_target(spec.rpartition(":")[0]):
            _check_hash(file, source.factory_sha256, f"the factory file of {where}")
        fn = resolve_factory(spec)
        if file is not None and not is_file_target(spec.rpartition(":")[0]) and source.factory_sha256 \
                and sha256(file) != source.factory_sha256:
            log.warning("%s changed since %s was converted (sha256 %s now, %s then); the weights are still loaded "
                        "strictly", file, where, sha256(file), source.factory_sha256)
        return call_factory(fn, spec, kwargs)
    if not consent.trust_code:
        stored = " (a copy is stored in the directory)" if copy else ""
        raise LoadError(f"{where} rebuilds its architecture by running code, the factory {recorded}{stored}; name it "
                        "again with factory= if it is yours, or pass trust_code=True "
                        f"to run {'the stored copy' if copy else 'it'}.")
    if copy:
        path = source.files[copy]
        if not path.is_file():
            raise LoadError(f"{path} is gone; {where} needs it to rebuild the architecture.")
        _check_hash(path, source.factory_sha256, f"the factory copy of {where}")
        _, attr = split_factory(recorded, "the recorded factory")
        name = "_dendrite_copy_" + source.factory_sha256[:12] if source.factory_sha256 else "_dendrite_copy"
        try:
            module = sys.modules.get(name) or exec_file(path, name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - the user trusted it; its failure is still a load failure
            raise LoadError(f"the factory copy {path} cannot be imported: {type(exc).__name__}: {exc}.") from exc
        return call_factory(attribute(module, attr, recorded, "the recorded factory"), recorded, kwargs)
    return build_from_factory(recorded, kwargs)


def _rebuild_huggingface(source: Source) -> nn.Module:
    """A transformers model class of the library itself, built from the recorded config: no file code runs."""
    import transformers

    try:
        cls = getattr(transformers, source.hf_class) if isinstance(source.hf_class, str) else None
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ValueError(f"{source.hf_class!r} is not a transformers model class")
        config_dict = dict(source.hf_config or {})
        config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        return cls(config)
    except Exception as exc:
        raise LoadError(f"the recorded transformers model {source.hf_class!r} cannot be rebuilt ({type(exc).__name__}: {exc}).") from exc


def code_needed(source: dict) -> str:
    """One sentence on the code a directory's loading runs and what allows it (for `dendrite inspect`)."""
    kind, factory = source.get("kind"), source.get("factory")
    if kind in ("state_dict", "torchscript", "factory"):
        stored = " (a copy is stored in the directory)" if (source.get("bundle") or {}).get("factory") else ""
        return (f"loading runs the factory {factory}{stored}: name it again with --factory, or pass {FLAG} to run "
                "the recorded one.")
    if kind == "pickle":
        return (f"loading unpickles the stored model: torch classes need nothing, other classes need --allow-module "
                f"or {FLAG}.")
    if kind == "pt2":
        return f"loading reads the stored torch.export program; one with pickled entries needs {FLAG}."
    return "loading runs no code from the directory (a transformers class of the library itself)."
