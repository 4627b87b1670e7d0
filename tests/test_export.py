"""`dendrite-export` / `export()`: ONNX verified by onnxruntime, folded safetensors, bad inputs and exit codes."""

import json
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from dendrite_convert import (DendriteConfig, DendriteLayer, ExportConfig, VerificationError, convert, export,
                              load_converted, load_folded)
from dendrite_convert.cli import app
from dendrite_convert.cli.export import app as export_app
from dendrite_convert.exporting.fold import strip_dendrites
from dendrite_convert.exporting.verify import ort_session
from tests.helpers_export import (add_dendrites, cnn, conv1d_net, mlp, perturb_the_fold, tiny_bert_classifier, tiny_gpt2,
                                  unfoldable_bn)

runner = CliRunner()
EXPORT = sys.modules["dendrite_convert.exporting.export"]  # the package re-exports the function under the module's name
GEMMS = {"Gemm", "MatMul", "Conv"}
TRAINING_STATE = ("dendrite", "num_batches_tracked", "running_mean", "running_var", "candidate")

MODELS = {  # name -> factory, example input spec, fresh inputs at another batch size than the export's (2)
    "mlp": (mlp, {"shape": [2, 12], "dtype": "float32"}, lambda: (torch.randn(5, 12),)),
    "conv1d": (conv1d_net, {"shape": [2, 4, 20], "dtype": "float32"}, lambda: (torch.randn(5, 4, 20),)),
    "cnn": (cnn, {"shape": [2, 3, 16, 16], "dtype": "float32"}, lambda: (torch.randn(5, 3, 16, 16),)),
    "bert_cls": (tiny_bert_classifier, {"shape": [2, 8], "dtype": "int64", "high": 100},
                 lambda: (torch.randint(0, 100, (4, 6)),)),
    "gpt2": (tiny_gpt2, {"shape": [2, 8], "dtype": "int64", "high": 100}, lambda: (torch.randint(0, 100, (5, 11)),)),
}


