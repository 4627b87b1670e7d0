"""What dendrite-train and dendrite-export say on screen (issue 16, items 9 and 12): an 80-column progress bar
that keeps its count and time, a Ctrl-C message that names `--resume`, and counts in plain English."""

import json
import textwrap

import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

from dendrite_convert import DendriteConfig, convert
from dendrite_convert.cli._training import progress_bar
from dendrite_convert.cli.train import app
from dendrite_convert.core.words import plural

runner = CliRunner()

ADAPTER = """
import pathlib
import torch
from torch.utils.data import DataLoader, TensorDataset
g = torch.Generator().manual_seed(0)
X = torch.randn(64, 4, generator=g)
Y = (X[:, 0] > 0).long()
INTERRUPT_AT = pathlib.Path(__file__).with_name("interrupt_at")  # Ctrl-C at this training step, once
steps = 0
def train_data(): return DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)
def val_data(): return DataLoader(TensorDataset(X[:32], Y[:32]), batch_size=32)
def loss(outputs, batch):
    global steps
    steps += outputs.requires_grad
    if INTERRUPT_AT.exists() and steps == int(INTERRUPT_AT.read_text()):
        INTERRUPT_AT.unlink()
        raise KeyboardInterrupt
    return torch.nn.functional.cross_entropy(outputs, batch[1])
"""


@pytest.fixture
def run_setup(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    torch.save(model, tmp_path / "model.pt")  # torch classes only: loading its directories runs no code of ours
    convert(tmp_path / "model.pt", DendriteConfig()).save(tmp_path / "converted")
    (tmp_path / "adapter.py").write_text(textwrap.dedent(ADAPTER))
    return tmp_path


def _factory(tmp) -> list[str]:
    """The consent rule: the directory's factory (the test's own net.py) runs when it is named again."""
    return ["--factory", f"{tmp / 'net.py'}:build"]


def test_progress_bar_keeps_count_and_time_in_80_columns():
    console = Console(width=80, record=True, force_terminal=True, color_system=None)
    bar = progress_bar(console)
    bar.add_task("neuron: 2 dendrites loss 0.01234 val 93.33 test 92.44 (a long description)", total=100,
                 completed=85)
    console.print(bar.get_renderable())
    (line,) = console.export_text().strip().splitlines()
    assert len(line) <= 80 and "85/100" in line and "0:00:00" in line, line  # were cut to "8..." and "0:..."
    assert line.startswith("neuron: 2 dendrites loss") and "…" in line  # the description gives way instead


def test_ctrl_c_says_how_to_resume_and_resume_finishes(run_setup):
    tmp = run_setup
    (tmp / "interrupt_at").write_text("6")  # 4 steps per epoch: interrupted in epoch 2
    args = ["--adapter", str(tmp / "adapter.py"), "--max-epochs", "3", *_factory(tmp)]
    result = runner.invoke(app, [str(tmp / "converted"), "-o", str(tmp / "run"), *args])
    assert result.exit_code == 130, result.output
    assert f"continue from the last completed epoch: dendrite-train --resume {tmp / 'run'}" in result.stderr
    resumed = runner.invoke(app, ["--resume", str(tmp / "run"), *args, "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["epochs"] == 3


def test_ctrl_c_in_the_first_epoch_says_there_is_nothing_to_resume(run_setup):
    tmp = run_setup
    (tmp / "interrupt_at").write_text("2")
    result = runner.invoke(app, [str(tmp / "converted"), "-o", str(tmp / "run"), "--adapter",
                                 str(tmp / "adapter.py"), *_factory(tmp)])
    assert result.exit_code == 130, result.output
    assert "no epoch had finished, so there is nothing to resume" in result.stderr and "--resume" not in result.stderr


def test_counts_read_as_english(run_setup):
    assert [plural(n, "dendrite") for n in (0, 1, 2)] == ["0 dendrites", "1 dendrite", "2 dendrites"]
    tmp = run_setup
    result = runner.invoke(app, [str(tmp / "converted"), "-o", str(tmp / "run"), "--adapter", str(tmp / "adapter.py"),
                                 "--capacity-test", *_factory(tmp)])
    assert result.exit_code == 0, result.output
    assert "neuron: 1 dendrite loss" in result.stderr and "1 dendrites" not in result.stderr
    assert "dendrite(s)" not in result.stderr and "with 3 dendrites per target" in result.stderr


def test_a_correlation_phase_reports_progress_per_target_without_a_terminal(run_setup):
    """Item 9: a long phase inside an epoch prints its own lines (stderr is not a terminal here), none with -q."""
    tmp = run_setup
    args = [str(tmp / "converted"), "--adapter", str(tmp / "adapter.py"), "--objective", "correlation",
            "--switch-every", "1", "--max-dendrites", "1", "--max-epochs", "3"]
    result = runner.invoke(app, [*args, "-o", str(tmp / "run")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("correlation phase:")]
    assert lines[0].startswith("correlation phase: error signals of 2 targets recorded")
    assert [line.split(" has ")[0] for line in lines[1:]] == ["correlation phase: target 1/2 0",
                                                             "correlation phase: target 2/2 2"]
    quiet = runner.invoke(app, [*args, "-o", str(tmp / "quiet"), "-q"])
    assert quiet.exit_code == 0 and "correlation phase" not in quiet.stderr
