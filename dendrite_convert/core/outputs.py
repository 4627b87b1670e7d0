"""Fail before any work when an output cannot be written: a path that names nothing (`-o /`), or a folder
that is read-only, missing permissions or actually a file. Found after minutes of training or a long
export, the same fault would be a traceback or a misleading "conversion failed"."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UsageError


def check_output_location(path: str | Path, option: str = "-o/--output") -> None:
    """UsageError (exit 2) naming `path` unless a file or folder can be created there."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise UsageError(f"{option} {path} names no file or folder of its own (it is the filesystem root, . or ..); "
                         f"give a new name inside it, such as {path / 'out'}.")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # missing folders are created: test the nearest existing
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{option} {path}: {folder} is a file, not a folder; choose another output path.")
    try:
        handle, probe = tempfile.mkstemp(prefix=".dendrite-write-test-", dir=folder)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write in {folder} ({exc.strerror or exc}); "
                         "choose a folder you can write to.") from exc
    os.close(handle)
    os.unlink(probe)
