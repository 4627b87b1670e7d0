"""training.png drawn by a helper process that imports matplotlib while the run trains.

Importing matplotlib and loading its fonts take about as long as a whole small run (0.5 s or more; the digits
MLP trains in 0.6 s), and the plot is only drawn at the end. So a run starts one helper process per training
process (a second run reuses it): it imports matplotlib and loads the fonts on another core while the epochs
run, then draws each run's plot when asked, and the caller waits for the file as before. The helper loads plots.py by its path, without this package
(which would import torch). Whatever goes wrong with the helper, the plot is drawn in this process instead.
"""

from __future__ import annotations

import atexit
import itertools
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

_HELPER = r"""
import importlib.util, json, os, sys
sys.path = [p for p in sys.path if p not in ("", os.getcwd())]  # the caller's folder must not shadow a module
spec = importlib.util.spec_from_file_location("_dendrite_plots", sys.argv[1])
plots = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plots)
try:
    plots.prepare()
except ImportError as exc:
    failure = f"ImportError: {exc}"
else:
    failure = None
    plots.warm_up()
for line in sys.stdin:
    request = json.loads(line)
    ident = request.pop("id")
    if failure is None:
        try:
            path = request.pop("path")
            tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
            plots.draw_training(**request).savefig(tmp, format="png", dpi=plots.DPI)
            os.replace(tmp, path)
            reply = "ok"
        except Exception as exc:
            reply = f"{type(exc).__name__}: {exc}"
    else:
        reply = failure
    sys.stdout.write(json.dumps([ident, reply]) + "\n")
    sys.stdout.flush()
"""

_lock = threading.Lock()
_helper: subprocess.Popen | None = None
_ids = itertools.count()
_replies: dict[int, str] = {}  # replies read while waiting for another request's


def start() -> None:
    """Start the helper if none is running (it imports matplotlib meanwhile); never raises."""
    global _helper
    with _lock:
        if _helper is not None and _helper.poll() is None:
            return
        try:
            _helper = subprocess.Popen([sys.executable, "-c", _HELPER, str(Path(__file__).with_name("plots.py"))],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       text=True, bufsize=1)
        except OSError:
            _helper = None


def draw(path: Path, rows: list[dict], switches: list[dict], best_epoch: int | None, score_name: str) -> None:
    """Write training.png at `path` through the helper, or in this process when there is none or it failed.
    Raises ImportError when matplotlib is not installed."""
    begin(path, rows, switches, best_epoch, score_name)()


def begin(path: Path, rows: list[dict], switches: list[dict], best_epoch: int | None,
          score_name: str) -> Callable[[], None]:
    """Ask the helper to draw training.png at `path` and return at once (the caller writes its other outputs
    meanwhile); the returned call waits until the file is written, drawing it in this process when there is
    no helper or it failed, and raises ImportError when matplotlib is not installed."""
    request = {"path": str(path), "rows": rows, "switches": switches, "best_epoch": best_epoch,
               "score_name": score_name}
    with _lock:
        ident = next(_ids)
        helper = _send({**request, "id": ident})

    def wait() -> None:
        reply = None if helper is None else _reply(helper, ident)
        if reply == "ok":
            return
        if reply is not None and reply.startswith("ImportError"):
            raise ImportError(reply)
        from .plots import save_training_png

        save_training_png(path, rows, switches, best_epoch, score_name)

    return wait


def _send(request: dict) -> subprocess.Popen | None:
    helper = _helper
    if helper is None or helper.poll() is not None:
        return None
    try:
        helper.stdin.write(json.dumps(request) + "\n")
        helper.stdin.flush()
        return helper
    except (OSError, ValueError):
        return None


def _reply(helper: subprocess.Popen, ident: int) -> str | None:
    """The helper's reply to request `ident` (replies come in order; others' are kept for them)."""
    with _lock:
        while ident not in _replies:
            try:
                line = helper.stdout.readline()
                other, reply = json.loads(line) if line else (None, None)
            except (OSError, ValueError):
                return None
            if other is None:
                return None
            _replies[other] = reply
        return _replies.pop(ident)


@atexit.register
def stop() -> None:
    """End the helper (at exit, or when a run gives up on it)."""
    global _helper
    helper, _helper = _helper, None
    if helper is not None and helper.poll() is None:
        try:
            helper.stdin.close()
            helper.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            helper.kill()
