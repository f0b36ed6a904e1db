"""One rule for turning what a user passes into a checkpoint prefix (no TensorFlow needed).

Accepted, in this order:

1. a checkpoint prefix (``DIR/me0012_...``, with ``DIR/me0012_....index`` beside it), or one
   of its files (``.index``, ``.data-00000-of-00001``);
2. a stage directory: the best checkpoint of its ``checkpoints.json`` (else its latest),
   else the one its TensorFlow ``checkpoint`` state file names, else its only checkpoint;
3. a run's root directory (``runs/digits``): its last finished stage, in recipe order
   (``finetune`` before ``adjustable`` before ... ``pretrain``), then rule 2.
"""

from __future__ import annotations

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
