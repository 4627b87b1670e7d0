"""dendrite-train under interruption, a full disk and numerical faults (issue 7)."""

import json
import os
import random
import resource
import shutil
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
    """Kills from process start onwards, before the first checkpoint too; every rerun is plain --resume (or,
    when the kill came before the run wrote anything, the same command again), never --force."""
    full, run = tmp_path / "full", tmp_path / "run"
    start = time.perf_counter()
    subprocess.run(_train(converted, *ARGS, "-o", full), check=True, env=ENV, timeout=300)
    duration = time.perf_counter() - start
    rng = random.Random(7)
    proc = subprocess.Popen(_train(converted, *ARGS, "-o", run), env=ENV)
    kills, early = 0, 0
    while kills < 6:
        time.sleep(rng.uniform(0.05, 0.7) * duration)  # from this process's start: imports, loading, epochs
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        early += not (run / "checkpoint").exists()
        if (run / "best").exists():  # whatever the moment of the kill, best/ is complete
            dc.load(run / "best")
        rerun = _train("--resume", run, "--adapter", DIGITS / "adapter.py") if run.exists() else _train(converted, *ARGS, "-o", run)
        proc = subprocess.Popen(rerun, env=ENV)
    assert proc.wait(timeout=300) == 0
    assert kills >= 1 and early >= 1  # at least one kill came before the first checkpoint
    got, expected = (json.loads((d / "summary.json").read_text()) for d in (run, full))
    for summary in (got, expected):
        summary.pop("wall_seconds"), summary.pop("peak_mem_mb")  # measured, not computed
    assert got == expected
    assert not list(run.glob(".*"))  # no temporaries or lock left behind


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_keeps_the_last_one_and_resume_recovers(converted, tmp_path):
    run = tmp_path / "run"
    # bytes per file: the first checkpoint (17 kB of optimizer state) and those of 1 to 3 dendrites fit, the
    # weights of 4 dendrites (19 kB, epoch 8) not
    limit = 18_000

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = [*ARGS[:4], "--max-dendrites", "4", "--max-epochs", "10", *ARGS[8:]]
    done = subprocess.run(_train(converted, *args, "-o", run), env=ENV, preexec_fn=small_disk,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "File too large" in done.stderr and "Traceback" not in done.stderr
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert 1 <= len(state["rows"]) < 8  # the last complete checkpoint survived
    dc.load(run / "best")
    resumed = subprocess.run(_train("--resume", run, "--json", "--quiet", "--adapter", DIGITS / "adapter.py"), env=ENV, capture_output=True, text=True,
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
    os.replace(run / "checkpoint", run / f".checkpoint.dendrite-old-{dead.pid}-{'0' * 32}")  # SIGKILL between the renames
    (run / f".checkpoint.dendrite-tmp-{dead.pid}-{'1' * 32}").mkdir()
    summary = dc.train(None, DIGITS / "adapter.py", run, resume=True)
    assert summary["finished"] and (run / "checkpoint" / "state.json").is_file()
    assert not list(run.glob(".*"))


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(converted, tmp_path):
    """What a kill during the first epoch leaves (the request, a stale lock, a half-written checkpoint) neither
    blocks a rerun without --force nor makes --resume fail: the run starts again from the beginning."""
    args = dict(config=dc.TrainConfig(switch_every=2, max_dendrites=1, max_epochs=3, seed=1, plot=False))
    full = dc.train(converted, DIGITS / "adapter.py", tmp_path / "full", **args)
    run = tmp_path / "run"
    for attempt in ("resume", "rerun"):
        run.mkdir()
        pid = _dead_pid()
        (run / "run.json").write_text(json.dumps({"version": 1, "converted": str(converted), "adapter": str(DIGITS / "adapter.py"),
                                                  "config": {**vars(args["config"])}}))
        (run / ".dendrite.lock").write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "started": "then"}))
        (run / f".checkpoint.dendrite-tmp-{pid}-{'2' * 32}").mkdir()
        if attempt == "resume":
            result = CliRunner().invoke(train_app, ["--resume", str(run), "--json", "--quiet", "--adapter", str(DIGITS / "adapter.py")])
        else:
            result = CliRunner().invoke(train_app, [str(converted), "-o", str(run), "--adapter", str(DIGITS / "adapter.py"),
                                                    "--switch-every", "2", "--max-dendrites", "1", "--max-epochs", "3",
                                                    "--seed", "1", "--json", "--quiet"])
        assert result.exit_code == 0, result.output
        got = json.loads(result.stdout)
        measured = ("wall_seconds", "peak_mem_mb")  # measured, not computed
        assert {k: v for k, v in got.items() if k not in measured} == {k: v for k, v in full.items() if k not in measured}
        assert not list(run.glob(".*"))
        shutil.rmtree(run)


