"""dendrite-export interrupted at random points: the ONNX file is complete and verified, or absent (issue 7)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dendrite_convert as dc

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_export_leaves_a_verified_file_or_nothing(tmp_path, sig):
    import onnx

    from conftest import randomize_dendrites

    from fixtures.models import mlp

    converted = dc.convert(mlp(), dc.DendriteConfig(dendrites=2), factory="fixtures.models:mlp",
                           example_inputs=[{"shape": [2, 12], "dtype": "float32"}])
    randomize_dendrites(converted.model)
    src = converted.save(tmp_path / "conv")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = lambda out, *extra: [str(BIN / "dendrite-export"), str(src), "--onnx", "-o", str(out), "--quiet",
                                   "--factory", "fixtures.models:mlp", *extra]  # noqa: E731
    start = time.perf_counter()
    subprocess.run(cmd(tmp_path / "ref.onnx"), check=True, env=env, timeout=300)
    duration = time.perf_counter() - start
    rng = random.Random(int(sig))
    for attempt in range(3):
        out = tmp_path / f"m{attempt}.onnx"
        proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        proc.send_signal(sig)
        proc.wait(timeout=120)
        if out.exists():  # only a verified file is ever renamed into place
            onnx.checker.check_model(str(out), full_check=True)
        if sig == signal.SIGINT:
            assert not list(tmp_path.glob(f".m{attempt}.onnx.*"))
    subprocess.run(cmd(tmp_path / "m0.onnx", "--force"), check=True, env=env, timeout=300)
    assert not list(tmp_path.glob(".m0.onnx.*"))  # a later run removes what a kill left behind
