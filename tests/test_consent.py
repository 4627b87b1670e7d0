"""Consent for code (docs/design.md §9): every way a file or directory could make the tool run code is refused without
the flag (exit 3, one sentence naming it, the attack's marker file never created) and runs with it."""

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Tuple

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import dendrite_convert as dc
from dendrite_convert.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
ADAPTER = """
import torch
from torch.utils.data import DataLoader, TensorDataset
X = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()
def train_data(): return DataLoader(TensorDataset(X, Y), batch_size=16)
def val_data(): return DataLoader(TensorDataset(X, Y), batch_size=32)
def loss(outputs, batch): return torch.nn.functional.cross_entropy(outputs, batch[1])
"""
ARCH = "import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))\n"


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _refused(result, marker: Path, *wanted: str) -> str:
    """Exit 3, one sentence that names the flag and what the file wanted; the attack did not run."""
    assert result.exit_code == 3, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--trust-code" in lines[0], result.stderr
    for fragment in wanted:
        assert fragment in lines[0], lines[0]
    assert not marker.exists()
    return lines[0]


def _touch_code(marker: Path) -> str:
    return f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n"


# ---- pickles ----------------------------------------------------------------------------------------------------

def test_a_module_next_to_the_pickle_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    (tmp_path / "helper.py").write_text(_touch_code(marker) + "import torch\nclass Net(torch.nn.Linear):\n    pass\n")
    subprocess.run([sys.executable, "-c", "import torch, helper; torch.save(helper.Net(3, 2), 'model.pt')"],
                   cwd=tmp_path, check=True)
    marker.unlink()
    monkeypatch.chdir(tmp_path)  # the pickle's folder is the working directory too
    _refused(_cli("convert", "model.pt", "-o", "out"), marker, "helper.Net", "--allow-module helper")
    assert "helper" not in sys.modules and not (tmp_path / "out").exists()
    try:
        ok = _cli("convert", "model.pt", "-o", "out", "--trust-code")
        assert ok.exit_code == 0, ok.output
        assert marker.exists()  # trusted: the file's module ran
    finally:
        sys.modules.pop("helper", None)


