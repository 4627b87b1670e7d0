"""Factories: the user's own code that builds an architecture, named as `pkg.module:fn` or
`path/to/file.py:fn`. Only what the user named is imported; a file is imported by path, with its folder
importable for its own siblings (adapters are imported the same way).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from torch import nn

from ..core.errors import LoadError


def split_factory(spec: str, what: str) -> tuple[str, str]:
    target, sep, attr = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not target or not attr:
        raise LoadError(f"{what} {spec!r} must look like 'pkg.module:fn' or 'path/to/file.py:fn'.")
    return target, attr


def is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def resolve_factory(spec: str, what: str = "--factory"):
    """`pkg.module:fn` or `path/to/file.py:fn` -> the callable; only what the user named is imported."""
    target, attr = split_factory(spec, what)
    try:
        if is_file_target(target):
            file = Path(target)
            if not file.is_file():
                raise LoadError(f"{what} {spec!r}: file {target} does not exist.")
            module = import_file(file)
        else:
            module = importlib.import_module(target)
    except LoadError:
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit from a user's module is a load failure too
        hint = _file_hint(target, attr, exc)
        raise LoadError(f"{what} {spec!r} cannot be imported: {type(exc).__name__}: {exc}{hint}.") from exc
    return attribute(module, attr, spec, what)


def attribute(module, attr: str, spec: str, what: str):
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LoadError(f"{what} {spec!r}: {getattr(module, '__name__', module)} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    return obj


def _file_hint(target: str, attr: str, exc: BaseException) -> str:
    """`cnn:build` run next to cnn.py: the module is not importable, the file is; say how to name it."""
    if not isinstance(exc, ModuleNotFoundError) or exc.name is None or not target.startswith(exc.name):
        return ""
    file = Path(*target.split(".")).with_suffix(".py")
    return f"; {file} is here: name the file instead, --factory {file.as_posix()}:{attr}" if file.is_file() else ""


def factory_file(spec: str | None) -> Path | None:
    """The Python file a factory spec runs: the named file, or the module's source file (found, not imported)."""
    if not spec or ":" not in spec:
        return None
    target = spec.rpartition(":")[0]
    if is_file_target(target):
        return Path(target).resolve() if Path(target).is_file() else None
    try:
        found = importlib.util.find_spec(target)
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 - a parent package that fails to import: nothing to hash
        return None
    origin = getattr(found, "origin", None)
    return Path(origin) if origin and Path(origin).is_file() else None


def import_file(file: Path):
    """Import a user's Python file by path, with its folder importable for its own siblings."""
    file = file.resolve()
    name = "_dendrite_user_" + hashlib.sha1(str(file).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    if str(file.parent) not in sys.path:
        sys.path.insert(0, str(file.parent))
    return exec_file(file, name)


def exec_file(file: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def absolute_factory(spec: str | None) -> str | None:
    """`file.py:fn` with the file made absolute: the spec to name again, from any working directory."""
    if not spec:
        return spec
    target, sep, attr = spec.rpartition(":")
    if sep and is_file_target(target) and Path(target).is_file():
        return f"{Path(target).resolve()}:{attr}"
    return spec


def call_factory(fn, spec: str, kwargs: dict) -> nn.Module:
    try:
        model = fn(**kwargs)
    except Exception as exc:
        raise LoadError(f"factory {spec} raised {type(exc).__name__}: {exc}.", parameter="factory") from exc
    if not isinstance(model, nn.Module):
        raise LoadError(f"factory {spec} returned {type(model).__name__}, not a torch.nn.Module.",
                        parameter="factory")
    return model


def build_from_factory(spec: str, kwargs: dict) -> nn.Module:
    return call_factory(resolve_factory(spec), spec, kwargs)
