"""Load a model from any of the saved forms of docs/design.md §3, and rebuild its architecture later.

A `Source` records how the model was obtained so that a converted directory can rebuild the
architecture without ever pickling it: the converted weights then come from `model.safetensors`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.errors import LoadError
from .consent import Consent, check_pt2, load_pickle
from .factories import absolute_factory, build_from_factory, factory_file, is_file_target

log = logging.getLogger(__name__)
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")


MODEL_COPY = "source_model"  # + the original suffix: the pickled module or .pt2 that is the architecture
FACTORY_COPY = "source_factory.py"


@dataclass
class Source:
    """How to rebuild the original architecture, and the copies of its files that travel with a directory.

    `path` and `factory` say where the model came from; `bundle` names the copies written into every
    directory (role -> file name) and `sha256`/`factory_sha256` their hashes. `files` is where the bytes
    of each copy are now (the originals right after conversion, the copies once loaded); it is not saved.
    """

    kind: str  # pickle | state_dict | pt2 | huggingface | torchscript | factory
    path: str | None = None
    sha256: str | None = None
    factory: str | None = None
    factory_kwargs: dict = field(default_factory=dict)
    factory_sha256: str | None = None
    hf_class: str | None = None
    hf_config: dict | None = None
    bundle: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("files")
        return data

    @classmethod
    def from_dict(cls, data: dict, directory: Path | None = None) -> Source:
        """The recorded source; with `directory`, its copies are the files found there."""
        data = {k: v for k, v in data.items() if k not in ("trust_pickle", "files")}  # trust is never read from a file
        source = cls(**data)
        if not isinstance(source.bundle, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and _plain_name(v) for k, v in source.bundle.items()):
            raise ValueError(f"bundle must map roles to file names inside the directory, not {source.bundle!r}")
        if directory is not None:
            source.files = {name: directory / name for name in source.bundle.values()}
        return source

    def copy_files(self, dest: Path, link: bool = False) -> None:
        """Write the copies into directory `dest` (hard links where `link` and possible), checking their hashes."""
        hashes = {"model": self.sha256, "factory": self.factory_sha256}
        for role, name in self.bundle.items():
            src, dst = Path(self.files[name]), dest / name
            if not src.is_file():
                raise LoadError(f"{src} is gone; it is part of the model's source and is copied into every directory.")
            if link:
                try:
                    os.link(src, dst)
                    continue  # the bytes of a copy checked when it was written
                except OSError:
                    pass
            shutil.copyfile(src, dst)
            if hashes.get(role) and sha256(dst) != hashes[role]:
                dst.unlink()
                raise LoadError(f"{src} changed since the model was converted (sha256 {hashes[role]} then, "
                                f"{sha256(src)} now); convert it again.")

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


def _plain_name(name: str) -> bool:
    """A file name inside a directory: no folder part, nothing that could escape it."""
    return bool(name) and Path(name).name == name and name not in (".", "..") and not name.startswith(".") \
        and "\\" not in name


def factory_source(kind: str, spec: str, kwargs: dict, **fields) -> Source:
    """A factory-built source: the spec to name again, its file's hash and, for a .py file, a copy."""
    file = factory_file(spec)
    is_copy = file is not None and is_file_target(spec.rpartition(":")[0])
    return Source(kind, factory=absolute_factory(spec), factory_kwargs=kwargs,
                  factory_sha256=sha256(file) if file else None,
                  bundle={"factory": FACTORY_COPY} if is_copy else {},
                  files={FACTORY_COPY: file} if is_copy else {}, **fields)


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


def load_source(path: str | Path, factory: str | None = None, factory_kwargs: dict | None = None,
                consent: Consent | None = None) -> tuple[nn.Module, Source]:
    """Load a saved model in any supported form; returns the model and how to rebuild it.

    `factory` is the user's own code and may run; anything else the file names runs only as `consent` allows.
    """
    path = Path(path)
    kwargs = factory_kwargs or {}
    consent = Consent(consent.trust_code if consent else False, factory, consent.allow_modules if consent else ())
    if not path.exists():
        raise LoadError(f"{path} does not exist.")
    kind = _kind(path)
    if kind == "converted":
        raise LoadError(f"{path} is already a converted model; train it with dendrite-train or export it.")
    if kind == "huggingface":
        return _load_huggingface(path)
    digest = sha256(path)
    copy = {"model": MODEL_COPY + path.suffix}
    if kind == "pt2":
        return _load_pt2(path, consent), Source("pt2", str(path.resolve()), digest, bundle=copy,
                                                files={copy["model"]: path.resolve()})
    if kind == "torchscript":
        missing = ([] if consent.trust_code else ["loading it runs the file's own code (pass trust_code=True if you "
                                                  "trust it)"]) \
            + ([] if factory else ["it keeps no Python classes (pass factory= naming a function, module:fn, that "
                                   "builds the architecture; its weights will be loaded)"])
        if missing:
            raise LoadError(f"{path} is TorchScript: {' and '.join(missing)}.")
        try:
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as exc:
            raise LoadError(f"{path} is not a loadable TorchScript file ({type(exc).__name__}).") from exc
        model = build_from_factory(factory, kwargs)
        load_weights_into(model, state, path, f"--factory {factory}")
        return model, factory_source("torchscript", factory, kwargs, path=str(path.resolve()), sha256=digest)
    obj = _load_safetensors(path) if kind == "safetensors" else load_pickle(path, consent)
    if isinstance(obj, nn.Module):
        _check_unpickled(obj, path)
        if factory:
            log.warning("%s holds a whole model; --factory %s is not needed and was ignored", path, factory)
        return obj, Source("pickle", str(path.resolve()), digest, bundle=copy, files={copy["model"]: path.resolve()})
    state = unwrap_state_dict(obj, path)
    if not factory:
        raise LoadError(f"{path} is a state dict (weights only); pass factory= naming a function, module:fn, that "
                        "builds the model.")
    model = build_from_factory(factory, kwargs)
    load_weights_into(model, state, path, f"--factory {factory}")
    return model, factory_source("state_dict", factory, kwargs, path=str(path.resolve()), sha256=digest)


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


def _load_pt2(path: Path, consent: Consent) -> nn.Module:
    if not consent.trust_code:
        check_pt2(path)
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


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"{path} is not readable JSON ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(data, dict):
        raise LoadError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    return data
