"""`dendrite-convert` and `dendrite inspect` from the command line: results, bad inputs, exit codes."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from dendrite_convert.cli import app
from dendrite_convert.cli.convert import app as convert_app

runner = CliRunner()
ROOT_DIR = __import__("pathlib").Path(__file__).resolve().parents[1]


def _convert(*args):
    return runner.invoke(convert_app, [str(a) for a in args])


def _one_sentence(result, code):
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_convert_writes_directory_and_json(fixture_files, tmp_path):
    out = tmp_path / "conv"
    result = _convert(fixture_files["state dict"]["path"], "-o", out, "--factory", "fixtures.models:small_cnn",
                      "--dendrites", "1", "--json", "--input-shape", "2,3,8,8")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["targets"]) == 5 and {t["dendrites"] for t in report["targets"]} == {1}
    assert "5 dendrite targets" in result.stderr and "stem" in result.stderr
    config = json.loads((out / "dendrite_config.json").read_text())
    assert config["schema_version"] == 2 and config["source"]["kind"] == "state_dict"
    assert len(config["source"]["sha256"]) == 64
    assert config["example_inputs"] == [{"shape": [2, 3, 8, 8], "dtype": "float32"}]
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"
    again = runner.invoke(app, ["inspect", str(out), "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["targets"] == report["targets"]


def test_existing_output_is_never_overwritten_without_force(fixture_files, tmp_path):
    out = tmp_path / "conv"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = [fixture_files["pickled module"]["path"], "-o", out, "--allow-module", "fixtures"]
    assert "--force" in _one_sentence(_convert(*args), 2)
    assert (out / "keep.txt").read_text() == "mine"
    assert _convert(*args, "--force").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_strict_graph_exits_4_and_writes_nothing(tmp_path):
    from fixtures.models import GatedNet

    torch.save(GatedNet().state_dict(), tmp_path / "gated.pt")
    out = tmp_path / "out"
    result = _convert(tmp_path / "gated.pt", "-o", out, "--factory", "fixtures.models:GatedNet", "--strict-graph")
    message = _one_sentence(result, 4)
    assert "gate" in message and "models.py" in message
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "gated.pt"]
    ok = _convert(tmp_path / "gated.pt", "-o", out, "--factory", "fixtures.models:GatedNet")
    assert ok.exit_code == 0 and "if x.mean() > 0:" in ok.stderr


def _bad_inputs(tmp, fixture_files):
    (tmp / "random.pt").write_bytes(bytes(range(256)) * 40)
    data = fixture_files["safetensors"]["path"].read_bytes()
    (tmp / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    module = tmp / "gone_module.py"
    module.write_text("import torch\nclass Net(torch.nn.Linear):\n    pass\n")
    subprocess.run([sys.executable, "-c", "import torch, gone_module; torch.save(gone_module.Net(2, 2), 'unknown.pt')"],
                   cwd=tmp, check=True, capture_output=True)
    module.unlink()
    state = fixture_files["state dict"]["path"]
    return {
        "missing file": ([tmp / "nope.pt"], "does not exist"),
        "random bytes": ([tmp / "random.pt"], "not a"),
        "truncated safetensors": ([tmp / "truncated.safetensors", "--factory", "fixtures.models:small_cnn"],
                                  "not a valid safetensors file"),
        "unknown class": ([tmp / "unknown.pt"], "gone_module.Net"),
        "factory not importable": ([state, "--factory", "no_such_pkg.models:build"], "cannot be imported"),
        "factory file missing": ([state, "--factory", "nowhere/model.py:build"], "does not exist"),
        "state dict without factory": ([state], "--factory"),
        "keys do not match": ([state, "--factory", "fixtures.models:mlp"],
                              "missing keys: 0.weight, 0.bias"),
        "bad factory kwargs": ([state, "--factory", "fixtures.models:small_cnn", "--factory-kwargs", "[1]"],
                               "JSON object"),
    }


def test_bad_inputs_exit_with_one_sentence_and_leave_nothing(fixture_files, tmp_path):
    for name, (args, fragment) in _bad_inputs(tmp_path, fixture_files).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        result = _convert(*args, "-o", out)
        code = 2 if name == "bad factory kwargs" else 3
        message = _one_sentence(result, code)
        assert fragment in message, (name, message)
        assert not out.exists(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary leftovers


def test_unexpected_keys_are_named(tmp_path):
    from fixtures.models import mlp

    state = mlp().state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "extra.pt")
    result = _convert(tmp_path / "extra.pt", "-o", tmp_path / "o", "--factory", "fixtures.models:mlp")
    assert "unexpected keys: extra.weight" in _one_sentence(result, 3)


def test_pickle_is_refused_without_trust_and_lists_its_globals(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (__import__("os").system, (f"touch {marker}",))

    torch.save({"weights": torch.zeros(2), "x": Payload()}, tmp_path / "evil.pt")
    message = _one_sentence(_convert(tmp_path / "evil.pt", "-o", tmp_path / "o"), 3)
    assert "posix.system" in message or "os.system" in message
    assert "--trust-code" in message
    assert not marker.exists()


@pytest.mark.parametrize("args", [["--help"], ["convert", "--help"], ["inspect", "--help"]])
def test_help(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "Usage" in result.output


def test_trust_is_never_read_from_a_converted_directory(tmp_path):
    """A model converted with --trust-code (old name --trust-pickle) needs it again to load: a config cannot grant it."""
    import dendrite_convert as dc

    module = tmp_path / "plain_helpers.py"
    module.write_text("import torch\ndef scale(x):\n    return 2 * x\nclass Net(torch.nn.Linear):\n    pass\n")
    subprocess.run([sys.executable, "-c", "import torch, plain_helpers as h; m = h.Net(3, 2); m.f = h.scale; "
                    "torch.save(m, 'net.pt')"], cwd=tmp_path, check=True, capture_output=True)
    refused = _convert(tmp_path / "net.pt", "-o", tmp_path / "a")
    assert "plain_helpers.scale" in _one_sentence(refused, 3)  # a function global, not an nn.Module class
    sys.path.insert(0, str(tmp_path))
    try:
        ok = _convert(tmp_path / "net.pt", "-o", tmp_path / "b", "--trust-pickle")
        assert ok.exit_code == 0, ok.output
        assert "plain_helpers.scale" in ok.stderr  # it said what the file imports before unpickling it
        with pytest.raises(dc.LoadError, match="plain_helpers.scale.*trust_code=True"):
            dc.load(tmp_path / "b")
        assert dc.load(tmp_path / "b", trust_code=True) is not None
        assert dc.load(tmp_path / "b", allow_modules=["plain_helpers"]) is not None  # the module named instead
        with pytest.warns(DeprecationWarning, match="trust_code"):
            assert dc.load(tmp_path / "b", trust_pickle=True) is not None
    finally:
        sys.path.remove(str(tmp_path))


def test_a_relative_factory_file_is_recorded_absolute(fixture_files, tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(ROOT_DIR)
    out = tmp_path / "conv"
    assert _convert(fixture_files["state dict"]["path"], "-o", out, "--factory", "fixtures/models.py:small_cnn").exit_code == 0
    factory = json.loads((out / "dendrite_config.json").read_text())["source"]["factory"]
    assert factory == f"{ROOT_DIR / 'fixtures' / 'models.py'}:small_cnn"
    monkeypatch.chdir(tmp_path)
    import dendrite_convert as dc

    assert dc.load(out, trust_code=True) is not None  # the stored copy of the factory file
    assert dc.load(out, factory=factory) is not None  # or the file named again, from anywhere
