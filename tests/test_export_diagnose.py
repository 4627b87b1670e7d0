"""Issue 19 item 4: a failed torch.export says why in a few plain lines; an encoder-decoder exports with its caches off."""

import pytest
from typer.testing import CliRunner

import dendrite_convert as dc
from conftest import randomize_dendrites
from dendrite_convert.cli.export import app as export_app
from dendrite_convert.exporting.export import ExportConfig, export
from fixtures.probe_models import data_dependent_if


@pytest.mark.slow  # torch.onnx tries three capture strategies before it gives up: ~10 s
def test_a_data_dependent_if_is_named_with_its_source_line_and_the_fix(tmp_path):
    converted = dc.convert(data_dependent_if(), factory="fixtures.probe_models:data_dependent_if",
                           example_inputs=[{"shape": [2, 4], "dtype": "float32"}])
    converted.save(tmp_path / "converted")
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(export_app, [str(tmp_path / "converted"), "--onnx", "-o", str(out), "--no-latency",
                                             "--factory", "fixtures.probe_models:data_dependent_if"])  # named again
    assert result.exit_code == 4, result.output
    message = result.stderr.strip()
    assert "probe_models.py:" in message and "if y.mean() > 0:" in message and "torch.cond" in message
    assert "\x1b[" not in message and len(message.splitlines()) <= 3 and len(message) < 700, message
    assert "class GraphModule" not in result.output  # torch's partial graph dump stays hidden
    assert not out.exists()


@pytest.mark.slow
def test_t5_encoder_decoder_exports_with_parity(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1,
                                   num_heads=2)
    converted = dc.convert(transformers.T5ForConditionalGeneration(config).eval(), dc.DendriteConfig(dendrites=1))
    assert [s["name"] for s in converted.example_inputs] == ["input_ids", "decoder_input_ids"]
    randomize_dendrites(converted.model)
    report = export(converted, tmp_path / "t5.onnx", ExportConfig(latency=False, gemm_layout="separate", atol=1e-5))
    assert report.verify.ok and report.verify.outputs[0].max_abs < 1e-5
    assert any("use_cache=False" in n for n in report.notes)
