"""dendrite-train's CLI surface: progress lines, --quiet, --json, the umbrella `dendrite train`, resume in place."""

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dendrite_convert import convert
from dendrite_convert.cli import app as umbrella
from dendrite_convert.cli.train import app

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
runner = CliRunner()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    sys.path.insert(0, str(DIGITS))
    from model import build

    path = tmp_path_factory.mktemp("cli") / "converted"
    torch.save(build(8), path.parent / "digits.pt")  # torch classes only: its directories load without a trust flag
    convert(path.parent / "digits.pt").save(path)
    return path


def test_one_line_per_epoch_when_not_a_terminal_and_json_on_stdout(converted, tmp_path):
    args = [str(converted), "--adapter", str(DIGITS / "adapter.py"), "-o", str(tmp_path / "run"), "--max-epochs", "4",
            "--switch-every", "2", "--objective", "correlation", "--candidates", "2", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1 neuron", "epoch 2 neuron", "epoch 3 dendrite",
                                                       "epoch 4 neuron"]
    assert "done: reached --max-epochs 4" in result.stderr
    summary = json.loads(result.stdout)
    assert summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["objective"] == "correlation" and summary["epochs"] == 4


def test_quiet_prints_nothing_and_umbrella_command_and_resume_of_a_finished_run(converted, tmp_path):
    out = tmp_path / "run"
    args = ["train", str(converted), "--adapter", str(DIGITS / "adapter.py"), "-o", str(out), "--max-epochs", "2",
            "--quiet"]
    result = runner.invoke(umbrella, args)
    assert result.exit_code == 0 and result.stderr == "" and result.stdout == ""
    before = json.loads((out / "summary.json").read_text())
    result = runner.invoke(app, ["--resume", str(out), "-o", str(out), "--json", "--quiet", "--adapter",
                                 str(DIGITS / "adapter.py")])
    assert result.exit_code == 0, result.output
    after = json.loads(result.stdout)
    assert after.pop("already_finished") is True
    measured = ("wall_seconds", "peak_mem_mb")  # measured, not computed
    assert {k: v for k, v in after.items() if k not in measured} == {k: v for k, v in before.items() if k not in measured}
    result = runner.invoke(app, ["--resume", str(out), "-o", str(tmp_path / "elsewhere")])
    assert result.exit_code == 2 and "leave out -o/--output" in result.output
    result = runner.invoke(app, [str(converted), "--resume", str(out)])
    assert result.exit_code == 2 and "leave out CONVERTED" in result.output
