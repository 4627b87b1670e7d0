"""How long `--help` takes (goal: under 1 s): the commands import torch only when they run.

Run: .venv/bin/python benchmarks/cli_startup.py [--repeats 5]
Each command runs in a fresh process (`dendrite-convert --help` from PATH when installed, else the same app
through `python -c`), importing this checkout. Wall time is what a user waits; CPU time (user + system of
the child) is the same measurement without the waiting for a busy machine's cores.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "dendrite-convert": "dendrite_convert.cli.convert",
    "dendrite-train": "dendrite_convert.cli.train",
    "dendrite-export": "dendrite_convert.cli.export",
    "dendrite": "dendrite_convert.cli",
}
GOAL_SECONDS = 1.0


def command_line(script: str) -> list[str]:
    """The installed console script, or its app through this interpreter when it is not on PATH."""
    installed = shutil.which(script)
    if installed:
        return [installed, "--help"]
    return [sys.executable, "-c", f"from {COMMANDS[script]} import app; app()", "--help"]


def time_help(script: str, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of `script --help` over `repeats` fresh processes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    walls, cpus = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        process = subprocess.Popen(command_line(script), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        walls.append(time.perf_counter() - start)
        cpus.append(usage.ru_utime + usage.ru_stime)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise SystemExit(f"{script} --help exited {process.returncode}: {process.stderr.read().decode()[-500:]}")
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for script in COMMANDS:
        wall, cpu = time_help(script, args.repeats)
        verdict = "met" if wall < GOAL_SECONDS else "NOT met"
        print(f"{script} --help: median {wall:.2f} s wall, {cpu:.2f} s CPU over {args.repeats} runs "
              f"(goal < {GOAL_SECONDS:g} s: {verdict})")


if __name__ == "__main__":
    main()