class _Global:
    """Pickled by _GlobalPickler as a bare reference to any module's global, as a crafted file would hold."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class _GlobalPickler(pickle._Pickler):
    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)


def _save_with_global(path: Path, module: str, name: str) -> None:
    pickler = types.ModuleType("global_pickler")
    pickler.Pickler = _GlobalPickler
    torch.save({"w": torch.zeros(2), "x": _Global(module, name)}, path, pickle_module=pickler)


@pytest.mark.parametrize("module, name", [("this", "s"), ("unittest.__main__", "main")])
def test_a_global_of_an_installed_module_is_never_imported(tmp_path, monkeypatch, module, name):
    monkeypatch.setattr(sys, "argv", ["unittest", "--no-such-option"])  # if unittest.__main__ ran, it would exit
    _save_with_global(tmp_path / "model.pt", module, name)
    assert module not in sys.modules
    _refused(_cli("convert", tmp_path / "model.pt", "-o", tmp_path / "out"), tmp_path / "none", f"{module}.{name}")
    assert module not in sys.modules
    # named by the user, the module is imported; its SystemExit is a refusal, never the end of the caller
    allowed = _cli("convert", tmp_path / "model.pt", "-o", tmp_path / "out", "--allow-module", module.split(".")[0])
    assert allowed.exit_code == 3, allowed.output
    trusted = _cli("convert", tmp_path / "model.pt", "-o", tmp_path / "out", "--trust-code")
    assert trusted.exit_code == 3 and "Traceback" not in trusted.output  # imported, then not a model
    if module == "this":
        assert "this" in sys.modules  # with the flag the import did happen
        sys.modules.pop("this")
    else:
        assert "SystemExit" in trusted.stderr


@pytest.mark.skipif(importlib.util.find_spec("torch_geometric") is None, reason="torch_geometric not installed")
def test_a_crafted_setstate_of_an_installed_module_class_never_runs(tmp_path):
    marker = tmp_path / "marker"
    injected = f"typing import *\n{_touch_code(marker)}from typing"  # becomes code in a generated module
    subprocess.run([sys.executable, "-c", (
        "import torch\nfrom torch_geometric.nn import Sequential\n"
        "seq = Sequential('x', [(torch.nn.Linear(2, 2), 'x -> x')])\n"
        f"seq._caller_module = {injected!r}\ntorch.save(seq, {str(tmp_path / 'model.pt')!r})\n")], check=True)
    assert not marker.exists()
    imported_before = "torch_geometric" in sys.modules
    _refused(_cli("convert", tmp_path / "model.pt", "-o", tmp_path / "out"), marker,
             "torch_geometric.nn.sequential.Sequential")
    assert imported_before or "torch_geometric" not in sys.modules
    _cli("convert", tmp_path / "model.pt", "-o", tmp_path / "out", "--trust-code")
    assert marker.exists()


# ---- .pt2 and TorchScript -------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _rewrite_zip(path: Path, edit) -> None:
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, edit(name, data))


def _payload_bytes(marker: Path) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    return buffer.getvalue()


def _pickled_weight(marker):
    def edit(name, data):
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        return _payload_bytes(marker) if name.endswith("weights/weight_0") else data
    return edit


def _pickled_sample_inputs(marker):
    return lambda name, data: _payload_bytes(marker) if "sample_inputs/" in name else data


def _sympy_expression(marker):
    def edit(name, data):
        if not name.endswith("models/model.json"):
            return data
        text = data.decode()
        symbol = "Symbol('"
        start = text.index(symbol)
        return (text[:start] + f"__import__('pathlib').Path('{marker}').touch() or " + text[start:]).encode()
    return edit


@pytest.mark.parametrize("attack", [_pickled_weight, _pickled_sample_inputs, _sympy_expression])
def test_a_pt2_that_would_run_code_is_refused(tmp_path, attack):
    marker = tmp_path / "marker"
    model = nn.Sequential(nn.Linear(3, 2))
    program = torch.export.export(model, (torch.randn(2, 3),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, tmp_path / "model.pt2")
    assert dc.convert(tmp_path / "model.pt2").report.targets  # the untouched program needs no flag
    _rewrite_zip(tmp_path / "model.pt2", attack(marker))
    _refused(_cli("convert", tmp_path / "model.pt2", "-o", tmp_path / "out"), marker, "model.pt2")
    _cli("convert", tmp_path / "model.pt2", "-o", tmp_path / "out", "--trust-code")
    assert marker.exists()


class _ScriptedWithSetstate(nn.Module):
    """TorchScript whose __setstate__, run by torch.jit.load, creates a file."""

    def __init__(self, marker: str):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 2))
        self.marker = marker

    def forward(self, x):
        return x @ self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool, torch.Tensor]:
        return self.marker, self.training, self.weight

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool, torch.Tensor]) -> None:
        self.marker = state[0]
        self.training = state[1]
        self.weight = state[2] + torch.from_file(state[0], shared=True, size=1).sum() * 0


def test_torchscript_needs_the_flag(tmp_path):
    marker = tmp_path / "marker"
    torch.jit.save(torch.jit.script(_ScriptedWithSetstate(str(marker))), tmp_path / "scripted.pt")
    (tmp_path / "arch.py").write_text("import torch\ndef build():\n    return torch.nn.Linear(2, 2, bias=False)\n")
    factory = f"{tmp_path / 'arch.py'}:build"
    _refused(_cli("convert", tmp_path / "scripted.pt", "-o", tmp_path / "out", "--factory", factory), marker,
             "TorchScript")
    ok = _cli("convert", tmp_path / "scripted.pt", "-o", tmp_path / "out", "--factory", factory, "--trust-code")
    assert ok.exit_code == 0, ok.output
    assert marker.exists()


# ---- directories ------------------------------------------------------------------------------------------------------

@pytest.fixture
def converted(tmp_path):
    """A directory converted from a state dict and src/arch.py:build, with a folded export of it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "arch.py").write_text(ARCH)
    spec = importlib.util.spec_from_file_location("arch_for_consent", src / "arch.py")
    arch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arch)
    torch.save(arch.build().state_dict(), src / "model.pt")
    factory = f"{src / 'arch.py'}:build"
    result = _cli("convert", src / "model.pt", "--factory", factory, "-o", tmp_path / "conv", "--input-shape", "2,4")
    assert result.exit_code == 0, result.output
    folded = _cli("export", tmp_path / "conv", "--safetensors", "-o", tmp_path / "folded", "--factory", factory,
                  "--no-latency")
    assert folded.exit_code == 0, folded.output
    return tmp_path / "conv", tmp_path / "folded", factory


