"""Atomic outputs: everything is written under a temporary name and renamed, so a crash leaves
either the old result or the new one, never half of one (DESIGN §6)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from pathlib import Path

from .errors import UsageError


def check_writable(path: Path, force: bool, option: str = "-o/--output") -> None:
    """Fail before any work when the output exists and --force was not given."""
    if path.exists() and not force:
        raise UsageError(f"{option} {path} already exists; pass --force to replace it.")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale(path: Path) -> None:
    """Remove temporaries left beside `path` by a killed process (SIGKILL skips every cleanup)."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*-*"):
        pid = leftover.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_directory(path: str | Path, force: bool = False):
    """Yield an empty temporary directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = _tmp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        replace_path(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_path(new: Path, path: Path) -> None:
    """Move `new` onto `path`; an existing directory is swapped out first and removed after."""
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | Path, force: bool = True):
    """Yield a temporary file path that replaces `path` only if the block succeeds."""
    path = Path(path)
    check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
