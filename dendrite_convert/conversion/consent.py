"""Consent for code (docs/design.md §9): what a file may make this process run, and the flag that allows more.

Without `trust_code`, a pickle may name only torch's own `nn.Module` classes (and `torch.nn.functional`
functions) and objects of the modules the user named (`--allow-module`, the `--factory` module). Names are
checked against that list before anything is imported, no folder is added to `sys.path` for them, and an
import that fails in any way (even `SystemExit`) only makes the name unresolvable. A `.pt2` is inspected
before `torch.export.load` and refused when loading it would unpickle something or evaluate an expression
that is not plain arithmetic. TorchScript always needs the flag: `torch.jit.load` runs the file's code.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import pickle
import re
import sys
import types
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.errors import LoadError

log = logging.getLogger(__name__)
FLAG = "--trust-code"


@dataclass(frozen=True)
class Consent:
    """What the user allowed for this load: all code (`trust_code`), a factory named again, extra modules."""

    trust_code: bool = False
    factory: str | None = None
    allow_modules: tuple[str, ...] = ()

    @classmethod
    def of(cls, trust_code: bool = False, factory: str | None = None, allow_modules=(),
           trust_pickle: bool | None = None) -> Consent:
        """From the public keywords; `trust_pickle` is the deprecated name of `trust_code`."""
        if trust_pickle is not None:
            warnings.warn("trust_pickle is deprecated; use trust_code", DeprecationWarning, stacklevel=3)
            trust_code = trust_code or bool(trust_pickle)
        if isinstance(allow_modules, str):
            allow_modules = (allow_modules,)
        return cls(bool(trust_code), factory or None, tuple(str(m) for m in allow_modules or ()))

    def keywords(self) -> dict:
        """As the keywords of load, load_converted, load_folded and train."""
        return {"trust_code": self.trust_code, "factory": self.factory, "allow_modules": self.allow_modules}

    def module_entries(self) -> list[str]:
        """The modules whose objects a pickle may name: --allow-module entries and the --factory target."""
        entries = list(self.allow_modules)
        if self.factory and ":" in self.factory:
            entries.append(self.factory.rpartition(":")[0])
        return entries


# ---- pickles -------------------------------------------------------------------------------------------------

def load_pickle(path: Path, consent: Consent):
    """`torch.load` of a user's file under the consent rule; a refusal names what the file wanted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    except Exception as exc:
        raise LoadError(
            f"{path} is not a PyTorch checkpoint, .pt2, TorchScript or safetensors file ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'unreadable'})."
        ) from exc
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:
        raise LoadError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}).") from exc
    if consent.trust_code:
        return _unpickle_trusted(path, needed)
    resolved = {name: resolve_global(name, consent) for name in needed}
    refused = [name for name, obj in resolved.items() if obj is None]
    if refused:
        modules = sorted({name.rpartition(".")[0].split(".")[0] for name in refused})
        raise LoadError(
            f"{path} names code outside torch that unpickling would import and run ({', '.join(refused)}); if you trust it, "
            f"pass allow_modules={modules!r} to allow those modules, or trust_code=True to unpickle it fully."
        )
    try:
        with torch.serialization.safe_globals([(obj, name) for name, obj in resolved.items()]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LoadError(
            f"{path} could not be loaded with weights_only=True ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0]}); pass trust_code=True if you trust this file."
        ) from exc


def _unpickle_trusted(path: Path, needed: list[str]):
    """Full unpickling, with the file's folder importable for its own modules (the user trusts the file)."""
    log.warning("%s: unpickling %s, which imports %s", FLAG, path, ", ".join(needed) or "nothing unusual")
    folder = str(path.resolve().parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a module that calls exit() while imported must not end the caller
        raise LoadError(f"{path} could not be unpickled even with trust_code=True ({type(exc).__name__}: {exc}).") from exc
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def resolve_global(name: str, consent: Consent):
    """The object a pickled global names, or None when the consent does not allow it.

    The module is checked against the allowed ones before anything is imported; torch's own modules are
    only looked up (never imported) and give only nn.Module classes and torch.nn.functional functions.
    """
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name, attrs = ".".join(parts[:cut]), parts[cut:]
        module = _allowed_module(module_name, consent)
        if module is None:
            continue
        obj = module
        try:
            for attr in attrs:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        if _defined_in(obj, module, ".".join(attrs)) and _kind_allowed(obj, module_name, consent):
            return obj
    return None


def _allowed_module(module_name: str, consent: Consent) -> types.ModuleType | None:
    top = module_name.split(".")[0]
    for entry in consent.module_entries():
        if entry.endswith(".py"):
            if module_name == Path(entry).stem and Path(entry).is_file():
                from .factories import import_file

                return _guarded_import(lambda: import_file(Path(entry)))
        elif module_name == entry or module_name.startswith(entry + "."):
            return _guarded_import(lambda: importlib.import_module(module_name))
    if top == "torch" or module_name in ("__main__", "__mp_main__"):
        return sys.modules.get(module_name)  # never imported on the file's behalf
    return None


def _guarded_import(do_import):
    """An allowed module's import; any failure (SystemExit included) makes its names unresolvable."""
    try:
        return do_import()
    except KeyboardInterrupt:
        raise
    except ModuleNotFoundError:  # a class path tried as a module name (pkg.mod.Outer.Inner): not one
        return None
    except BaseException as exc:  # noqa: BLE001 - an allowed module that exits or fails to import is refused
        log.warning("an allowed module failed to import (%s: %s)", type(exc).__name__, exc)
        return None


def _defined_in(obj, module: types.ModuleType, qualname: str) -> bool:
    """The object is the module's own, not something it imported (`pkg.os.system` is not `pkg`'s)."""
    return getattr(obj, "__module__", None) == module.__name__ and getattr(obj, "__qualname__", None) == qualname


def _kind_allowed(obj, module_name: str, consent: Consent) -> bool:
    """Named modules give anything of their own; torch and the running program only nn.Module classes
    (and torch.nn.functional functions), whose unpickling sets attributes and runs no file-chosen code."""
    if any(module_name == e or module_name.startswith(e + ".") for e in consent.allow_modules):
        return True
    is_module_class = isinstance(obj, type) and issubclass(obj, nn.Module)
    if module_name in ("__main__", "__mp_main__"):
        return is_module_class
    if module_name.split(".")[0] == "torch":
        return is_module_class or (isinstance(obj, types.FunctionType) and module_name == "torch.nn.functional")
    return True


# ---- .pt2 archives --------------------------------------------------------------------------------------------

# what torch.export writes: "s31", "2*s31 + 1", "Symbol('s31', positive=True, integer=True)"
_SAFE_EXPR = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*|'[A-Za-z_][A-Za-z0-9_]*'|\d+(?:\.\d+)?(?:e[+-]?\d+)?"
                        r"|[\s+\-*/%(),<>=!&|~^])*")
_SAFE_NAMES = {
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "TruncToFloat", "TruncToInt",
    "IsNonOverlappingAndDenseIndicator", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "Max", "Min", "Abs",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "True", "False", "oo", "floor", "ceiling", "int_oo",
    "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "OpaqueUnaryFn_sqrt", "Integer", "Float", "Rational",
    "Symbol", "positive", "integer", "real", "nonnegative", "negative", "finite", "zero", "Add", "Mul", "Pow",
}


def check_pt2(path: Path) -> None:
    """Refuse a .pt2 whose loading would unpickle with the full unpickler or eval a non-arithmetic expression.

    torch.export.load unpickles weights/constants marked `use_pickle` and custom/opaque objects with the full
    unpickler, falls back to full unpickling for other pickles (sample inputs, legacy weights) that
    weights_only refuses, and parses the program's symbolic expressions with sympy, which evaluates them as
    Python. Raw weight and constant payloads are plain bytes and are not looked at.
    """
    try:
        wanted = _pt2_problems(path)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, ValueError) as exc:
        raise LoadError(f"{path} is a damaged .pt2 archive ({type(exc).__name__}: {exc}).") from exc
    wanted = list(dict.fromkeys(wanted))
    if wanted:
        raise LoadError(f"{path} would run code when loaded by torch.export ({'; '.join(wanted[:5])}); "
                        "pass trust_code=True if you trust this file.")


