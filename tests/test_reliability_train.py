"""dendrite-train under interruption, a full disk and numerical faults (issue 7)."""

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dendrite_convert as dc
from dendrite_convert.cli.train import app as train_app

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch.manual_seed(0)
    sys.path.insert(0, str(DIGITS))
    from model import build

    folder = tmp_path_factory.mktemp("d")
    torch.save(build(8), folder / "digits.pt")  # torch classes only: its directories load without a trust flag
    return dc.convert(folder / "digits.pt").save(folder / "conv")


def _train(*args):
    return [str(BIN / "dendrite-train"), *map(str, args)]


ARGS = ["--adapter", DIGITS / "adapter.py", "--switch-every", "2", "--max-dendrites", "2", "--max-epochs", "8",
        "--seed", "1", "--quiet"]


@pytest.mark.slow
def test_repeated_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(converted, tmp_path):
    full, run = tmp_path / "full", tmp_path / "run"
    start = time.perf_counter()
    subprocess.run(_train(converted, *ARGS, "-o", full), check=True, env=ENV, timeout=300)
    duration = time.perf_counter() - start
    rng = random.Random(7)
    proc = subprocess.Popen(_train(converted, *ARGS, "-o", run), env=ENV)
    kills = 0
    while kills < 6:
        time.sleep(rng.uniform(0.2, 0.8) * duration / 3)
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if (run / "best").exists():  # whatever the moment of the kill, best/ is complete
            dc.load(run / "best")
        if not (run / "checkpoint" / "state.json").exists() and not list(run.glob(".checkpoint.*")):
            proc = subprocess.Popen(_train(converted, *ARGS, "-o", run, "--force"), env=ENV)  # killed before epoch 1
        else:
            proc = subprocess.Popen(_train("--resume", run, "--trust-code"), env=ENV)
    assert proc.wait(timeout=300) == 0
    assert kills >= 1
    got, expected = (json.loads((d / "summary.json").read_text()) for d in (run, full))
    for summary in (got, expected):
        summary.pop("wall_seconds"), summary.pop("peak_mem_mb")  # measured, not computed
    assert got == expected
    assert not list(run.glob(".*"))  # no temporaries left behind


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_keeps_the_last_one_and_resume_recovers(converted, tmp_path):
    run = tmp_path / "run"
    limit = 22_000  # bytes per file: the 0-dendrite checkpoint (16 kB of optimizer state) fits, the one with dendrites not

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(_train(converted, *ARGS, "-o", run), env=ENV, preexec_fn=small_disk,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "File too large" in done.stderr and "Traceback" not in done.stderr
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert 1 <= len(state["rows"]) < 8  # the last complete checkpoint survived
    dc.load(run / "best")
    resumed = subprocess.run(_train("--resume", run, "--json", "--quiet", "--trust-code"), env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["finished"] and summary["epochs"] > len(state["rows"]) and summary["dendrites"] >= 1


def _adapter(tmp_path, body: str) -> Path:
    text = (DIGITS / "adapter.py").read_text() + "\n" + body
    path = tmp_path / "adapter.py"
    path.write_text(text)
    return path


@pytest.mark.parametrize("fault,expected", [
    ("nan inputs", "became nan"),
    ("exploding", "became"),
])
def test_numerical_faults_stop_with_the_best_model_kept(converted, tmp_path, fault, expected):
    if fault == "nan inputs":  # the third epoch feeds NaN pixels
        body = ("class _Poisoned:\n"
                "    def __init__(self, loader):\n        self.loader, self.epoch = loader, 0\n"
                "    def __iter__(self):\n        self.epoch += 1\n"
                "        for x, y in self.loader:\n"
                "            yield (x * float('nan') if self.epoch >= 3 else x), y\n"
                "_train = train_data\n"
                "def train_data():\n    return _Poisoned(_train())\n")
    else:  # a learning rate that makes dendrites and weights explode
        body = "def optimizer(params):\n    return torch.optim.SGD(params, lr=1e12)\n"
    adapter = _adapter(tmp_path, body)
    result = CliRunner().invoke(train_app, [str(converted), "--adapter", str(adapter), "-o", str(tmp_path / "run"),
                                            "--switch-every", "1", "--max-epochs", "6", "--json"])
    assert result.exit_code == 1, result.output
    assert expected in result.stderr and "Traceback" not in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] and expected in summary["stop_reason"]
    if summary["best_val"] is not None:
        dc.load(tmp_path / "run" / "best")


def test_a_constant_score_stops_after_the_retry_with_the_reason(converted, tmp_path):
    adapter = _adapter(tmp_path, "def score(outputs, batch):\n    return 50.0\n")
    result = CliRunner().invoke(train_app, [str(converted), "--adapter", str(adapter), "-o", str(tmp_path / "run"),
                                            "--patience", "2", "--max-epochs", "30", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["best_val"] == 50.0 and summary["epochs"] < 30
    assert "did not beat the best score" in summary["stop_reason"]
    assert summary["dendrites"] == 0  # nothing beat the first model, so the best model has no dendrite


def test_resume_puts_back_a_checkpoint_moved_aside_by_a_killed_replace(converted, tmp_path):
    run = tmp_path / "run"
    dc.train(converted, DIGITS / "adapter.py", run, dc.TrainConfig(switch_every=2, max_dendrites=1, max_epochs=2))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.replace(run / "checkpoint", run / f".checkpoint.old-{dead.pid}")  # SIGKILL between the two renames
    (run / f".checkpoint.tmp-{dead.pid}").mkdir()
    summary = dc.train(None, None, run, resume=True, trust_code=True)
    assert summary["finished"] and (run / "checkpoint" / "state.json").is_file()
    assert not list(run.glob(".*"))