GATED = """
import pathlib, sys, time
sys.path.insert(0, {digits!r})
from adapter import *  # noqa: F403 - the digits adapter, whose first training loss waits for `release`
import adapter as digits

waited = []


def loss(outputs, batch):
    if not waited:  # the run holds its output until the test has seen the second run refused
        deadline = time.monotonic() + 120
        while not pathlib.Path({release!r}).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        waited.append(True)
    return digits.loss(outputs, batch)
"""


def test_two_concurrent_trains_into_one_output_one_is_refused_naming_the_holder(converted, tmp_path):
    run, release = tmp_path / "run", tmp_path / "release"
    gated = tmp_path / "gated.py"
    gated.write_text(GATED.format(digits=str(DIGITS), release=str(release)))
    first_args = [str(gated) if a == DIGITS / "adapter.py" else a for a in ARGS]
    first = subprocess.Popen(_train(converted, *first_args, "-o", run), env=ENV)
    deadline = time.monotonic() + 120
    while not (run / ".dendrite.lock").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    second = subprocess.run(_train(converted, *ARGS, "-o", run), env=ENV, capture_output=True, text=True, timeout=300)
    release.touch()
    assert first.wait(timeout=300) == 0
    assert second.returncode == 2, second.stderr
    assert f"in use by another run (pid {first.pid} on host {os.uname().nodename}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert json.loads((run / "summary.json").read_text())["finished"]


