"""Expectations of the cases: a check ``(ctx, result) -> problem or None`` that turns an
otherwise clean outcome into ``wrong`` when the command did not do what it must (refuse a
value, keep no non-finite checkpoint, resume, ...)."""

from __future__ import annotations

import glob
import os

from .fixtures import Ctx, _tf, read_state


def exits_nonzero(why: str):
    def check(ctx, res):
        return None if res.rc != 0 else f"exit 0: {why}"
    return check


def exits_zero(why: str):
    def check(ctx, res):
        return None if res.rc == 0 else f"exit {res.rc}: {why}"
    return check


def all_of(*checks):
    def check(ctx, res):
        for c in checks:
            problem = c(ctx, res)
            if problem:
                return problem
        return None
    return check


def nonfinite_checkpoints(stage_dir: str) -> dict[str, str]:
    """``{checkpoint name: what is wrong}`` for every checkpoint in ``stage_dir`` with a
    non-finite model variable (or that cannot be read)."""
    if not os.path.isdir(stage_dir):
        return {}
    import numpy as np

    tf = _tf()

    bad = {}
    for index in sorted(glob.glob(os.path.join(stage_dir, "*.index"))):
        prefix = index[: -len(".index")]
        name = os.path.basename(prefix)
        if name.startswith(".tmp-"):
            continue
        try:
            reader = tf.train.load_checkpoint(prefix)
            dtypes = reader.get_variable_to_dtype_map()
            keys = [k for k, d in dtypes.items() if k.startswith("model/") and d.is_floating]
            n_bad = sum(not np.all(np.isfinite(reader.get_tensor(k))) for k in keys)
        except Exception as err:  # noqa: BLE001
            bad[name] = f"unreadable ({type(err).__name__})"
            continue
        if n_bad:
            bad[name] = f"{n_bad} of {len(keys)} model variables non-finite"
    return bad


def no_nonfinite_checkpoint(stage_rel: str):
    """The rule of the NaN guard: exit non-zero, and no checkpoint with a non-finite model
    variable (least of all the best or latest one)."""
    def check(ctx, res):
        stage_dir = ctx.expand(stage_rel)
        bad = nonfinite_checkpoints(stage_dir)
        problems = []
        if res.rc == 0:
            problems.append("exit 0 although the loss became non-finite")
        if bad:
            state = {}
            try:
                state = read_state(stage_dir)
            except (OSError, ValueError):
                pass
            which = [f"{n} ({why}" + "".join(f", is {p}" for p in ("best", "latest")
                                               if state.get(p) == n) + ")"
                     for n, why in bad.items()]
            problems.append("non-finite checkpoint kept: " + "; ".join(which))
        return "; ".join(problems) or None
    return check


def mentions(text: str, why: str):
    def check(ctx, res):
        return None if text in res.stderr + res.stdout else why
    return check


def mentions_once(text: str, why: str):
    def check(ctx, res):
        n = (res.stderr + res.stdout).count(text)
        return None if n <= 1 else f"{why} ({text!r} {n} times)"
    return check


def creates(path: str):
    """The project's rule for output paths: a missing parent folder of ``path`` (a
    placeholder template, e.g. ``{case}/nope/m.tflite``) is created and the output written."""
    def check(ctx, res):
        target = ctx.expand(path)
        if res.rc != 0:
            return (f"exit {res.rc}: a missing parent folder of an output must be created, "
                    "not refused")
        if not os.path.exists(target):
            return f"exit 0 but {os.path.relpath(target, ctx.case)} was not written"
        return None
    return check


def not_mentions(text: str, why: str):
    def check(ctx, res):
        return why if text in res.stderr else None
    return check


SNAP_FILES = ("config.json", "model_spec.json")


def snapshot_partial(ctx: Ctx) -> None:
    stage = os.path.join(ctx.field("partial"), "pretrain")
    for name in SNAP_FILES:
        path = os.path.join(stage, name)
        ctx.snap[name] = open(path, "rb").read() if os.path.exists(path) else None


def refused_unchanged(ctx, res):
    """A resume with changed flags: refused, and config.json / model_spec.json untouched."""
    problems = []
    if res.rc == 0:
        problems.append("exit 0: the changed configuration was accepted silently")
    stage = os.path.join(ctx.field("partial"), "pretrain")
    for name in SNAP_FILES:
        path = os.path.join(stage, name)
        now = open(path, "rb").read() if os.path.exists(path) else None
        if now != ctx.snap.get(name):
            problems.append(f"{name} was rewritten")
    return "; ".join(problems) or None


def config_history_written(ctx, res):
    if res.rc != 0:
        return f"exit {res.rc}: --allow_config_change should accept a changed --lr"
    if not os.path.exists(os.path.join(ctx.field("partial"), "pretrain", "config_history.json")):
        return "no config_history.json after an allowed config change"
    return None


def not_after_the_work(ctx, res):
    """eval.py --output/--plot into a missing folder: create it, or refuse before the
    evaluation; never fail after it."""
    if res.rc == 0:
        return None
    text = res.stderr
    if "Traceback" in text and any(s in text for s in ("save_quant_info", "per_layer_bits_png",
                                                         "write_atomic", "open(plot")):
        return "failed after the evaluation was done (while writing the output)"
    return None


def no_orphans(ctx, res):
    problems = []
    if res.rc == 0:
        problems.append("exit 0 on a full disk")
    listing = os.path.join(ctx.case, "tmpfs_listing.txt")
    if os.path.exists(listing):
        names = open(listing).read().split()
        orphans = [n for n in names if n.startswith(".tmp-") or n.endswith(".tmp")]
        if orphans:
            problems.append("orphaned temporary files left: " + ", ".join(orphans[:4]))
    if "No space left" not in res.stderr and "space" not in res.stderr.lower():
        problems.append("the message does not say the disk is full")
    return "; ".join(problems) or None
