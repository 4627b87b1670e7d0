"""`--help` is instant and reads naturally (issue 16, item 10).

Instant is checked deterministically: importing a command module must not import torch (the 6-7 s it took).
The wall time itself is measured by benchmarks/cli_startup.py, not asserted here.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["dendrite_convert", "dendrite_convert.cli", "dendrite_convert.cli.convert", "dendrite_convert.cli.train",
           "dendrite_convert.cli.export"]
HEAVY = ["torch", "numpy", "onnx", "onnxruntime", "scipy", "safetensors", "transformers"]


@pytest.mark.parametrize("module", MODULES)
def test_importing_a_command_does_not_import_torch(module):
    code = f"import sys, {module}; print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{module} imports {done.stdout.strip()} at import time"


def test_help_runs_without_importing_torch():
    code = ("import sys\nfrom dendrite_convert.cli import app\ntry:\n    app(['convert', '--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and "--output" in done.stdout and done.stdout.strip().endswith("False"), done


def test_public_api_is_still_importable_lazily():
    import dendrite_convert as dc
    from dendrite_convert import DendriteConfig, convert, export, load, train

    assert callable(convert) and callable(export) and callable(load) and callable(train)
    assert DendriteConfig().dendrites == 0 and set(dc.__all__) <= set(dir(dc))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dc.nope  # noqa: B018


def _help(*args) -> str:
    from dendrite_convert.cli import app

    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", [[], ["convert"], ["inspect"], ["train"], ["export"]])
def test_flags_read_naturally(command):
    text = _help(*command)
    assert "<bool>" not in text and "--no-no-" not in text
    if command == ["convert"]:
        assert "--norm-pairs" in text and "--no-norm-pairs" in text and "--no-trust-pickle" not in text
        assert "--no-strict-graph" not in text
    if command == ["export"]:  # the consent rule renamed --trust-pickle to --trust-code (the old name is hidden)
        assert "--trust-code" in text and "--no-trust-code" not in text and "--no-trust-pickle" not in text


@pytest.mark.parametrize("flag, paired", [([], True), (["--norm-pairs"], True), (["--no-norm-pairs"], False)])
def test_norm_pairs_flag_pairs_or_not(tmp_path, flag, paired):
    from dendrite_convert.cli.convert import app

    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), tmp_path / "model.pt")
    result = CliRunner().invoke(app, [str(tmp_path / "model.pt"), "-o", str(tmp_path / "out"), "--json", *flag])
    assert result.exit_code == 0, result.output
    (target,) = json.loads(result.stdout)["targets"]
    assert (target["via"] == "+ BatchNorm2d 1") is paired, target  # the BatchNorm that joins the conv in one neuron
