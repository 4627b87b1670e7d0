"""Review fixes of issue 14: ReduceLROnPlateau's direction, the resume state version, a BatchNorm batch of one,
and outputs that cannot be written (`-o /`, a read-only folder), each one sentence with its exit code."""

import csv
import json
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dendrite_convert import DendriteConfig, TrainConfig, convert, train
from dendrite_convert.cli import app

runner = CliRunner()
DATA = """
import torch
from torch.utils.data import DataLoader, TensorDataset
g = torch.Generator().manual_seed(0)
X = torch.randn(64, 4, generator=g)
Y = (X[:, 0] + X[:, 1] > 0).long()
def train_data(): return DataLoader(TensorDataset(X, Y), batch_size=BATCH, drop_last=False)
def val_data(): return DataLoader(TensorDataset(X, Y), batch_size=64)
def loss(outputs, batch): return torch.nn.functional.cross_entropy(outputs, batch[1])
"""


@pytest.fixture
def converted_dir(tmp_path):
    """A tiny classifier with a BatchNorm, converted and saved (a torch-only pickle: loading runs no code of ours)."""
    (tmp_path / "net.py").write_text("from torch import nn\ndef build():\n    return nn.Sequential(nn.Linear(4, 6), "
                                     "nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))\n")
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save(model, tmp_path / "model.pt")
    convert(str(tmp_path / "model.pt"), DendriteConfig()).save(tmp_path / "converted")
    return tmp_path / "converted"


def _convert_args(converted_dir: Path, output) -> list[str]:
    folder = converted_dir.parent
    return ["convert", str(folder / "weights.pt"), "--factory", f"{folder / 'net.py'}:build", "-o", str(output), "-q"]


def _adapter(tmp_path, batch=16, extra="", name="adapter"):
    path = tmp_path / f"{name}.py"
    path.write_text(DATA.replace("BATCH", str(batch)) + textwrap.dedent(extra))
    return path


def _one_sentence(result, code):
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _lrs(run: Path) -> list[float]:
    with open(run / "scores.csv") as f:
        return [float(r["lr"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_reduce_lr_on_plateau_is_stepped_in_its_own_direction(converted_dir, tmp_path, mode):
    def lrs(name, maximize, scores):
        adapter = _adapter(tmp_path, name=f"adapter_{name}", extra=f"""
            MAXIMIZE = {maximize}
            SCORES = iter({scores})  # one validation batch per epoch: the score of epoch i is SCORES[i]
            def score(outputs, batch): return next(SCORES)
            def optimizer(params): return torch.optim.Adam(params, lr=0.01)
            def scheduler(optimizer):
                return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="{mode}", patience=0, factor=0.5)
            """)
        train(converted_dir, adapter, tmp_path / name, TrainConfig(max_epochs=4, max_dendrites=0, plot=False))
        return _lrs(tmp_path / name)

    assert lrs("rising", True, [1.0, 2.0, 3.0, 4.0]) == [0.01] * 4  # improving: the rate is kept
    assert lrs("falling", False, [4.0, 3.0, 2.0, 1.0]) == [0.01] * 4  # improving, minimised
    # stalled: halved after each flat epoch (a flat score the scheduler sees positive, as its relative threshold needs)
    assert lrs("flat", True, [1.0 if mode == "max" else -1.0] * 4) == [0.01, 0.01, 0.005, 0.0025]


def test_resume_refuses_a_state_written_by_another_version(converted_dir, tmp_path):
    run = tmp_path / "run"
    train(converted_dir, _adapter(tmp_path), run, TrainConfig(max_epochs=2, max_dendrites=0, plot=False))
    state_file = run / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["version"] == 1
    state_file.write_text(json.dumps({**state, "version": 2}))
    line = _one_sentence(runner.invoke(app, ["train", "--resume", str(run), "-q"]), 3)
    assert "state.json has version 2" in line and "resumes version 1 only" in line


def test_a_batchnorm_batch_of_one_is_an_adapter_error_naming_drop_last(converted_dir, tmp_path):
    adapter = _adapter(tmp_path, batch=21)  # 64 = 3 * 21 + 1: the last batch holds one sample
    result = runner.invoke(app, ["train", str(converted_dir), "--adapter", str(adapter), "-o", str(tmp_path / "r"), "-q"])
    line = _one_sentence(result, 3)
    assert "batch of 1 sample" in line and "drop_last=True" in line


def test_an_output_that_names_no_folder_is_a_usage_error(converted_dir, tmp_path, monkeypatch):
    line = _one_sentence(runner.invoke(app, [*_convert_args(converted_dir, "/"), "--force"]), 2)
    assert "-o/--output / names no file or folder" in line
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["train", str(converted_dir), "--adapter", str(_adapter(tmp_path)), "-o", ".",
                                 "--force", "-q"])
    assert "-o/--output . names no file or folder" in _one_sentence(result, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.py", "converted", "keep.txt", "model.pt", "net.py", "weights.pt"]


def _read_only_folder() -> Path | None:
    """A folder no process can create files in, root included (sysfs), or None on systems without one."""
    folder = Path("/sys")
    try:
        tempfile.mkstemp(dir=folder)
    except OSError:
        return folder
    return None  # pragma: no cover - not Linux


@pytest.mark.parametrize("where", ["read-only folder", "file as folder"])
def test_an_output_that_cannot_be_written_is_a_usage_error_naming_it(converted_dir, tmp_path, where):
    if where == "read-only folder":
        folder = _read_only_folder()
        if folder is None:
            pytest.skip("no read-only folder on this system")
        expected = f"cannot write in {folder}"
    else:
        folder = tmp_path / "a-file"
        folder.write_text("")
        expected = f"{folder} is a file, not a folder"
    adapter = _adapter(tmp_path)
    commands = {
        "convert": _convert_args(converted_dir, folder / "conv"),
        "train": ["train", str(converted_dir), "--adapter", str(adapter), "-o", str(folder / "run"), "-q"],
        "export": ["export", str(converted_dir), "--onnx", "-o", str(folder / "m.onnx"), "--input-shape", "2,4", "-q"],
    }
    for name, args in commands.items():
        line = _one_sentence(runner.invoke(app, args), 2)
        assert expected in line and args[args.index("-o") + 1] in line, (name, line)
