"""One rule for turning what a user passes into a checkpoint prefix (no TensorFlow needed).

Accepted, in this order:

1. a checkpoint prefix (``DIR/me0012_...``, with ``DIR/me0012_....index`` beside it), or one
   of its files (``.index``, ``.data-00000-of-00001``);
2. a stage directory: the best checkpoint of its ``checkpoints.json`` (else its latest),
   else the one its TensorFlow ``checkpoint`` state file names, else its only checkpoint;
3. a run's root directory (``runs/digits``): its last finished stage, in recipe order
   (``finetune`` before ``adjustable`` before ... ``pretrain``), then rule 2.

Reading a checkpoint that turns out damaged (a truncated ``.index`` or ``.data`` file, a
checksum mismatch) ends in one :class:`CorruptCheckpoint` line naming an earlier checkpoint
of the same directory: every reader of checkpoints goes through :func:`reading`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

from adj_quant.errors import UserError

STATE_FILE = "checkpoints.json"
RESULT_FILE = "result.json"
RECIPE_STAGES = ("pretrain", "calibrate", "qat8", "adjustable", "finetune")


def last_finished_stage(run_dir: str) -> str | None:
    """The directory of the last finished stage of a run (it has ``result.json`` and
    checkpoints), or None."""
    for stage in reversed(RECIPE_STAGES):
        directory = os.path.join(run_dir, stage)
        if (os.path.exists(os.path.join(directory, RESULT_FILE))
                and os.path.exists(os.path.join(directory, STATE_FILE))):
            return directory
    return None


def _from_state_file(directory: str) -> str | None:
    path = os.path.join(directory, "checkpoint")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        match = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', f.read(), re.M)
    if not match:
        return None
    prefix = match.group(1)
    return prefix if os.path.isabs(prefix) else os.path.join(directory, prefix)


def _from_directory(path: str, what: str) -> str:
    state = os.path.join(path, STATE_FILE)
    if os.path.exists(state):
        try:
            with open(state, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            raise UserError(f"{what} {path}: {STATE_FILE} is unreadable ({err})") from None
        name = data.get("best") or data.get("latest")
        if name:
            return os.path.join(path, name)
    prefix = _from_state_file(path)
    if prefix and os.path.exists(prefix + ".index"):
        return prefix
    indexes = sorted(f for f in os.listdir(path) if f.endswith(".index"))
    if len(indexes) == 1:
        return os.path.join(path, indexes[0][: -len(".index")])
    if indexes:
        raise UserError(f"{what} {path} holds {len(indexes)} checkpoints and no state file "
                        f"saying which; pass a prefix such as "
                        f"{os.path.join(path, indexes[-1][: -len('.index')])}")
    stage = last_finished_stage(path)
    if stage is not None:
        return _from_directory(stage, what)
    raise UserError(f"{what} {path}: no checkpoint in this directory; pass a checkpoint "
                    "prefix, a stage directory or a run directory with a finished stage")


def resolve_checkpoint(path, what: str = "checkpoint") -> str:
    """The checkpoint prefix that ``path`` means (see the module docstring)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _from_directory(path, what)
    match = re.match(r"^(.*)\.(index|data-\d+-of-\d+)$", path)
    if match and os.path.exists(match.group(1) + ".index"):
        return match.group(1)
    if os.path.exists(path + ".index"):
        return path
    raise UserError(f"{what} {path}: checkpoint not found (no {path}.index); pass a checkpoint "
                    "prefix, a stage directory or a run directory")


# --------------------------------------------------------------------------- damaged files


class CorruptCheckpoint(UserError):
    """A checkpoint whose files cannot be read back."""

    def __init__(self, prefix: str, reason: str):
        self.prefix, self.reason = prefix, reason
        earlier = earlier_checkpoint(prefix)
        hint = (f"restore an earlier one: {earlier}" if earlier else
                "no earlier checkpoint is listed beside it; train it again")
        super().__init__(f"checkpoint {prefix} is corrupt ({reason}); {hint}")


def listed_checkpoints(directory: str) -> list[str]:
    """The checkpoint prefixes a directory lists, oldest first (``checkpoints.json``, else
    the TensorFlow ``checkpoint`` state file), that still have their ``.index``."""
    names: list[str] = []
    try:
        with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as f:
            names = [e["name"] for e in json.load(f).get("checkpoints", [])]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        try:
            with open(os.path.join(directory, "checkpoint"), encoding="utf-8",
                      errors="replace") as f:
                names = re.findall(r'^all_model_checkpoint_paths:\s*"(.*)"\s*$', f.read(), re.M)
        except OSError:
            names = []
    prefixes = [n if os.path.isabs(n) else os.path.join(directory, n) for n in names]
    return [p for p in prefixes if os.path.exists(p + ".index")]


def earlier_checkpoint(prefix: str) -> str | None:
    """The checkpoint listed just before ``prefix`` in its directory (else the newest other
    listed one), or None."""
    others = listed_checkpoints(os.path.dirname(prefix) or ".")
    names = [os.path.basename(p) for p in others]
    base = os.path.basename(prefix)
    if base in names:
        index = names.index(base)
        return others[index - 1] if index > 0 else None
    return others[-1] if others else None


def _reason(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text).splitlines()[0]
    text = re.sub(r"^TensorBundle at \S+ shard \d+ \(\d+ bytes\): ", "", text)
    text = re.sub(r" \[Op:\w+\]$", "", text)
    return text[:160]


@contextlib.contextmanager
def reading(prefix: str):
    """Turn the errors of reading a damaged checkpoint into :class:`CorruptCheckpoint`."""
    import tensorflow as tf  # noqa: PLC0415 (only where checkpoints are read)

    try:
        yield
    except (tf.errors.OpError, IndexError) as err:
        if isinstance(err, tf.errors.NotFoundError) and not os.path.exists(prefix + ".index"):
            raise UserError(f"checkpoint {prefix} not found (no {prefix}.index); pass a "
                            "checkpoint prefix, a stage directory or a run directory") from None
        raise CorruptCheckpoint(prefix, _reason(err)) from None