def _converted(name, activation="sigmoid", **kw):
    factory, spec, _ = MODELS[name]
    converted = convert(factory(), DendriteConfig(activation=activation), factory=f"tests.helpers_export:{factory.__name__}",
                        example_inputs=[spec])
    add_dendrites(converted.model, **kw)
    return converted


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(*inputs)
    return [out] if isinstance(out, torch.Tensor) else [t for t in out.values() if isinstance(t, torch.Tensor)]


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each model with 3 sigmoid dendrites, exported once (verification at atol 1e-5 inside export)."""
    out = tmp_path_factory.mktemp("onnx")
    result = {}
    for name in MODELS:
        converted = _converted(name)
        path = out / f"{name}.onnx"
        report = export(converted, path, ExportConfig(atol=1e-5, rtol=1e-4, latency=False, gemm_layout="separate"))
        result[name] = (converted, path, report)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_onnx_matches_unfolded_at_another_batch_size(exported, name):
    converted, path, report = exported[name]
    assert report.verify.ok and report.fold_max_abs <= 1e-5
    assert report.verify.input_shapes[0][0] == 3  # export used batch 2, verification 3
    fresh = MODELS[name][2]()
    session = ort_session(path)
    got = session.run(None, {session.get_inputs()[0].name: fresh[0].numpy()})
    expected = _outputs(converted.model, fresh)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert g.shape == tuple(e.shape)
        assert np.abs(g - e.numpy()).max() <= 1e-5
    base = _outputs(strip_dendrites(converted.model), fresh)[0]
    assert (base - expected[0]).abs().max() > 1e-3  # the dendrites matter to what was verified
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not any(m in i.name for i in proto.graph.initializer for m in TRAINING_STATE)
    assert not list(path.parent.glob(f".{path.name}.dendrite-tmp-*")) and not (path.parent / f"{path.name}.data").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", [("mlp", {"activation": "identity"}), ("cnn", {"activation": "identity"}),
                                     ("cnn", {"zero_scales": True})])
def test_exact_folds_add_no_gemm_or_conv_nodes(tmp_path, name, kw):
    activation = kw.pop("activation", "sigmoid")
    converted = _converted(name, activation, **kw)
    spec = MODELS[name][1]["shape"]
    folded_path, base_path = tmp_path / "folded.onnx", tmp_path / "base.onnx"
    report = export(converted, folded_path, ExportConfig(atol=1e-5, latency=False))
    export(strip_dendrites(converted.model), base_path, ExportConfig(input_shape=spec, latency=False))
    assert report.verify.ok
    folded_ops, base_ops = _ops(folded_path), _ops(base_path)
    assert sum(folded_ops[o] for o in GEMMS) == sum(base_ops[o] for o in GEMMS) > 0
    assert folded_ops["Sigmoid"] == folded_ops["BatchNormalization"] == 0 and folded_ops["Tanh"] == base_ops["Tanh"]
    names = [i.name for i in onnx.load(str(folded_path)).graph.initializer]
    assert not any(m in n for n in names for m in TRAINING_STATE)


def test_nonlinear_dendrites_are_extra_gemms(exported):
    converted, path, _ = exported["mlp"]
    assert _ops(path)["Gemm"] + _ops(path)["MatMul"] == 3 * 4  # 3 targets x (main + 3 dendrites), separate layout


def test_forced_verification_failure_through_the_api(tmp_path):
    converted = _converted("mlp")
    folded = EXPORT.fold(converted.model).model
    with torch.no_grad():
        folded[0].main.weight.add_(0.05)
    out = tmp_path / "model.onnx"
    with pytest.raises(VerificationError, match=r"fails at \d+ of \d+ elements .*; worst element \[") as err:
        export(converted, out, ExportConfig(latency=False), folded=folded)
    assert err.value.exit_code == 5 and not err.value.report.ok
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---- CLI ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_cnn(tmp_path_factory):
    path = tmp_path_factory.mktemp("dirs") / "cnn"
    _converted("cnn").save(path)
    return path


def _one_sentence(result, code):
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith(("error", "unexpected"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.slow
def test_cli_onnx_json_and_latency_table(saved_cnn, tmp_path):
    out = tmp_path / "model.onnx"
    result = runner.invoke(export_app, ["--trust-code", str(saved_cnn), "--onnx", "-o", str(out), "--json", "--atol", "1e-5"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout is JSON only: the exporter's progress lines are silenced
    assert data["verify"]["ok"] and data["verify"]["outputs"][0]["max_abs"] <= 1e-5
    assert [r["name"] for r in data["latency"]] == ["base (no dendrites)", "unfolded dendritic", "folded torch", "onnxruntime"]
    base, unfolded, folded, ort = data["latency"]
    assert folded["flops"] == unfolded["flops"] == ort["flops"] and 3.5 < unfolded["flops"] / base["flops"] < 4.5
    assert "✓ output" in result.stderr and "onnxruntime" in result.stderr and out.is_file()
    assert any(n.startswith("--gemm-layout auto: onnxruntime separate") for n in data["notes"])  # timed, not guessed
    again = runner.invoke(app, ["export", "--trust-code", str(saved_cnn), "--onnx", "-o", str(out), "--quiet"])
    assert "--force" in _one_sentence(again, 2)


def test_cli_forced_verification_failure_exits_5_and_leaves_nothing(saved_cnn, tmp_path, monkeypatch):
    perturb_the_fold(monkeypatch)
    out = tmp_path / "model.onnx"
    result = runner.invoke(export_app, ["--trust-code", str(saved_cnn), "--onnx", "-o", str(out), "--gemm-layout", "separate"])
    line = _one_sentence(result, 5)
    assert "|a - b| <= atol + rtol·|b| fails at" in line and "beyond its bound" in line and "was not written" in line
    assert "✗ output" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_safetensors_round_trip(saved_cnn, tmp_path):
    out = tmp_path / "folded"
    result = runner.invoke(export_app, ["--trust-code", str(saved_cnn), "--safetensors", "-o", str(out), "--no-latency",
                                        "--gemm-layout", "concat"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["folded_config.json", "model.safetensors"]
    model = load_folded(out, trust_code=True)
    assert not any(isinstance(m, DendriteLayer) for m in model.modules())
    unfolded = load_converted(saved_cnn, factory="tests.helpers_export:cnn").model.eval()  # named again (consent rule)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert (model(x) - unfolded(x)).abs().max().item() <= 1e-5
    recipe = json.loads((out / "folded_config.json").read_text())
    assert recipe["kind"] == "folded" and recipe["targets"]["depthwise"]["module"]["layout"] == "concat"


def test_cli_zero_dendrites_directory(tmp_path):
    path = tmp_path / "conv"
    convert(mlp(), factory="tests.helpers_export:mlp", example_inputs=[MODELS["mlp"][1]]).save(path)
    out = tmp_path / "m.onnx"
    result = runner.invoke(export_app, ["--trust-code", str(path), "--onnx", "-o", str(out), "--no-latency", "--opset", "18"])
    assert result.exit_code == 0, result.output
    assert _ops(out)["Gemm"] + _ops(out)["MatMul"] == 3
    assert {o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")} == {18}


def test_cli_bad_inputs(saved_cnn, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert "converted-model directory" in _one_sentence(runner.invoke(export_app, ["--trust-code", str(plain), "--onnx", "-o", str(tmp_path / "a.onnx")]), 3)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in saved_cnn.iterdir():
        corrupt.joinpath(f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"\x00\x01garbage")
    assert "model.safetensors" in _one_sentence(runner.invoke(export_app, ["--trust-code", str(corrupt), "--onnx", "-o", str(tmp_path / "b.onnx")]), 3)
    assert "exactly one" in _one_sentence(runner.invoke(export_app, ["--trust-code", str(saved_cnn), "-o", str(tmp_path / "c.onnx")]), 2)
    assert "--input-shape" in _one_sentence(
        runner.invoke(export_app, ["--trust-code", str(saved_cnn), "--onnx", "-o", str(tmp_path / "d.onnx"), "--input-shape", "2,a"]), 2)
    assert "cannot run on" in _one_sentence(
        runner.invoke(export_app, ["--trust-code", str(saved_cnn), "--onnx", "-o", str(tmp_path / "e.onnx"), "--input-shape", "2,5"]), 2)
    assert sorted(tmp_path.iterdir()) == sorted([plain, corrupt])


def test_cli_unsupported_layer_exits_4(tmp_path):
    path = tmp_path / "conv"
    converted = convert(unfoldable_bn(), DendriteConfig(dendrites=1), factory="tests.helpers_export:unfoldable_bn",
                        example_inputs=[{"shape": [2, 4], "dtype": "float32"}])
    converted.save(path)
    out = tmp_path / "m.onnx"
    line = _one_sentence(runner.invoke(export_app, ["--trust-code", str(path), "--onnx", "-o", str(out)]), 4)
    assert "running statistics" in line and not out.exists()


ADAPTER = """
import torch

