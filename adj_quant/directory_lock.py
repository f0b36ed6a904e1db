"""A directory belongs to one process at a time: a lock file holding its pid and host.

``with DirectoryLock(stage_dir):`` creates ``stage_dir/lock`` atomically (a complete file is
hard-linked into place, so a reader never sees half of one) and removes it on exit. A second
process is refused with one line naming the holder. A lock whose process is gone (same host,
the pid no longer running, or running but started after the lock was taken) is stale: it is
taken over with a line saying so. A lock from another host cannot be checked and is never
taken over.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time

from adj_quant.errors import UserError

LOCK_FILE = "lock"


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    started = holder.get("process_start")
    return started is None or _process_start(pid) in (None, started)


class DirectoryLock:
    """Hold ``directory`` (created if missing) for this process; see the module docstring."""

    def __init__(self, directory: str, what: str = "directory"):
        self.directory, self.what = directory, what
        self.path = os.path.join(directory, LOCK_FILE)
        self.me = {"pid": os.getpid(), "host": socket.gethostname(),
                   "process_start": _process_start(os.getpid()),
                   "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.held = False

    def _read(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _write_temp(self) -> str:
        fd, tmp = tempfile.mkstemp(prefix=f"{LOCK_FILE}.", suffix=".new", dir=self.directory)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.me, f)
        return tmp

    def acquire(self) -> "DirectoryLock":
        try:
            os.makedirs(self.directory, exist_ok=True)
        except (FileExistsError, NotADirectoryError, PermissionError) as err:
            raise UserError(f"{self.what} {self.directory} cannot be created ({err.strerror}: "
                            f"{err.filename}); pass a --run_dir in a writable folder") from None
        tmp = self._write_temp()
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    pass
                holder = self._read()
                if holder is None:
                    continue  # released meanwhile: try again
                who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} "
                       f"(since {holder.get('since', '?')})")
                if holder and holder.get("host") != self.me["host"]:
                    raise UserError(f"{self.what} {self.directory} is in use by {who}; wait for "
                                    f"it, or delete {self.path} if that process is gone")
                if holder and _alive(holder):
                    raise UserError(f"{self.what} {self.directory} is in use by {who}; wait for "
                                    "it to finish or use another --run_dir")
                os.replace(tmp, self.path)
                if self._read() == self.me:
                    self.held = True
                    print(f"note: took over the stale lock of {who} on {self.directory}",
                          file=sys.stderr)
                    return self
                tmp = self._write_temp()
            raise UserError(f"{self.what} {self.directory}: could not take {self.path}; "
                            "another process keeps taking it")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def release(self) -> None:
        if self.held and self._read() == self.me:
            os.remove(self.path)
        self.held = False

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
