"""dendrite-train under torchrun: a real 2-process gloo run through dendrite additions (issue 6)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dendrite_convert as dc

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"

# Loaded by every process of the run (sitecustomize): records which rank renames what into place,
# and after training each rank's parameter checksum, so the test sees what each process really did.
SITECUSTOMIZE = '''
import atexit, os
_log = os.environ["DENDRITE_TEST_LOG"]
_rank = os.environ.get("RANK", "?")
_replace = os.replace
def _logged(src, dst, *a, **k):
    with open(_log, "a") as f:
        f.write(f"replace {_rank} {dst}\\\\n")
    return _replace(src, dst, *a, **k)
os.replace = _logged
'''


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["gradient", "correlation"])
def test_two_process_gloo_run_adds_dendrites_and_only_rank_0_writes(tmp_path, objective):
    sys.path.insert(0, str(DIGITS))
    from model import build

    torch.manual_seed(0)
    torch.save(build(8), tmp_path / "digits.pt")  # torch classes only: its directories load without a trust flag
    converted = dc.convert(tmp_path / "digits.pt").save(tmp_path / "conv")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "writes.log"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
           "DENDRITE_TEST_LOG": str(log)}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
           str(Path(sys.executable).parent / "dendrite-train"), str(converted), "--adapter", str(DIGITS / "adapter.py"),
           "-o", str(run), "--switch-every", "2", "--max-dendrites", "2", "--max-epochs", "7", "--objective", objective,
           "--candidates", "2", "--seed", "5", "--json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # rank 0 alone printed it
    assert summary["world_size"] == 2 and summary["dendrites"] >= 1
    assert [s["dendrites"] for s in summary["switches"]][:2] == [1, 2]
    writers = {line.split()[1] for line in log.read_text().splitlines() if str(run) in line}
    assert writers == {"0"}  # only rank 0 renamed anything into the run directory
    # the replicas agreed at the end (the trainer compares checksums across ranks and fails otherwise), and
    # the saved best model scores what the run recorded as its best validation score
    from dendrite_convert.training.adapter import load_adapter

    adapter = load_adapter(str(DIGITS / "adapter.py"))
    model = dc.load(run / "best").eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in adapter.val_data():
            correct += (model(x).argmax(-1) == y).sum().item()
            total += len(y)
    assert 100 * correct / total == pytest.approx(summary["best_val"], abs=1e-4)  # the adapter scores in float32


@pytest.mark.slow
def test_distributed_resume_after_sigkill_matches_an_uninterrupted_distributed_run(tmp_path):
    import signal
    import time

    sys.path.insert(0, str(DIGITS))
    from model import build

    torch.manual_seed(0)
    torch.save(build(8), tmp_path / "digits.pt")  # torch classes only: its directories load without a trust flag
    converted = dc.convert(tmp_path / "digits.pt").save(tmp_path / "conv")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
              str(Path(sys.executable).parent / "dendrite-train")]
    args = ["--adapter", str(DIGITS / "adapter.py"), "--switch-every", "2", "--max-dendrites", "2",
            "--max-epochs", "8", "--seed", "2", "--quiet"]
    subprocess.run([*launch, str(converted), *args, "-o", str(tmp_path / "full")], env=env, check=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*launch, str(converted), *args, "-o", str(killed)], env=env, start_new_session=True)
    state = killed / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads(state.read_text())["rows"]) >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    subprocess.run([*launch, "--resume", str(killed), "--quiet", "--trust-code"], env=env, check=True, timeout=600)
    got, expected = (json.loads((d / "summary.json").read_text()) for d in (killed, tmp_path / "full"))
    for summary in (got, expected):
        summary.pop("wall_seconds"), summary.pop("peak_mem_mb")  # measured, not computed
    assert got == expected