def val_data():
    return [(torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))]

train_data = val_data

def loss(outputs, batch):
    return outputs.sum()
"""


def test_cli_example_from_adapter(saved_cnn, tmp_path):
    adapter = tmp_path / "adapter.py"
    adapter.write_text(ADAPTER)
    out = tmp_path / "m.onnx"
    result = runner.invoke(export_app, ["--trust-code", str(saved_cnn), "--onnx", "-o", str(out), "--adapter", str(adapter),
                                        "--gemm-layout", "separate", "--no-latency", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verify"]["ok"] and data["verify"]["input_shapes"] == [[4, 3, 16, 16]]  # exported at batch 2


def test_given_example_tensors_replace_the_recorded_example(tmp_path):
    """export(inputs=): ready tensors (e.g. an adapter's batch); the first two rows export, all of them verify."""
    converted = _converted("mlp")
    batch = torch.randn(4, 12)
    report = export(converted, tmp_path / "m.onnx", ExportConfig(gemm_layout="separate", latency=False),
                    inputs=(batch,))
    assert report.verify.ok and report.verify.input_shapes == [[4, 12]]
    with pytest.raises(ValueError, match="^inputs must be tensors with a batch axis") as err:
        export(converted, tmp_path / "n.onnx", ExportConfig(latency=False), inputs=(batch[0, 0],))
    assert err.value.parameter == "inputs" and not (tmp_path / "n.onnx").exists()


def test_cli_prune_below_reports_the_output_change(tmp_path):
    converted = _converted("mlp")
    with torch.no_grad():
        for layer in converted.model.modules():
            if isinstance(layer, DendriteLayer):
                layer.dendrite_scales[2].mul_(1e-5 / layer.dendrite_scales[2].abs().max())
                layer.dendrite_cascade[2].zero_()
    path = tmp_path / "conv"
    converted.save(path)
    out = tmp_path / "m.onnx"
    result = runner.invoke(export_app, ["--trust-code", str(path), "--onnx", "-o", str(out), "--prune-below", "1e-4", "--no-latency",
                                        "--gemm-layout", "separate", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert all(f["kept"] == 2 and len(f["pruned"]) == 1 for f in data["folds"])
    assert 0 < data["fold_max_abs"] < 1e-4 and "max output change" in result.stderr
    assert _ops(out)["Gemm"] + _ops(out)["MatMul"] == 3 * 3
