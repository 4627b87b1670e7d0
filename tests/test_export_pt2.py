"""`dendrite-export --pt2`: a torch.export program of the folded model, verified like ONNX, loadable by torch alone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dendrite_convert import ConversionError, ExportConfig, VerificationError, export
from dendrite_convert.cli.convert import app as convert_app
from dendrite_convert.cli.export import app as export_app
from dendrite_convert.conversion.consent import check_pt2
from dendrite_convert.exporting.fold import strip_dendrites
from tests.helpers_export import perturb_the_fold
from tests.test_export import _converted

runner = CliRunner()
SITE_PACKAGES = Path(torch.__file__).resolve().parents[1]

# Run in a bare interpreter: no site processing (so no editable install of this package), no PYTHONPATH, an empty
# working directory; only the directory holding torch is on sys.path. Loads the program, runs it, saves the outputs.
LOADER = """
import importlib.util, sys
sys.path.append(sys.argv[1])
assert importlib.util.find_spec("dendrite_convert") is None, "dendrite_convert is importable here"
import torch
program = torch.export.load(sys.argv[2])
x = torch.load(sys.argv[3], weights_only=True)
out = program.module()(**x) if isinstance(x, dict) else program.module()(*x)
torch.save(out, sys.argv[4])
print(sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("dendrite_convert", "tests", "transformers")))
"""


def _load_elsewhere(program: Path, inputs, tmp_path: Path):
    """The program's outputs on `inputs`, computed in a fresh process that cannot import our code."""
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    torch.save(inputs, empty / "x.pt")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(empty)}
    done = subprocess.run([sys.executable, "-S", "-c", LOADER, str(SITE_PACKAGES), str(program), str(empty / "x.pt"),
                           str(empty / "y.pt")], cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # neither our package, our tests nor the model's library was imported
    return torch.load(empty / "y.pt", weights_only=True)


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dirs") / "cnn"
    _converted("cnn").save(path)
    return path


def test_cli_pt2_is_verified_and_loads_with_torch_alone(cnn_dir, tmp_path):
    out = tmp_path / "model.pt2"
    result = runner.invoke(export_app, ["--trust-code", str(cnn_dir), "--pt2", "-o", str(out), "--json", "--atol", "1e-5",
                                        "--no-latency"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"] == "pt2" and data["verify"]["ok"] and data["verify"]["input_shapes"] == [[3, 3, 16, 16]]
    assert "✓ output" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]  # no temporary left beside it
    check_pt2(out)  # what dendrite-convert asks of an untrusted .pt2: no pickles, only arithmetic in shapes
    unfolded = _converted_model(cnn_dir)
    x = (torch.randn(7, 3, 16, 16),)  # yet another batch size: the batch axis is dynamic
    got = _load_elsewhere(out, x, tmp_path)
    with torch.no_grad():
        expected = unfolded(*x)
        base = strip_dendrites(unfolded)(*x)
    assert got.shape == expected.shape and (got - expected).abs().max().item() <= 1e-5
    assert (base - expected).abs().max().item() > 1e-3  # the dendrites matter to what was compared


def _converted_model(path):
    from dendrite_convert import load_converted

    return load_converted(path, trust_code=True).model.eval()


def test_our_pt2_converts_without_trust_code(cnn_dir, tmp_path):
    out = tmp_path / "model.pt2"
    export(cnn_dir, out, ExportConfig(format="pt2", latency=False, trust_code=True, gemm_layout="concat"))
    result = runner.invoke(convert_app, [str(out), "-o", str(tmp_path / "again"), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["targets"]  # the folded program's layers are dendrite targets again


def test_pt2_verification_failure_exits_5_and_leaves_nothing(cnn_dir, tmp_path, monkeypatch):
    perturb_the_fold(monkeypatch)
    out = tmp_path / "model.pt2"
    result = runner.invoke(export_app, ["--trust-code", str(cnn_dir), "--pt2", "-o", str(out), "--gemm-layout", "separate"])
    assert result.exit_code == 5, result.output
    assert "|a - b| <= atol + rtol·|b| fails at" in result.stderr and "was not written" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_pt2_needs_one_format_and_an_example(cnn_dir, tmp_path):
    both = runner.invoke(export_app, ["--trust-code", str(cnn_dir), "--pt2", "--onnx", "-o", str(tmp_path / "m.pt2")])
    assert both.exit_code == 2 and "exactly one of --onnx, --safetensors and --pt2" in both.stderr
    with pytest.raises(ValueError, match="no example input"):
        export(strip_dendrites(_converted("mlp").model), tmp_path / "m.pt2", ExportConfig(format="pt2"))
    assert list(tmp_path.iterdir()) == []


def test_pt2_of_a_model_torch_export_cannot_capture_is_a_conversion_error(tmp_path):
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return y if y.sum() > 0 else -y  # a branch on data

    with pytest.raises(ConversionError, match="cannot be exported with torch.export"):
        export(DataDependent(), tmp_path / "m.pt2", ExportConfig(format="pt2", input_shape=[2, 4], latency=False))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_pt2_of_a_transformer_returns_named_tensors_and_needs_no_transformers(tmp_path):
    converted = _converted("bert_cls")
    out = tmp_path / "bert.pt2"
    report = export(converted, out, ExportConfig(format="pt2", atol=1e-5, latency=False))
    assert report.verify.ok and any("dict of tensors (logits)" in n for n in report.notes)
    x = (torch.randint(0, 100, (4, 9)),)  # batch and sequence both differ from the export's
    got = _load_elsewhere(out, x, tmp_path)
    with torch.no_grad():
        expected = converted.model.eval()(*x).logits
    assert list(got) == ["logits"] and (got["logits"] - expected).abs().max().item() <= 1e-5


def test_verification_runs_the_saved_program_not_the_folded_module(cnn_dir, tmp_path, monkeypatch):
    """A program that loads but computes something else is caught: the file itself is what is verified."""
    real_save = torch.export.save

    def save_other(program, f, *args, **kwargs):
        state = program.state_dict
        key = next(k for k in state if k.endswith("head.main.bias"))
        state[key] = torch.nn.Parameter(state[key].detach() + 0.01, requires_grad=False)  # the folded model keeps its own
        return real_save(program, f, *args, **kwargs)

    monkeypatch.setattr(torch.export, "save", save_other)
    with pytest.raises(VerificationError) as err:
        export(cnn_dir, tmp_path / "m.pt2", ExportConfig(format="pt2", latency=False, trust_code=True,
                                                        gemm_layout="separate"))
    assert err.value.exit_code == 5 and not err.value.report.ok
    assert list(tmp_path.iterdir()) == []