def _pt2_problems(path: Path) -> list[str]:
    wanted = []
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            base = name.rsplit("/", 1)[-1]
            if name.endswith(".json"):
                wanted += _json_problems(name, archive.read(name))
            elif base.startswith(("weight_", "tensor_", "custom_obj_", "opaque_obj_")):
                continue  # raw payloads; the pickled kinds are named by their config (checked above)
            elif _is_zip(archive, name) and not _weights_only_loads(archive.read(name)):
                wanted.append(f"{name} (a pickle that needs the full unpickler)")
    return wanted


def _json_problems(name: str, data: bytes) -> list[str]:
    try:
        tree = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return [f"{name} (not JSON)"]
    problems = []
    for key, value in _walk(tree):
        if key == "use_pickle" and value is True:
            problems.append(f"{name} (an entry marked use_pickle)")
        elif key == "path_name" and isinstance(value, str) and value.startswith(("custom_obj", "opaque_obj")):
            problems.append(f"{name} (a pickled object {value})")
        elif key in ("expr_str", "range_constraints") and not _safe_exprs(value):
            problems.append(f"{name} (a symbolic expression that is not plain arithmetic)")
    return problems


def _walk(tree):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _walk(value)


def _safe_exprs(value) -> bool:
    exprs = list(value) if isinstance(value, dict) else [value] if isinstance(value, str) else []
    for expr in exprs:
        if "__" in expr or not _SAFE_EXPR.fullmatch(expr):
            return False
        for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expr):
            if word not in _SAFE_NAMES and not re.fullmatch(r"[a-z]\d+", word):
                return False
    return True


def _is_zip(archive: zipfile.ZipFile, name: str) -> bool:
    """A torch.save payload (a zip) inside the archive: sample inputs, legacy weights and constants."""
    with archive.open(name) as f:
        return f.read(4) == b"PK\x03\x04"


def _weights_only_loads(data: bytes) -> bool:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure means torch.export would retry with the full unpickler
        return False
    return True