def _tamper(config: Path, spec: str, **fields) -> None:
    data = json.loads(config.read_text())
    data["source"].update({"factory": spec, "factory_kwargs": {}, "factory_sha256": None, "bundle": {}, **fields})
    config.write_text(json.dumps(data))


def _evil_factories(tmp_path: Path, marker: Path) -> dict[str, tuple[str, dict]]:
    (tmp_path / "evil.py").write_text(_touch_code(marker) + ARCH)
    (tmp_path / "work").mkdir()
    return {"os:system": ("os:system", {"factory_kwargs": {"command": f"touch {marker}"}}),
            "absolute .py": (f"{tmp_path / 'evil.py'}:build", {}),
            "escaping relative .py": ("../evil.py:build", {})}


@pytest.mark.parametrize("kind", ["os:system", "absolute .py", "escaping relative .py"])
def test_a_tampered_directory_factory_never_runs(converted, tmp_path, monkeypatch, kind):
    conv, folded, _ = converted
    marker = tmp_path / "marker"
    spec, fields = _evil_factories(tmp_path, marker)[kind]
    monkeypatch.chdir(tmp_path / "work")  # where ../evil.py points
    _tamper(conv / "dendrite_config.json", spec, **fields)
    _tamper(folded / "folded_config.json", spec, **fields)
    (tmp_path / "adapter.py").write_text(ADAPTER)
    _refused(_cli("export", conv, "--onnx", "-o", tmp_path / "m.onnx"), marker, spec)
    _refused(_cli("train", conv, "--adapter", tmp_path / "adapter.py", "-o", tmp_path / "run"), marker, spec)
    for load in (dc.load, dc.load_converted, dc.load_folded):
        with pytest.raises(dc.LoadError, match="trust_code=True"):
            load(folded if load is dc.load_folded else conv)
    assert not marker.exists()
    try:
        dc.load_folded(folded, trust_code=True)
    except dc.LoadError:  # os.system returns an int, not a model
        assert kind == "os:system"
    assert marker.exists()  # with the flag the recorded code did run


def test_stored_copies_are_checked_and_escaping_names_refused(converted, tmp_path):
    conv, folded, factory = converted
    marker = tmp_path / "marker"
    copy = conv / "source_factory.py"
    copy.write_text(_touch_code(marker) + copy.read_text())
    with pytest.raises(dc.LoadError) as err:
        dc.load(conv, trust_code=True)
    recorded = json.loads((conv / "dendrite_config.json").read_text())["source"]["factory_sha256"]
    assert recorded in str(err.value) and dc.conversion.loading.sha256(copy) in str(err.value)
    assert dc.load(conv, factory=factory) is not None and not marker.exists()  # the user's own file ran
    changed = tmp_path / "changed.py"
    changed.write_text(ARCH + "# edited\n")
    with pytest.raises(dc.LoadError, match=recorded):
        dc.load_folded(folded, factory=f"{changed}:build")
    data = json.loads((folded / "folded_config.json").read_text())
    data["source"]["bundle"] = {"factory": "../evil.py"}
    (folded / "folded_config.json").write_text(json.dumps(data))
    with pytest.raises(dc.LoadError, match="malformed"):
        dc.load_folded(folded, trust_code=True)
    assert not marker.exists()


def test_resume_runs_the_recorded_adapter_only_when_named_or_trusted(tmp_path):
    marker = tmp_path / "marker"
    torch.save(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), tmp_path / "whole.pt")
    assert _cli("convert", tmp_path / "whole.pt", "-o", tmp_path / "conv").exit_code == 0  # torch only: no flag
    (tmp_path / "adapter.py").write_text(ADAPTER)
    run = tmp_path / "run"
    first = _cli("train", tmp_path / "conv", "--adapter", tmp_path / "adapter.py", "-o", run, "--max-epochs", "2",
                 "--quiet")
    assert first.exit_code == 0, first.output
    (tmp_path / "evil_adapter.py").write_text(_touch_code(marker) + ADAPTER)
    state = run / "checkpoint" / "state.json"
    data = json.loads(state.read_text())
    data["adapter"] = str(tmp_path / "evil_adapter.py")
    state.write_text(json.dumps(data))
    _refused(_cli("train", "--resume", run), marker, "evil_adapter.py", "--adapter")
    named = _cli("train", "--resume", run, "--adapter", tmp_path / "adapter.py", "--quiet")
    assert named.exit_code == 0 and not marker.exists(), named.output
    trusted = _cli("train", "--resume", run, "--trust-code", "--quiet")
    assert trusted.exit_code == 0 and marker.exists(), trusted.output