@pytest.mark.parametrize("output", ["conv", "m.onnx"])
def test_converted_directories_and_exports_have_one_writer_too(tmp_path, output):
    """An output replaced as a whole is locked beside itself (`.<name>.dendrite.lock`): while another process
    writes it, a save or an export is refused naming that process, and nothing is left behind by either."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dendrite_convert.core.files import "
                               "output_lock\nwith output_lock(sys.argv[1], beside=True):\n print('held', flush=True)\n"
                               " time.sleep(60)", str(tmp_path / output)], env=ENV, stdout=subprocess.PIPE, text=True)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    torch.save(model, tmp_path / "m.pt")
    converted = dc.convert(tmp_path / "m.pt", dc.DendriteConfig(dendrites=1))
    write = ((lambda: converted.save(tmp_path / output)) if output == "conv" else
             (lambda: dc.export(converted, tmp_path / output, dc.ExportConfig(input_shape=[2, 3], latency=False))))
    try:
        assert holder.stdout.readline().strip() == "held"
        from dendrite_convert.core.errors import UsageError
        with pytest.raises(UsageError, match=f"{output} is in use by another run \\(pid {holder.pid} on host"):
            write()
        assert not (tmp_path / output).exists()
    finally:
        holder.kill()
        holder.wait()
    write()  # its holder died: the lock is taken over, then removed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([output, "m.pt"])


def test_a_lock_is_taken_over_only_from_a_dead_process_on_this_host(tmp_path):
    from dendrite_convert.core.errors import UsageError
    from dendrite_convert.core.files import output_lock

    lock = tmp_path / ".dendrite.lock"
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename, "started": "then"}))
    with output_lock(tmp_path):  # the holder is dead: taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(UsageError, match=f"pid {os.getpid()} on host"):  # held: a second writer is refused
            with output_lock(tmp_path):
                pass
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(UsageError, match="pid 1 on host elsewhere"):  # another host: never taken over
        with output_lock(tmp_path):
            pass
    assert json.loads(lock.read_text())["host"] == "elsewhere"


def test_clean_up_removes_only_temporaries_this_tool_made(tmp_path):
    from dendrite_convert.core.files import atomic_file

    pid = _dead_pid()
    user = [f".model.onnx.tmp-{pid}", f".model.onnx.old-{pid}", f".model.onnx.dendrite-tmp-{pid}",
            f".model.onnx.dendrite-tmp-{pid}-notatoken", f".model.onnx.dendrite-tmp-{pid}-{'a' * 31}"]
    ours = [f".model.onnx.dendrite-tmp-{pid}-{'a' * 32}", f".model.onnx.dendrite-tmp-{pid}-{'b' * 32}.data"]
    for name in user + ours:
        (tmp_path / name).write_text("x")
    with atomic_file(tmp_path / "model.onnx") as tmp:
        tmp.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.onnx", *user])


def test_a_new_run_never_replaces_a_started_one_without_force(converted, tmp_path):
    run = tmp_path / "run"
    dc.train(converted, DIGITS / "adapter.py", run, dc.TrainConfig(max_dendrites=0, max_epochs=1, plot=False))
    result = CliRunner().invoke(train_app, [str(converted), "--adapter", str(DIGITS / "adapter.py"), "-o", str(run)])
    assert result.exit_code == 2
    assert "already holds a run" in result.stderr and f"--resume {run}" in result.stderr


def test_resuming_a_finished_run_says_so_or_continues_with_a_raised_budget(converted, tmp_path):
    run = tmp_path / "run"
    # max-epochs 5 stops mid-cycle and restores the best model, which has fewer dendrites than the last one
    finished = dc.train(converted, DIGITS / "adapter.py", run,
                        dc.TrainConfig(switch_every=2, max_dendrites=3, max_epochs=5, seed=1, plot=False))
    assert finished["stop_reason"] == "reached --max-epochs 5"
    result = CliRunner().invoke(train_app, ["--resume", str(run), "--adapter", str(DIGITS / "adapter.py")])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == f"{run} is already finished (reached --max-epochs 5); nothing to do. Raise " \
                                    "--max-epochs or --max-dendrites to continue it."
    result = CliRunner().invoke(train_app, ["--resume", str(run), "--max-epochs", "9", "--json", "--quiet", "--adapter", str(DIGITS / "adapter.py")])
    assert result.exit_code == 0, result.output
    more = json.loads(result.stdout)
    assert more["finished"] and 5 < more["epochs"] <= 9 and "already_finished" not in more
    assert json.loads((run / "checkpoint" / "state.json").read_text())["config"]["max_epochs"] == 9
    rows = (run / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + more["epochs"]


def test_resuming_a_run_that_ended_by_restoring_a_smaller_best_model_says_it_is_finished(converted, tmp_path):
    """The best model (0 dendrites) was restored over the last one (1 dendrite): its optimizer state is not
    the restored model's, which used to crash the resume."""
    adapter = _adapter(tmp_path, "def score(outputs, batch):\n    return 50.0\n")
    run = tmp_path / "run"
    finished = dc.train(converted, adapter, run, dc.TrainConfig(patience=2, max_epochs=30, plot=False))
    assert finished["dendrites"] == 0 and finished["switches"]
    for extra in ([], ["--max-epochs", "40"]):  # a stop that no budget caused stays a stop
        result = CliRunner().invoke(train_app, ["--resume", str(run), "--adapter", str(DIGITS / "adapter.py"), *extra])
        assert result.exit_code == 0, result.output
        assert "is already finished (0 dendrites did not beat" in result.stderr or \
               "is already finished (1 dendrite did not beat" in result.stderr, result.stderr  # counts read as English


