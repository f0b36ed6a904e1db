"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The data goes to a temporary file in the same directory, which then replaces the target
with one ``os.replace`` (a rename). If writing fails, the temporary file is removed and
the target is left as it was.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from typing import Callable

#: The process's umask, read once at import (reading it means setting it): files written here
#: get the mode ``open()`` would give them, not ``mkstemp``'s private 0600.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomic(path, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path, data, **dump_kwargs) -> None:
    """``json.dump(data)`` to ``path`` atomically (``indent=2`` unless given)."""
    dump_kwargs.setdefault("indent", 2)
    write_atomic(path, json.dumps(data, **dump_kwargs) + "\n")


def write_dir_atomic(path, fill: Callable[[str], None]) -> None:
    """Create directory ``path`` atomically: ``fill(tmp)`` writes a temporary directory beside
    it, which then replaces ``path``. An existing directory is renamed away first and deleted
    only after the new one is in place, so it is never half deleted."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        fill(tmp)
        if os.path.isdir(path) and not os.path.islink(path):
            old = f"{tmp}.old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            if os.path.lexists(path):
                os.remove(path)
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk (or the quota) is full: an ``OSError`` from Python or
    the message of a TensorFlow file-system error."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "Disk quota exceeded" in text