def test_a_directory_of_a_torch_only_pickle_or_a_transformers_config_needs_no_flag(fixture_files, tmp_path):
    torch.save(nn.Sequential(nn.Linear(4, 2)), tmp_path / "whole.pt")
    dc.convert(tmp_path / "whole.pt").save(tmp_path / "a")
    dc.convert(fixture_files["Hugging Face directory"]["path"]).save(tmp_path / "b")
    assert dc.load(tmp_path / "a") is not None and dc.load(tmp_path / "b") is not None
    data = json.loads((tmp_path / "b" / "dendrite_config.json").read_text())
    data["source"]["hf_class"] = "pipeline"  # a transformers function, not a model class
    (tmp_path / "b" / "dendrite_config.json").write_text(json.dumps(data))
    with pytest.raises(dc.LoadError, match="not a transformers model class"):
        dc.load(tmp_path / "b")


def test_inspect_says_what_code_loading_runs(converted):
    conv, _, _ = converted
    result = _cli("inspect", conv)
    assert result.exit_code == 0 and "runs the factory" in result.stderr and "--trust-code" in result.stderr


def test_a_module_factory_named_like_a_file_here_gets_a_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cnn_for_hint.py").write_text(ARCH)
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    result = _cli("convert", "w.pt", "-o", "out", "--factory", "cnn_for_hint:build")
    assert result.exit_code == 3 and "--factory cnn_for_hint.py:build" in result.stderr, result.output


# ---- portability -------------------------------------------------------------------------------------------------------

PORTABLE_CHECK = """
import sys, torch, dendrite_convert as dc
x, expected = torch.load('expected.pt')
for name, load in [('conv', dc.load), ('best', dc.load), ('folded', dc.load_folded)]:
    try:
        load(name)
        raise SystemExit(f'{name} loaded without consent')
    except dc.LoadError as exc:
        assert 'trust_code=True' in str(exc), exc
    for consent in ({'trust_code': True}, {'factory': 'arch_copy.py:build'}):
        with torch.no_grad():
            out = load(name, **consent).eval()(x)
        assert torch.equal(out, expected[name]), (name, consent)
with torch.no_grad():
    assert torch.equal(dc.load('pickled').eval()(x), expected['pickled'])  # torch classes only: no flag
print('ok')
"""


def test_directories_travel_without_the_original_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "arch.py").write_text(ARCH)
    (tmp_path / "adapter.py").write_text(ADAPTER)
    torch.save(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), src / "whole.pt")
    torch.manual_seed(1)
    exec(ARCH, namespace := {})
    torch.save(namespace["build"]().state_dict(), src / "model.pt")
    factory = f"{src / 'arch.py'}:build"
    steps = [
        ("convert", src / "model.pt", "--factory", factory, "-o", tmp_path / "conv", "--input-shape", "2,4"),
        ("convert", src / "whole.pt", "-o", tmp_path / "pickled"),
        ("train", tmp_path / "conv", "--adapter", tmp_path / "adapter.py", "-o", tmp_path / "run", "--max-epochs", "2",
         "--switch-every", "1", "--factory", factory, "--quiet"),
        ("export", tmp_path / "run" / "best", "--safetensors", "-o", tmp_path / "folded", "--factory", factory,
         "--no-latency"),
    ]
    for step in steps:
        result = _cli(*step)
        assert result.exit_code == 0, (step, result.output)
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = {"conv": dc.load(tmp_path / "conv", factory=factory)(x),
                    "best": dc.load(tmp_path / "run" / "best", factory=factory)(x),
                    "folded": dc.load_folded(tmp_path / "folded", factory=factory)(x),
                    "pickled": dc.load(tmp_path / "pickled")(x)}
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name, path in [("conv", tmp_path / "conv"), ("best", tmp_path / "run" / "best"),
                       ("folded", tmp_path / "folded"), ("pickled", tmp_path / "pickled")]:
        shutil.move(path, moved / name)
    shutil.copy(src / "arch.py", moved / "arch_copy.py")  # the user's own copy of the factory, named again
    shutil.rmtree(src)  # the original model files and factory are gone
    torch.save((x, expected), moved / "expected.pt")
    result = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], cwd=moved, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
