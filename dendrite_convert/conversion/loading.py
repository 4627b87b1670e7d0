"""Load a model from any of the saved forms of docs/design.md §3, and rebuild its architecture later.

A `Source` records how the model was obtained so that a converted directory can rebuild the
architecture without ever pickling it: the converted weights then come from `model.safetensors`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import pickle
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.errors import LoadError

log = logging.getLogger(__name__)
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Source:
    """How to rebuild the original architecture."""

    kind: str  # pickle | state_dict | pt2 | huggingface | torchscript | factory
    path: str | None = None
    sha256: str | None = None
    factory: str | None = None
    factory_kwargs: dict = field(default_factory=dict)
    trust_pickle: bool = False
    hf_class: str | None = None
    hf_config: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Source:
        return cls(**data)

    def describe(self) -> str:
        where = f" {self.path}" if self.path else ""
        how = f" + --factory {self.factory}" if self.factory else ""
        return f"{self.kind}{where}{how}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_factory(spec: str, what: str = "--factory"):
    """`pkg.module:fn` or `path/to/file.py:fn` -> the callable; only what the user named is imported."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise LoadError(f"{what} {spec!r} must look like 'pkg.module:fn' or 'path/to/file.py:fn'.")
    try:
        if target.endswith(".py") or "/" in target:
            file = Path(target)
            if not file.is_file():
                raise LoadError(f"{what} {spec!r}: file {target} does not exist.")
            module = _import_file(file)
        else:
            module = importlib.import_module(target)
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(f"{what} {spec!r} cannot be imported: {type(exc).__name__}: {exc}.") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LoadError(f"{what} {spec!r}: {target} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    return obj


def _import_file(file: Path):
    """Import a user's Python file by path, with its folder importable for its own siblings."""
    file = file.resolve()
    name = "_dendrite_user_" + hashlib.sha1(str(file).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    if str(file.parent) not in sys.path:
        sys.path.insert(0, str(file.parent))
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
    """`file.py:fn` with the file made absolute, so a converted directory rebuilds from any working directory."""
    if not spec:
        return spec
    target, sep, attr = spec.rpartition(":")
    if sep and (target.endswith(".py") or "/" in target) and Path(target).is_file():
        return f"{Path(target).resolve()}:{attr}"
    return spec


def build_from_factory(spec: str, kwargs: dict) -> nn.Module:
    fn = resolve_factory(spec)
    try:
        model = fn(**kwargs)
    except Exception as exc:
        raise LoadError(f"--factory {spec} raised {type(exc).__name__}: {exc}.") from exc
    if not isinstance(model, nn.Module):
        raise LoadError(f"--factory {spec} returned {type(model).__name__}, not a torch.nn.Module.")
    return model


def unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """Accept `{'state_dict'|'model'|...: sd}` wrappers and strip DDP/compile prefixes."""
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoadError(f"{path} holds a {type(obj).__name__} that is neither a model nor a state dict of tensors.")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_weights_into(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path, spec: str) -> None:
    """Strict load that names what does not match; keys tied to a loaded tensor may be absent."""
    expected = model.state_dict(keep_vars=True)
    owner = {}
    for name, tensor in expected.items():
        owner.setdefault(id(tensor), []).append(name)
    loaded_ids = {id(expected[k]) for k in state_dict if k in expected}
    missing = [k for k in expected if k not in state_dict and id(expected[k]) not in loaded_ids]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state_dict.items()
             if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            problems.append(f"{label}: {', '.join(keys[:5])}{more}")
    if problems:
        raise LoadError(f"the weights in {path} do not match the model built by {spec}: {'; '.join(problems)}.")
    model.load_state_dict(state_dict, strict=False)


def _kind(path: Path) -> str:
    if path.is_dir():
        if (path / "dendrite_config.json").exists():
            return "converted"
        if (path / "config.json").exists():
            return "huggingface"
        raise LoadError(f"{path} is a directory without config.json: not a Hugging Face model directory.")
    if path.suffix == ".safetensors":
        return "safetensors"
    names = _zip_names(path)
    if names is not None:
        if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            return "pt2"
        if any("/code/" in n or n.startswith("code/") for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
    return "torch"


def _zip_names(path: Path) -> list[str] | None:
    """Member names of a zip archive (torch.save, .pt2 and TorchScript are zips), None for other files."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except Exception as exc:  # zipfile raises BadZipFile, NotImplementedError, EOFError... on damaged headers
        raise LoadError(f"{path} is a damaged zip archive ({type(exc).__name__}: {exc}).") from exc


def load_source(
    path: str | Path, factory: str | None = None, factory_kwargs: dict | None = None, trust_pickle: bool = False
) -> tuple[nn.Module, Source]:
    """Load a saved model in any supported form; returns the model and how to rebuild it."""
    path = Path(path)
    kwargs = factory_kwargs or {}
    if not path.exists():
        raise LoadError(f"{path} does not exist.")
    kind = _kind(path)
    if kind == "converted":
        raise LoadError(f"{path} is already a converted model; train it with dendrite-train or export it.")
    if kind == "huggingface":
        return _load_huggingface(path)
    digest = sha256(path)
    if kind == "pt2":
        return _load_pt2(path), Source("pt2", str(path.resolve()), digest)
    if kind == "torchscript":
        if not factory:
            raise LoadError(
                f"{path} is TorchScript, which keeps weights but compiles away the Python classes; "
                "pass --factory module:fn that builds the architecture, and its weights will be loaded."
            )
        try:
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as exc:
            raise LoadError(f"{path} is not a loadable TorchScript file ({type(exc).__name__}).") from exc
        model = build_from_factory(factory, kwargs)
        load_weights_into(model, state, path, f"--factory {factory}")
        return model, Source("torchscript", str(path.resolve()), digest, absolute_factory(factory), kwargs)
    if kind == "safetensors":
        obj = _load_safetensors(path)
    else:
        obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        _check_unpickled(obj, path)
        if factory:
            log.warning("%s holds a whole model; --factory %s is not needed and was ignored", path, factory)
        return obj, Source("pickle", str(path.resolve()), digest, trust_pickle=trust_pickle)
    state = unwrap_state_dict(obj, path)
    if not factory:
        raise LoadError(f"{path} is a state dict (weights only); pass --factory module:fn that builds the model.")
    model = build_from_factory(factory, kwargs)
    load_weights_into(model, state, path, f"--factory {factory}")
    return model, Source("state_dict", str(path.resolve()), digest, absolute_factory(factory), kwargs)


def _check_unpickled(model: nn.Module, path: Path) -> None:
    """A damaged pickle can unpickle into a module with broken internals; refuse it before using it."""
    try:
        for m in model.modules():
            m._parameters, m._buffers, m._modules, m.training  # noqa: B018 - the attributes every Module has
        model.state_dict()
        repr(model)
    except Exception as exc:
        raise LoadError(f"{path} unpickles into a damaged model ({type(exc).__name__}: {exc}).") from exc


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise LoadError(f"{path} is not a valid safetensors file ({type(exc).__name__}: {exc}).") from exc


def _allowed_global(name: str, search: list[str]):
    """Resolve a pickled global; only nn.Module classes are allowed without --trust-pickle."""
    module_name, _, attr = name.rpartition(".")
    if module_name in ("__main__", "__mp_main__"):  # only a class of the running program, never an import
        obj = getattr(sys.modules.get(module_name), attr, None)
        return obj if isinstance(obj, type) and issubclass(obj, nn.Module) else None
    added = [p for p in search if p not in sys.path]
    sys.path[:0] = added
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception:
        return None
    finally:
        for p in added:
            sys.path.remove(p)
    return obj if isinstance(obj, type) and issubclass(obj, nn.Module) else None


def _torch_load(path: Path, trust_pickle: bool):
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
    if trust_pickle:
        log.warning("--trust-pickle: unpickling %s, which imports %s", path, ", ".join(needed) or "nothing unusual")
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise LoadError(f"{path} could not be unpickled even with --trust-pickle ({type(exc).__name__}: {exc}).") from exc
    search = [str(path.resolve().parent), str(Path.cwd())]
    resolved = {name: _allowed_global(name, search) for name in needed}
    refused = [name for name, obj in resolved.items() if obj is None]
    if refused:
        raise LoadError(
            f"{path} needs globals that are not importable nn.Module classes: {', '.join(refused)}; "
            "make the model's classes importable, save a state dict and use --factory, or pass --trust-pickle "
            "if you trust this file (unpickling can run arbitrary code)."
        )
    try:
        with torch.serialization.safe_globals(list(resolved.values())):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LoadError(
            f"{path} could not be loaded with weights_only=True ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0]}); pass --trust-pickle if you trust this file."
        ) from exc


def _load_pt2(path: Path) -> nn.Module:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise LoadError(
            f"{path} is a .pt2 archive but not a torch.export ExportedProgram (an AOTInductor package is compiled "
            f"and cannot be converted) ({type(exc).__name__}: {str(exc).strip()[:150]})."
        ) from exc
    log.warning("%s is a torch.export program: its train/eval behaviour (dropout, BatchNorm) is frozen as exported", path)
    module = program.module()
    args = program.example_inputs[0] if program.example_inputs else ()
    module._dendrite_example_inputs = [
        {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in args if isinstance(t, torch.Tensor)
    ]
    for frozen in ("train", "eval"):  # torch.export makes these raise; the flags are harmless, the graph stays frozen
        module.__dict__.pop(frozen, None)
    return module


def _load_huggingface(path: Path) -> tuple[nn.Module, Source]:
    try:
        import transformers
    except ImportError as exc:
        raise LoadError(f"{path} is a Hugging Face model; install transformers: pip install 'dendrite-convert[transformers]'.") from exc
    transformers.utils.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        arch = (config.architectures or [None])[0]
        cls = getattr(transformers, arch) if arch and hasattr(transformers, arch) else transformers.AutoModel
        model = cls.from_pretrained(path)
    except Exception as exc:
        raise LoadError(f"{path} could not be loaded by transformers ({type(exc).__name__}: {exc}).") from exc
    hf_class = type(model).__name__
    return model, Source("huggingface", str(path.resolve()), None, hf_class=hf_class, hf_config=config.to_dict())


def rebuild(source: Source, trust_pickle: bool = False) -> nn.Module:
    """The original architecture again (weights will be overwritten by the converted file).

    Rebuilding imports the recorded factory or the classes of the recorded pickle, so load only
    converted directories you trust; full unpickling needs `trust_pickle` from the caller.
    """
    if source.kind == "huggingface":
        import transformers

        try:
            config_dict = dict(source.hf_config or {})
            config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
            return getattr(transformers, source.hf_class)(config)
        except Exception as exc:
            raise LoadError(f"the recorded transformers model {source.hf_class!r} cannot be rebuilt ({type(exc).__name__}: {exc}).") from exc
    if source.kind in ("state_dict", "torchscript", "factory"):
        if not isinstance(source.factory, str) or not isinstance(source.factory_kwargs, dict):
            raise LoadError("the recorded source has no usable factory; the directory's config is damaged.")
        return build_from_factory(source.factory, source.factory_kwargs)
    if source.kind not in ("pickle", "pt2"):
        raise LoadError(f"a model of source kind {source.kind!r} cannot be rebuilt; convert it from a file or with a factory.")
    path = Path(source.path or "")
    if not path.is_absolute():
        raise LoadError(f"the recorded source path {source.path!r} is not absolute; the directory's config is damaged.")
    if source.trust_pickle and not trust_pickle:
        raise LoadError(f"the model was converted from {path} with --trust-pickle; pass --trust-pickle again to load it.")
    if not path.is_file():
        raise LoadError(
            f"the original model {source.path} is gone; the converted directory rebuilds the architecture from it."
        )
    if source.sha256 and sha256(path) != source.sha256:
        log.warning("%s changed since conversion (sha256 differs); rebuilding from it anyway", path)
    if source.kind == "pt2":
        return _load_pt2(path)
    model = _torch_load(path, trust_pickle)
    if not isinstance(model, nn.Module):
        raise LoadError(f"the original model {path} no longer holds a whole model.")
    return model


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"{path} is not readable JSON ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(data, dict):
        raise LoadError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    return data
