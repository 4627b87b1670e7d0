"""Atomic outputs: everything is written under a temporary name and renamed, so a crash leaves
either the old result or the new one, never half of one (docs/design.md §6)."""

from __future__ import annotations

import contextlib
import glob
import os
import re
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
    """Clean up after a killed process (SIGKILL skips every cleanup) that was writing `path`.

    Temporaries are removed; a previous version moved aside for replacement is put back if the
    new one never arrived, so an interrupted `--force` never loses what was there.
    """
    for leftover in sorted(path.parent.glob(f".{glob.escape(path.name)}.*-*")):
        match = re.fullmatch(r"\.(tmp|old)-(\d+)(\..*)?", leftover.name[len(path.name) + 1:])  # .tmp-PID[.part]
        if not match or int(match[2]) == os.getpid() or _alive(int(match[2])):
            continue
        if match[1] == "old" and not path.exists():
            os.replace(leftover, path)
        elif leftover.is_dir():
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
def atomic_directory(path: str | Path, force: bool = False, durable: bool = True):
    """Yield an empty temporary directory that replaces `path` only if the block succeeds.

    `durable=False` skips the per-file fsync: the rename is still atomic, so a process crash leaves the old
    or the new directory, but a power loss may not (for outputs rewritten often and recoverable otherwise).
    """
    path = Path(path)
    tmp = _prepare(path, force)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*") if durable else ():
            if file.is_file():
                _fsync(file)
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
def atomic_file(path: str | Path, force: bool = True, durable: bool = True):
    """Yield a temporary file path that replaces `path` only if the block succeeds (fsynced unless not `durable`)."""
    path = Path(path)
    tmp = _prepare(path, force)
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _prepare(path: Path, force: bool) -> Path:
    check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    return _tmp_name(path)


def _fsync(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
