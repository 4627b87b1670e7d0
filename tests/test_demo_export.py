"""The demo's export, as a newcomer runs it: what the verification line claims, and sane logits (issue 16, item 6)."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

import dendrite_convert as dc
from dendrite_convert.cli.export import app
from dendrite_convert.exporting.verify import ort_session

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples/digits"


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_standardisation_keeps_validation_pixels_in_range():
    """A pixel that is always 0 in training must not be divided by ~1e-6 when it lights up in validation."""
    adapter = _module(DEMO / "adapter.py", "digits_adapter_range")
    for split in (adapter.val_data(), adapter.test_data()):
        assert float(split.dataset.tensors[0].abs().max()) < 20  # was 1e6 with std + 1e-6


def test_demo_export_prints_the_criterion_and_its_worst_element(tmp_path):
    torch.manual_seed(0)
    model = _module(DEMO / "model.py", "digits_model_export").build()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    dc.convert(tmp_path / "model.pt", dc.DendriteConfig(dendrites=1), factory=f"{DEMO / 'model.py'}:build").save(
        tmp_path / "converted")
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(app, [str(tmp_path / "converted"), "--onnx", "-o", str(out), "--adapter",
                                      str(DEMO / "adapter.py"), "--no-latency", "--gemm-layout", "separate",
                                      "--factory", f"{DEMO / 'model.py'}:build"])  # named again: the consent rule
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stderr.splitlines() if line.startswith("✓"))
    assert "|a - b| <= atol + rtol·|b| holds everywhere" in line and "atol 0.0001, rtol 0.0001" in line
    worst = re.search(r"worst element \[(\d+), (\d+)\]: a = (\S+), b = (\S+), \|a - b\| = (\S+?),? ", line)
    assert worst, line
    a, b, diff = (float(worst.group(i)) for i in (3, 4, 5))
    assert abs(a - b) <= 1e-4 + 1e-4 * abs(b) and abs(diff - abs(a - b)) <= 1e-6 * max(1.0, abs(b))
    adapter = _module(DEMO / "adapter.py", "digits_adapter_export")
    x = adapter.val_data().dataset.tensors[0].numpy()
    logits = ort_session(out).run(None, {ort_session(out).get_inputs()[0].name: x})[0]
    assert np.isfinite(logits).all() and np.abs(logits).max() < 50  # reached 1.5e5 with the old standardisation