def test_an_exception_in_the_adapter_names_its_function_and_line_and_the_rerun_is_not_blocked(converted, tmp_path):
    adapter = _adapter(tmp_path, "def loss(outputs, batch):\n    raise ValueError('boom')\n")
    line = len(adapter.read_text().splitlines())
    run = tmp_path / "run"
    args = ["-o", str(run), "--max-dendrites", "0", "--max-epochs", "1", "--quiet"]
    result = CliRunner().invoke(train_app, [str(converted), "--adapter", str(adapter), *args])
    assert result.exit_code == 3, result.output
    assert (f"loss(outputs, batch) raised ValueError: boom (at adapter.py:{line}: `raise ValueError('boom')`)"
            in result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1
    result = CliRunner().invoke(train_app, [str(converted), "--adapter", str(DIGITS / "adapter.py"), *args])
    assert result.exit_code == 0, result.output


def test_an_adapter_data_function_that_raises_is_named_with_its_line(converted, tmp_path):
    adapter = _adapter(tmp_path, "def val_data():\n    raise RuntimeError('no data')\n")
    line = len(adapter.read_text().splitlines())
    result = CliRunner().invoke(train_app, [str(converted), "--adapter", str(adapter), "-o", str(tmp_path / "run"),
                                            "--max-epochs", "1", "--quiet"])
    assert result.exit_code == 3, result.output
    assert (f"error: --adapter {adapter}: val_data() raised RuntimeError: no data (at adapter.py:{line}: "
            "`raise RuntimeError('no data')`)" in result.stderr), result.stderr


_MEASURE = """
import json, resource, sys, time
import torch
import dendrite_convert as dc
from dendrite_convert.core.errors import DendriteError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    dc.load(sys.argv[1], factory="torch.nn:Linear")  # the factory named again: consent is not what refuses it
except DendriteError as exc:
    print(json.dumps({"seconds": time.perf_counter() - start, "rss_kb_before": before, "error": str(exc)}))
    sys.exit(exc.exit_code)
"""
_PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


@pytest.mark.parametrize("weights", ["tiny file", "every name, tiny shapes"])
def test_a_directory_declaring_1000_dendrites_on_a_4096_linear_is_refused_fast_and_small(tmp_path, weights):
    """849 bytes that would allocate 67 GB: the recipe is checked against the weights header on the meta device
    first. Measured in a fresh process: refused (exit 3, one sentence) in well under a second, < 200 MB."""
    from safetensors.torch import save_file

    small = dc.convert(torch.nn.Linear(4, 4), factory="torch.nn:Linear", factory_kwargs={"in_features": 4, "out_features": 4})
    path = small.save(tmp_path / "dos")
    config = json.loads((path / "dendrite_config.json").read_text())
    config["source"]["factory_kwargs"] = {"in_features": 4096, "out_features": 4096}
    config["recipe"]["targets"][0].update(weight_shape=[4096, 4096], out_channels=4096, dendrites=1000)
    (path / "dendrite_config.json").write_text(json.dumps(config))
    if weights == "every name, tiny shapes":  # the header names all 1000 dendrites; only their shapes lie
        names = ["base_layer.weight", "base_layer.bias"] + [f"{kind}.{i}{end}" for i in range(1000) for kind, end in
                 (("dendrite_layers", ".weight"), ("dendrite_layers", ".bias"), ("dendrite_scales", ""), ("dendrite_cascade", ""))]
        save_file({name: torch.zeros(1) for name in names}, str(path / "model.safetensors"))
    else:
        assert sum(f.stat().st_size for f in path.iterdir()) < 3000
    done = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-c", _MEASURE, str(path)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    result, peak_kb = json.loads(done.stdout.splitlines()[0]), int(done.stdout.splitlines()[1])
    assert "does not match the recipe" in result["error"] or "declares 1000 dendrites" in result["error"]
    assert "\n" not in result["error"]
    assert result["seconds"] < 1.0  # about 0.1 s on an idle machine, lazy imports included
    assert (peak_kb - result["rss_kb_before"]) / 1024 < 200  # beyond what importing torch itself takes
