"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The data goes to a temporary file in the same directory, which then replaces the target
with one ``os.replace`` (a rename). If writing fails, the temporary file is removed and
the target is left as it was.
"""

from __future__ import annotations

import json
import os
import tempfile


def write_atomic(path, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
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
