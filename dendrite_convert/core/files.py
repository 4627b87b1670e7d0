"""Atomic outputs: everything is written under a temporary name and renamed, so a crash leaves
either the old result or the new one, never half of one (docs/design.md §6).

Temporaries are named `.<name>.dendrite-tmp-<pid>-<token>` (`-old-` for a previous version moved aside),
with a random 32-hex-digit token: clean-up removes only names of exactly that form, so a user's file
never matches by accident. `output_lock` gives an output one writer at a time.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import UsageError

_TEMPORARY = re.compile(r"\.dendrite-(tmp|old)-(\d+)-[0-9a-f]{32}(\..*)?")  # after ".<name>"
LOCK_FILE = ".dendrite.lock"


def check_writable(path: Path, force: bool, parameter: str = "output") -> None:
    """Fail before any work when the output exists and force was not given."""
    if path.exists() and not force:
        raise UsageError(f"{parameter} {path} already exists; pass force=True to replace it.", parameter=parameter)


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """A name next to `path` that only this process, in this call, uses: `.<name>.dendrite-<kind>-<pid>-<token>`."""
    return path.with_name(f".{path.name}.dendrite-{kind}-{os.getpid()}-{uuid.uuid4().hex}")


def is_temporary(name: str) -> bool:
    """Whether a file name is one that `temporary_name` makes (for any output name, pid and token)."""
    return re.fullmatch(r"\..+?" + _TEMPORARY.pattern, name) is not None


def remove_stale(path: Path) -> None:
    """Clean up after a killed process (SIGKILL skips every cleanup) that was writing `path`.

    Temporaries are removed; a previous version moved aside for replacement is put back if the
    new one never arrived, so an interrupted `--force` never loses what was there.
    """
    for leftover in sorted(path.parent.glob(f".{glob.escape(path.name)}.dendrite-*")):
        match = _TEMPORARY.fullmatch(leftover.name[len(path.name) + 1:])  # .dendrite-tmp-PID-TOKEN[.part]
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
def atomic_directory(path: str | Path, force: bool = False, durable: bool = True, remove_later: bool = False):
    """Yield an empty temporary directory that replaces `path` only if the block succeeds.

    `durable=False` skips the fsyncs: the rename is still atomic, so a process crash leaves the old
    or the new directory, but a power loss may not (for outputs rewritten often and recoverable otherwise).
    `remove_later=True` deletes the replaced version in the background (`remove_in_background`).
    """
    path = Path(path)
    tmp = _prepare(path, force)
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*") if durable else ():
            if file.is_file():
                _fsync(file)
        replace_path(tmp, path, durable, remove_later)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_path(new: Path, path: Path, durable: bool = True, remove_later: bool = False) -> None:
    """Move `new` onto `path`; an existing directory is swapped out first and removed after (in the
    background with `remove_later`). The parent directory is fsynced when `durable`."""
    if path.is_dir() and not path.is_symlink():
        old = temporary_name(path, "old")
        os.replace(path, old)
        os.replace(new, path)
        if remove_later:
            remove_in_background(old)
        else:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)
    if durable:
        _fsync_dir(path.parent)


_remover: ThreadPoolExecutor | None = None


def remove_in_background(path: Path) -> None:
    """Delete a tree that is already out of the way (renamed to a temporary name) on a background thread.

    Deleting costs a few milliseconds per file on some file systems (online discard), which a run that
    checkpoints every epoch would otherwise wait for. The thread is not a daemon, so the process finishes
    the deletion before it exits; a kill leaves the temporary, which `remove_stale` cleans up later.
    """
    global _remover
    if _remover is None:
        _remover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dendrite-remove")
    _remover.submit(shutil.rmtree, path, ignore_errors=True)


def wait_removed() -> None:
    """Return once every background deletion asked for so far is done."""
    if _remover is not None:
        _remover.submit(lambda: None).result()


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
    return temporary_name(path)


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


@contextlib.contextmanager
def output_lock(directory: str | Path, option: str = "-o/--output", beside: bool = False):
    """Hold `directory/.dendrite.lock` (pid, host and start time) for the block: one writer per output.

    `beside=True` locks an output that is replaced as a whole (a converted or folded directory, an ONNX
    file) with `.<name>.dendrite.lock` next to it, since a lock inside would be swapped out with it.

    The lock is written under a temporary name, flocked, and published with an atomic exclusive create
    (a hard link, which fails if the name exists), so it is never seen empty. A second writer is refused
    (UsageError) with the holder named. The kernel drops the holder's flock when it dies, so a lock on
    this host is stale exactly when its flock is free, and is then taken over; a lock from another host
    never is.
    """
    import fcntl

    lock = lock_path(directory, beside)
    lock.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(lock)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
    tmp = temporary_name(lock)
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, record.encode())
        os.fsync(fd)
        while True:
            try:
                os.link(tmp, lock)
                break
            except FileExistsError:
                taken = _take_over(lock, option)
                if taken is not None:  # the holder died: its file is ours now
                    os.close(fd)
                    fd = taken
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, record.encode(), 0)
                    os.fsync(fd)
                    break
    except BaseException:
        os.close(fd)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                lock.unlink()
        os.close(fd)


def _take_over(lock: Path, option: str) -> int | None:
    """An fd holding `lock` if its holder is dead (on this host); None to retry; UsageError if it is held."""
    import fcntl

    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        holder = _read_holder(fd)
        same_host = holder.get("host") in (None, socket.gethostname())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            same_host = False  # held right now
        if not same_host:
            raise _in_use(lock, holder, option)
        if not os.path.samestat(os.fstat(fd), os.stat(lock)):  # released and re-created while we opened it
            os.close(fd)
            return None
        return fd
    except FileNotFoundError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def check_unlocked(directory: str | Path, option: str = "-o/--output") -> None:
    """Refuse (UsageError naming the holder) when another process holds `directory`'s lock right now."""
    lock = Path(directory) / LOCK_FILE
    try:
        fd = _take_over(lock, option)
    except (FileNotFoundError, NotADirectoryError):
        return
    if fd is not None:
        os.close(fd)  # nobody holds it: our flock goes with the fd


def lock_path(output: str | Path, beside: bool = False) -> Path:
    output = Path(output)
    return output.with_name(f".{output.name}{LOCK_FILE}") if beside else output / LOCK_FILE


def _in_use(lock: Path, holder: dict, option: str) -> UsageError:
    output = lock.parent if lock.name == LOCK_FILE else lock.with_name(lock.name[1:-len(LOCK_FILE)])
    return UsageError(f"{option} {output} is in use by another run (pid {holder.get('pid', '?')} on host "
                      f"{holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it to finish, or "
                      f"delete {lock} if that process is gone.")
