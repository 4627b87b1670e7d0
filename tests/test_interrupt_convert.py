"""SIGKILL and SIGINT during dendrite-convert: the output is complete and loadable, or absent."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dendrite_convert as dc

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".venv" / "bin" / "dendrite-convert"


def _cmd(*args):
    exe = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "dendrite_convert.cli.convert"]
    return [*exe, *map(str, args)]


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """A model large enough (~8M parameters) that conversion takes a measurable moment."""
    path = tmp_path_factory.mktemp("big") / "big.pt"
    torch.save(torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_convert_leaves_complete_or_nothing(big_model, tmp_path, sig):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run(_cmd(big_model, "-o", tmp_path / "ref", "-q"), check=True, env=env, cwd=ROOT)
    duration = time.perf_counter() - start
    rng = random.Random(int(sig))
    outcomes = []
    for attempt in range(4):
        out = tmp_path / f"out{attempt}"
        proc = subprocess.Popen(_cmd(big_model, "-o", out, "-q"), env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        if out.exists():
            assert sorted(p.name for p in out.iterdir()) == ["dendrite_config.json", "model.safetensors", "source_model.pt"]
            dc.load(out)
            outcomes.append("complete")
        else:
            outcomes.append("absent")
        if sig == signal.SIGINT:  # Python cleans up its own temporaries on Ctrl-C
            assert not list(tmp_path.glob(f".out{attempt}.dendrite-tmp-*"))
    # a later run cleans what a SIGKILL left behind
    subprocess.run(_cmd(big_model, "-o", tmp_path / "out0", "-q", "--force"), check=True, env=env, cwd=ROOT)
    assert not list(tmp_path.glob(".out0.*"))
    assert outcomes


def test_a_kill_between_the_two_renames_of_force_keeps_the_old_output(tmp_path):
    """Simulate SIGKILL after the old directory was moved aside: the next writer puts it back."""
    from dendrite_convert.core.files import atomic_directory

    out = tmp_path / "best"
    out.mkdir()
    (out / "weights").write_text("old")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.replace(out, tmp_path / f".best.dendrite-old-{dead.pid}-{'0' * 32}")  # what a killed replace_path leaves behind
    (tmp_path / f".best.dendrite-tmp-{dead.pid}-{'1' * 32}").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_directory(out, force=True) as tmp:  # recovers first, then fails mid-write
            assert (out / "weights").read_text() == "old"
            (tmp / "weights").write_text("half")
            raise RuntimeError("disk full")
    assert (out / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_full_disk_keeps_the_previous_output_and_says_why(big_model, tmp_path):
    import resource

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    subprocess.run(_cmd(big_model, "-o", out, "-q"), check=True, env=env, cwd=ROOT)
    before = (out / "model.safetensors").read_bytes()

    def small_disk():  # files may not grow beyond 1 MB: the weights (32 MB) cannot be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    result = subprocess.run(_cmd(big_model, "-o", out, "--force", "--dendrites", "1"), env=env, cwd=ROOT,
                            preexec_fn=small_disk, capture_output=True, text=True)
    assert result.returncode == 1
    assert "File too large" in result.stderr and "Traceback" not in result.stderr
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
