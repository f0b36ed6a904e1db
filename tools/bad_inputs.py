#!/usr/bin/env python
"""Bad-input reliability harness (issue 13): run ~170 bad (and a few good) command lines
against the project's commands and classify what each one does.

    python tools/bad_inputs.py --repo CHECKOUT --work WORKDIR [--only SUBSTR] [--json OUT]
    python tools/bad_inputs.py --list                     # the cases, without running them

Every case runs in its own subprocess, with the current interpreter, ``cwd=CHECKOUT`` and
``PYTHONPATH=CHECKOUT`` (so that checkout's ``adj_quant`` is the one imported), stdin from
/dev/null and stderr not a terminal. The commands are ``CHECKOUT/train.py``,
``CHECKOUT/eval.py``, ``-m adj_quant.cli.score`` (adjq-score), ``-m adj_quant.cli.export``
(adjq-export), ``-m adj_quant.seed_quantizers`` (adjq-quantize-checkpoint) and
``CHECKOUT/quantizer.py``.

First the fixtures are made in ``WORKDIR/fixtures`` with the checkout under test: a tiny
trained run (pretrain 0.2 epoch, calibrate, qat8 0.1 epoch, with the TINY flags of
tests/conftest.py), an interrupted pretrain stage (three mini-epochs trained, the last one
removed, so that re-running resumes), and bad files (a binary file, TOML with strings or
NaN where numbers belong, thresholds with strings or min > max, ...). Each case gets a
fresh copy (``WORKDIR/cases/NAME``) of whatever it may modify, so cases are independent;
corrupt checkpoints are made in those copies (truncated ``.index``, truncated or empty
``.data``, one flipped byte in the middle of the largest model variable in ``.data``, so
that every restore of the model meets the checksum mismatch).

Outcomes:

* ``clean-run``   exit 0 and no traceback;
* ``one-line``    non-zero exit, no traceback, exactly one meaningful stderr line, an error line;
* ``multi-line``  non-zero exit, no traceback, otherwise (several lines, or none);
* ``traceback``   a "Traceback" in stdout or stderr, or a crash (signal, abort, fatal error);
* ``timeout``     killed after --timeout seconds;
* ``wrong``       the case has an expectation from the issue (the NaN guard keeps no
                  non-finite checkpoint, divergence must stop the run, the documented
                  single-stage command must work, a changed config must be refused, ...)
                  and the run contradicts it, without a traceback or a timeout (for those
                  the failed expectation is added as a note);
* ``skipped``     the case could not be set up on this machine (said why).

"Meaningful" stderr lines are the non-blank ones that are not known TensorFlow / absl /
TFLite log noise, tqdm progress frames, or the old-form ``quantizer.py`` "note: old form"
line. For a traceback the message column shows the exception line (the last one), not
"Traceback (most recent call last):".
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

TINY = ["--img_size", "32", "--batch_size", "64", "--width_multiplier", "0.25",
        "--depth_multiplier", "0.25", "--calib_images", "256", "--max_val_images", "360",
        "--metric_img_size", "224", "--no-progress"]
TIMEOUT = 300
HEAVY_TIMEOUT = 300  # floor for the cases that train a quantized stage or two processes
DATA_SUFFIX = ".data-00000-of-00001"
CORRUPTIONS = ("trunc_index", "trunc_data", "empty_data", "flip_byte")

# --------------------------------------------------------------------------- output classes

NOISE = [re.compile(p) for p in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called",
    r"^[IWEF]\d{4} [\d:.]+\s+\d+\s+\S+:\d+\]",          # absl C++ log
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] ",               # TF C++ log
    r"oneDNN custom operations are on",
    r"This TensorFlow binary is optimized",
    r"To enable the following instructions",
    r"rebuild TensorFlow with the appropriate compiler flags",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation placer already registered",
    r"TF-TRT Warning",
    r"^(WARNING|INFO):(absl|tensorflow):",                          # Python TF/absl logging
    r"^INFO: Created TensorFlow Lite",                              # TFLite delegate
    r"^INFO: Initialized TensorFlow Lite runtime",
    r"\d+%\|.*\|",                                                  # tqdm frames
    r"\d+it \[\d",
    r"^note: old form; same as",                                    # quantizer.py's note
)]
ERROR_LINE = re.compile(r"^(error\b|\S+: error\b|fatal\b)", re.I)
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b")
CRASH_MARKERS = ("Fatal Python error", "Segmentation fault", "core dumped", "Check failed:",
                 "terminate called")


def meaningful_lines(text: str) -> list[str]:
    lines = []
    for raw in re.split(r"[\r\n]", text):
        line = raw.strip()
        if line and not any(p.search(line) for p in NOISE):
            lines.append(line)
    return lines


@dataclasses.dataclass
class Result:
    rc: int | None
    stdout: str
    stderr: str
    elapsed: float
    timed_out: bool = False
    skipped: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def classify(res: Result) -> tuple[str, str]:
    """``(outcome, message)`` of a finished command, before any expectation."""
    if res.skipped:
        return "skipped", res.skipped
    lines = meaningful_lines(res.stderr)
    both = res.stdout + "\n" + res.stderr
    if res.timed_out:
        return "timeout", (lines[-1] if lines else "")
    crashed = (res.rc is not None and (res.rc < 0 or res.rc in (134, 136, 139))) or any(
        m in both for m in CRASH_MARKERS)
    if "Traceback (most recent call last)" in both or crashed:
        exc = [ln for ln in meaningful_lines(both) if EXCEPTION_LINE.match(ln)]
        msg = exc[-1] if exc else (lines[-1] if lines else "")
        msg = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", msg)   # TF's op wrapper names
        msg = re.sub(r"^(?:[a-z_]\w*\.)+(?=[A-Z])", "", msg)           # module path of the class
        if res.rc is not None and res.rc < 0:
            msg = f"killed by signal {-res.rc}; {msg}"
        return "traceback", msg
    if res.rc == 0:
        return "clean-run", (lines[0] if lines else "")
    if len(lines) == 1 and ERROR_LINE.match(lines[0]):
        return "one-line", lines[0]
    if not lines:
        return "multi-line", f"(exit {res.rc}, no message on stderr)"
    return "multi-line", f"({len(lines)} lines) " + lines[0]


# --------------------------------------------------------------------------- fixtures


def run_cmd(argv, cwd, env, timeout, stdout_path=None, stderr_path=None) -> Result:
    """Run ``argv`` in its own session; on timeout kill that session's process group."""
    started = time.time()
    out = open(stdout_path, "w+b") if stdout_path else subprocess.PIPE
    err = open(stderr_path, "w+b") if stderr_path else subprocess.PIPE
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=err, start_new_session=True)
    timed_out = False
    try:
        o, e = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        o, e = proc.communicate()
    if stdout_path:
        out.seek(0)
        o = out.read()
        out.close()
    if stderr_path:
        err.seek(0)
        e = err.read()
        err.close()
    return Result(proc.returncode, o.decode("utf-8", "replace"), e.decode("utf-8", "replace"),
                  time.time() - started, timed_out)


def read_state(stage_dir: str) -> dict:
    with open(os.path.join(stage_dir, "checkpoints.json")) as f:
        return json.load(f)


def write_state(stage_dir: str, state: dict) -> None:
    with open(os.path.join(stage_dir, "checkpoints.json"), "w") as f:
        json.dump(state, f, indent=2)
    lines = [f'model_checkpoint_path: "{state["latest"]}"'] + [
        f'all_model_checkpoint_paths: "{e["name"]}"' for e in state["checkpoints"]]
    with open(os.path.join(stage_dir, "checkpoint"), "w") as f:
        f.write("\n".join(lines) + "\n")


def unfinish(stage_dir: str, keep_mini_epochs: int) -> None:
    """Make a finished stage look interrupted after ``keep_mini_epochs`` mini-epochs: drop
    the later checkpoints and result.json, point "latest" at the last kept one."""
    state = read_state(stage_dir)
    kept = [e for e in state["checkpoints"] if e.get("mini_epoch", 0) <= keep_mini_epochs]
    for e in state["checkpoints"]:
        if e not in kept:
            for path in glob.glob(os.path.join(stage_dir, e["name"]) + ".*"):
                os.remove(path)
    state["checkpoints"] = kept
    state["latest"] = kept[-1]["name"]
    state["best"] = max(kept, key=lambda e: e.get("top1", 0.0))["name"]
    state["finished"] = False
    write_state(stage_dir, state)
    result = os.path.join(stage_dir, "result.json")
    if os.path.exists(result):
        os.remove(result)


def _tf():
    """TensorFlow, imported once in this process with its start-up chatter silenced."""
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
    return sys.modules["tensorflow"]


def model_byte_offset(prefix: str) -> int | None:
    """Offset in ``prefix``'s .data of the middle byte of its largest model variable (found
    by its bytes), so that a flipped byte there is read by every model restore, not only
    by a full one (the optimizer slots are read only on resume). None if not found."""
    import numpy as np

    tf = _tf()
    reader = tf.train.load_checkpoint(prefix)
    dtypes, shapes = reader.get_variable_to_dtype_map(), reader.get_variable_to_shape_map()
    keys = [k for k, d in dtypes.items() if k.startswith("model/") and d.is_floating]
    if not keys:
        return None
    key = max(keys, key=lambda k: int(np.prod(shapes[k])))
    raw = np.ascontiguousarray(reader.get_tensor(key)).tobytes()
    with open(prefix + DATA_SUFFIX, "rb") as f:
        blob = f.read()
    at = blob.find(raw)
    if at < 0 or blob.find(raw, at + 1) >= 0:
        return None
    return at + len(raw) // 2


def corrupt(prefix: str, kind: str) -> None:
    data, index = prefix + DATA_SUFFIX, prefix + ".index"
    if kind == "trunc_index":
        os.truncate(index, os.path.getsize(index) // 2)
    elif kind == "trunc_data":
        os.truncate(data, os.path.getsize(data) // 2)
    elif kind == "empty_data":
        os.truncate(data, 0)
    elif kind == "flip_byte":  # inside the largest model variable: a checksum mismatch
        at = model_byte_offset(prefix)
        with open(data, "r+b") as f:
            f.seek(os.path.getsize(data) // 2 if at is None else at)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        raise ValueError(kind)


class Fixtures:
    def __init__(self, work: str, repo: str, env: dict, timeout: int):
        self.dir = os.path.join(work, "fixtures")
        self.repo, self.env, self.timeout = repo, env, timeout
        self.run = os.path.join(self.dir, "run")
        self.partial = os.path.join(self.dir, "partial")
        self.files = os.path.join(self.dir, "files")

    def path(self, name: str) -> str:
        return os.path.join(self.files, name)

    def _step(self, what: str, argv: list[str]) -> None:
        print(f"fixture: {what} ...", flush=True)
        res = run_cmd(argv, self.repo, self.env, self.timeout)
        if res.rc != 0:
            sys.exit(f"fixture step failed ({what}, exit {res.rc}):\n{res.stderr[-3000:]}")

    def prepare(self) -> None:
        marker = os.path.join(self.dir, "READY")
        if os.path.exists(marker):
            with open(marker) as f:
                if f.read().strip() == self.repo:
                    print(f"fixtures: reusing {self.dir}", flush=True)
                    return
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.files)
        py, train = sys.executable, os.path.join(self.repo, "train.py")
        run = ["--run_dir", self.run, *TINY]
        self._step("pretrain 0.2 epoch", [py, train, "--stage", "pretrain", *run, "--max_epoch", "0.2"])
        self._step("calibrate", [py, train, "--stage", "calibrate", *run])
        self._step("qat8 0.1 epoch", [py, train, "--stage", "qat8", *run, "--max_epoch", "0.1"])
        self._step("eval qat8 (writes qat8/quant_info.json)",
                   [py, os.path.join(self.repo, "eval.py"), "--ckpt_path",
                    os.path.join(self.run, "qat8"), "--no-progress"])
        self._step("interrupted pretrain (0.3 epoch, last mini-epoch removed)",
                   [py, train, "--stage", "pretrain", "--run_dir", self.partial, *TINY,
                    "--max_epoch", "0.3"])
        unfinish(os.path.join(self.partial, "pretrain"), 2)
        self._files()
        with open(marker, "w") as f:
            f.write(self.repo + "\n")

    def _files(self) -> None:
        p = self.path
        with open(p("binary.bin"), "wb") as f:
            f.write(bytes(range(256)) * 8 + b"\0" * 512)
        with open(p("plain.txt"), "w") as f:
            f.write("just a text file\n")
        toml = {
            "strings.toml": 'lr = "fast"\nmax_epoch = "0.1"\n',
            "syntax.toml": "lr = = 1e-3\n[pretrain\n",
            "unknown_key.toml": "learning_rate = 1e-3\n",
            "nan.toml": "dataset = \"digits\"\nimg_size = 32\nlr = nan\n",
            "inf_epoch.toml": "dataset = \"digits\"\nimg_size = 32\nmax_epoch = inf\n",
        }
        for name, text in toml.items():
            with open(p(name), "w") as f:
                f.write(text)
        with open(os.path.join(self.run, "calibrate", "initial_thresholds.json")) as f:
            thr = json.load(f)
        variants = {
            "thr_strings.json": {k: {m: [str(x) for x in v[m]] for m in v} for k, v in thr.items()},
            "thr_min_gt_max.json": {k: {"min": [x + 1.0 for x in v["max"]], "max": v["max"]}
                                    for k, v in thr.items()},
            "thr_nan.json": {k: {"min": [float("nan")] * len(v["min"]), "max": v["max"]}
                             for k, v in thr.items()},
            "thr_list.json": [1, 2, 3],
        }
        for name, data in variants.items():
            with open(p(name), "w") as f:
                json.dump(data, f)  # NaN is written as the non-standard NaN literal
        with open(os.path.join(self.run, "qat8", "quant_info.json")) as f:
            qi = json.load(f)

        def stringify(x):
            if isinstance(x, dict):
                return {k: stringify(v) for k, v in x.items()}
            if isinstance(x, list):
                return [stringify(v) for v in x]
            return str(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x

        with open(p("quant_info_strings.json"), "w") as f:
            json.dump(stringify(qi), f)


# --------------------------------------------------------------------------- cases


class Ctx:
    """Paths of one case; fixture copies are made on first use."""

    def __init__(self, fx: Fixtures, case_dir: str):
        self.fx, self.case = fx, case_dir
        self.cache: dict[str, str] = {}
        self.snap: dict[str, bytes | None] = {}

    def _copy(self, src: str, name: str) -> str:
        dst = os.path.join(self.case, name)
        if not os.path.exists(dst):
            shutil.copytree(src, dst)
        return dst

    def field(self, key: str) -> str:
        if key in self.cache:
            return self.cache[key]
        parts = key.split("/")
        c = self.case
        if key == "case":
            v = c
        elif key == "run":  # a new run directory
            v = os.path.join(c, "run")
        elif key == "missing":
            v = os.path.join(c, "does-not-exist")
        elif key == "dir":  # an empty directory
            v = os.path.join(c, "empty_dir")
            os.makedirs(v, exist_ok=True)
        elif key == "fix":  # a fresh copy of the trained run
            v = self._copy(self.fx.run, "fix")
        elif key == "partial":  # a fresh copy of the interrupted run, its config.json updated
            v = self._copy(self.fx.partial, "partial")
            cfg = os.path.join(v, "pretrain", "config.json")
            with open(cfg) as f:
                data = json.load(f)
            data["run_dir"] = v
            with open(cfg, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.write("\n")
        elif parts[0] in ("corrupt", "corruptp"):
            # corrupt/STAGE/KIND/best|latest: stage dir of a copy whose best or latest
            # checkpoint is corrupted; corruptp/...: that checkpoint's prefix
            _, stage, kind, which = parts
            base = "partial" if stage == "partial" else "fix"
            root = self.field(base)
            stage_dir = os.path.join(root, "pretrain" if stage == "partial" else stage)
            ck = f"corrupted/{stage}/{which}"
            if ck not in self.cache:
                prefix = os.path.join(stage_dir, read_state(stage_dir)[which])
                corrupt(prefix, kind)
                self.cache[ck] = prefix
            v = stage_dir if parts[0] == "corrupt" else self.cache[ck]
        elif key in ("bin", "file") or key.startswith("f:"):
            name = {"bin": "binary.bin", "file": "plain.txt"}.get(key, key[2:])
            v = self._copy_file(self.fx.path(name))
        elif key == "repo":
            v = self.fx.repo
        else:
            raise KeyError(key)
        self.cache[key] = v
        return v

    def _copy_file(self, src: str) -> str:
        dst = os.path.join(self.case, "files", os.path.basename(src))
        if not os.path.exists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy(src, dst)
        return dst

    def expand(self, arg: str) -> str:
        return re.sub(r"\{([^{}]+)\}", lambda m: self.field(m.group(1)), arg)


@dataclasses.dataclass
class Case:
    name: str
    category: str
    desc: str
    tool: str                     # train | eval | score | export | quantize | oldquantizer
    args: list[str]
    expect: Callable[[Ctx, Result], str | None] | None = None
    setup: Callable[[Ctx], None] | None = None
    runner: str | None = None     # None | "concurrent" | "disk_full"
    timeout: int = 0              # at least this many seconds, whatever --timeout says


def tool_argv(repo: str, tool: str) -> list[str]:
    py = sys.executable
    return {
        "train": [py, os.path.join(repo, "train.py")],
        "eval": [py, os.path.join(repo, "eval.py")],
        "score": [py, "-m", "adj_quant.cli.score"],
        "export": [py, "-m", "adj_quant.cli.export"],
        "quantize": [py, "-m", "adj_quant.seed_quantizers"],
        "oldquantizer": [py, os.path.join(repo, "quantizer.py")],
    }[tool]


# ------------------------------------------------------------------ expectations


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


# ------------------------------------------------------------------ the list


def build_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name, category, desc, tool, args, expect=None, **kw):
        cases.append(Case(name, category, desc, tool, list(args), expect, **kw))

    pre = ["--stage", "pretrain", "--run_dir", "{run}", *TINY, "--max_epoch", "0.1"]
    adj = ["--stage", "adjustable", "--run_dir", "{fix}", *TINY, "--max_epoch", "0.1",
           "--warm_up_epoch", "0", "--iter_train_freq", "1"]

    # --- float flags of train.py: inf, nan, -1, 1e39 --------------------------------------
    # (flag, base, expect -1 refused, expect 1e39 refused, include 1e39)
    float_flags = [
        ("lr", pre, True, True, True),
        ("lr_decay", pre, True, False, True),
        ("max_epoch", pre, True, False, False),       # 1e39: a valid but endless run
        ("swa_freq", pre, True, False, False),
        ("swa_delay", pre, False, False, False),
        ("width_multiplier", pre, True, False, True),
        ("depth_multiplier", pre, True, False, True),
        ("eval_crop", pre, True, False, False),
        ("dropout", pre, True, False, False),
        ("drop_connect", pre, True, False, False),
        ("bn_momentum", pre, False, False, False),
        ("lr_bits", adj, True, False, True),
        ("metric", adj, True, False, True),
        ("warm_up_epoch", adj, True, False, False),
        ("alpha", adj, False, False, True),
        ("beta", adj, False, False, True),
        ("gamma", adj, False, False, True),
    ]
    for flag, base, neg_refused, big_refused, big in float_flags:
        stage = "pretrain" if base is pre else "adjustable"
        for value in ("inf", "nan", "-1", "1e39"):
            if value == "1e39" and not big:
                continue
            expect = None
            if value in ("inf", "nan"):
                expect = exits_nonzero(f"--{flag} {value} must be refused (issue 13, section 3)")
            elif value == "-1" and neg_refused:
                expect = exits_nonzero(f"a negative --{flag} must be refused")
            elif value == "1e39" and big_refused:
                expect = exits_nonzero(f"--{flag} above float32's range must be refused")
            tag = {"inf": "inf", "nan": "nan", "-1": "neg", "1e39": "1e39"}[value]
            add(f"train_{flag}_{tag}", "float-flag",
                f"train.py --stage {stage} --{flag}={value}", "train",
                [*base, f"--{flag}={value}"], expect)

    # --- negative numbers with a space -----------------------------------------------------
    add("train_lr_neg_space", "float-flag", "train.py --lr -1e-3 (space-separated negative)",
        "train", [*pre, "--lr", "-1e-3"],
        all_of(exits_nonzero("a negative --lr must be refused"),
               not_mentions("expected one argument",
                            "'--lr -1e-3' is not parsed (argparse: expected one argument)")))
    add("train_lr_bits_neg_space", "float-flag", "train.py --lr_bits -0.5 (space-separated)",
        "train", [*adj, "--lr_bits", "-0.5"],
        all_of(exits_nonzero("a negative --lr_bits must be refused"),
               not_mentions("expected one argument",
                            "'--lr_bits -0.5' is not parsed (argparse: expected one argument)")))
    add("train_lr_neg_equals", "float-flag", "train.py --lr=-1e-3", "train",
        [*pre, "--lr=-1e-3"], exits_nonzero("a negative --lr must be refused"))

    # --- int flags -------------------------------------------------------------------------
    ints = [
        ("img_size", "0"), ("img_size", "-32"), ("img_size", "abc"), ("img_size", "1"),
        ("batch_size", "0"), ("batch_size", "5000"), ("seed", "-1"), ("seed", str(2 ** 70)),
        ("weight_bits", "1"), ("weight_bits", "9"), ("weight_bits", "3.5"),
        ("swish_bits", "3"), ("bias_bits", "1"), ("range", "0"), ("reinit", "0"),
        ("keep_checkpoints", "-1"), ("num_classes", "5"), ("labels_offset", "3"),
    ]
    for flag, value in ints:
        tag = value.replace("-", "neg").replace(".", "p") if len(value) < 8 else "huge"
        add(f"train_{flag}_{tag}", "int-flag", f"train.py --stage pretrain --{flag} {value}",
            "train", [*pre, f"--{flag}={value}"])
    add("train_iter_train_freq_0", "int-flag", "train.py --stage adjustable --iter_train_freq 0",
        "train", [*adj, "--iter_train_freq", "0"])
    add("train_calib_images_0", "int-flag", "train.py --stage calibrate --calib_images 0",
        "train", ["--stage", "calibrate", "--run_dir", "{run}", *TINY, "--ckpt_path",
                  "{fix}/pretrain", "--calib_images", "0"])

    # --- choices and data ------------------------------------------------------------------
    add("train_stage_bogus", "choice", "train.py --stage bogus", "train",
        ["--stage", "bogus", "--run_dir", "{run}", *TINY])
    add("train_augment_bogus", "choice", "train.py --augment sideways", "train",
        [*pre, "--augment", "sideways"])
    add("train_metric_style_bogus", "choice", "train.py --metric_style best", "train",
        [*adj, "--metric_style", "best"])
    add("train_dataset_missing", "data", "train.py --dataset /no/such/dir", "train",
        [*pre, "--dataset", "{missing}"])
    add("train_dataset_binary", "data", "train.py --dataset BINARY_FILE", "train",
        [*pre, "--dataset", "{bin}"])
    add("train_dataset_empty_dir", "data", "train.py --dataset EMPTY_DIR (no shards)", "train",
        [*pre, "--dataset", "{dir}"])

    # --- paths of train.py -----------------------------------------------------------------
    paths = [
        ("config_dir", ["--config", "{dir}"], "--config DIR"),
        ("config_binary", ["--config", "{bin}"], "--config BINARY"),
        ("config_missing", ["--config", "{missing}"], "--config missing.toml"),
        ("config_strings", ["--config", "{f:strings.toml}"], "--config with lr = \"fast\""),
        ("config_syntax", ["--config", "{f:syntax.toml}"], "--config invalid TOML"),
        ("config_unknown_key", ["--config", "{f:unknown_key.toml}"], "--config unknown key"),
        ("run_dir_file", ["--run_dir", "{file}"], "--run_dir FILE"),
        ("run_dir_under_file", ["--run_dir", "{file}/sub"], "--run_dir FILE/sub"),
        ("ckpt_missing", ["--ckpt_path", "{missing}"], "pretrain --ckpt_path missing"),
        ("ckpt_empty_dir", ["--ckpt_path", "{dir}"], "pretrain --ckpt_path DIR without checkpoints"),
        ("ckpt_binary", ["--ckpt_path", "{bin}"], "pretrain --ckpt_path BINARY"),
        ("ckpt_quantized", ["--ckpt_path", "{fix}/qat8"], "pretrain --ckpt_path of a qat8 stage"),
    ]
    for name, extra, desc in paths:
        add(f"train_{name}", "path", f"train.py {desc}", "train", [*pre, *extra])
    add("train_config_nan", "path", "train.py --config with lr = nan (TOML literal)", "train",
        [*pre, "--config", "{f:nan.toml}"],
        exits_nonzero("lr = nan in a config file must be refused"))
    add("train_config_inf_epoch", "path", "train.py --config with max_epoch = inf", "train",
        ["--stage", "pretrain", "--run_dir", "{run}", *TINY, "--config", "{f:inf_epoch.toml}"],
        exits_nonzero("max_epoch = inf in a config file must be refused"))
    add("train_teacher_missing", "path", "train.py --stage adjustable --teacher_ckpt missing",
        "train", [*adj, "--teacher_ckpt", "{missing}"])
    add("train_teacher_quantized", "path", "train.py --stage adjustable --teacher_ckpt QAT8",
        "train", [*adj, "--teacher_ckpt", "{fix}/qat8"])

    # --- corrupt checkpoints in train.py ---------------------------------------------------
    for kind in CORRUPTIONS:
        add(f"train_resume_corrupt_{kind}", "corrupt",
            f"train.py resumes an interrupted pretrain whose latest checkpoint has {kind}",
            "train", ["--stage", "pretrain", "--run_dir", "{partial}", *TINY, "--max_epoch", "0.3",
                      "#{corrupt/partial/" + kind + "/latest}"],
            exits_zero("resume must fall back to the previous intact checkpoint and continue"))
    add("train_calibrate_corrupt_flip", "corrupt",
        "train.py --stage calibrate --ckpt_path PRETRAIN (flipped byte in .data)", "train",
        ["--stage", "calibrate", "--run_dir", "{run}", *TINY, "--ckpt_path",
         "{corrupt/pretrain/flip_byte/best}"], exits_nonzero("a corrupt checkpoint"))
    add("train_teacher_corrupt_trunc_data", "corrupt",
        "train.py --stage adjustable with a truncated .data in the teacher (pretrain)", "train",
        [*adj, "--teacher_ckpt", "{corrupt/pretrain/trunc_data/best}"],
        exits_nonzero("a corrupt checkpoint"))

    # --- resume with other flags -----------------------------------------------------------
    resume = ["--stage", "pretrain", "--run_dir", "{partial}", *TINY, "--max_epoch", "0.3"]
    add("train_resume_clean", "resume", "train.py resumes an interrupted pretrain (same flags)",
        "train", resume, exits_zero("a plain resume must work"))
    for flag, value, kind in (("width_multiplier", "0.5", "architecture"),
                              ("img_size", "48", "data"), ("lr", "1e-2", "optimisation"),
                              ("seed", "1", "seed"), ("batch_size", "32", "data")):
        add(f"train_resume_{flag}", "resume",
            f"train.py resumes with a different --{flag} ({kind} change)", "train",
            [*resume, f"--{flag}", value], refused_unchanged, setup=snapshot_partial)
    add("train_resume_lr_allowed", "resume",
        "train.py resumes with a different --lr and --allow_config_change", "train",
        [*resume, "--lr", "1e-2", "--allow_config_change"], config_history_written)

    # --- guards ----------------------------------------------------------------------------
    one_step = ["--stage", "pretrain", "--run_dir", "{run}", *TINY, "--batch_size", "140",
                "--max_epoch", "0.3"]   # 1437 // 140 = 10 steps: one step per mini-epoch
    add("guard_lr_nan", "guard", "train.py --lr nan --lr_fixed, one step per mini-epoch",
        "train", [*one_step, "--lr=nan", "--lr_fixed"],
        no_nonfinite_checkpoint("{run}/pretrain"))
    add("guard_lr_1e30", "guard", "train.py --lr 1e30 --lr_fixed, one step per mini-epoch",
        "train", [*one_step, "--lr=1e30", "--lr_fixed"],
        no_nonfinite_checkpoint("{run}/pretrain"))
    add("guard_lr_bits_nan", "guard",
        "train.py --stage adjustable --lr_bits nan, one step per mini-epoch", "train",
        [*adj, "--batch_size", "140", "--max_epoch", "0.3", "--lr_bits=nan"],
        no_nonfinite_checkpoint("{fix}/adjustable"))
    add("guard_lr_decay_neg", "guard", "train.py --lr_decay -1 for one epoch (divergence)",
        "train", ["--stage", "pretrain", "--run_dir", "{run}", *TINY, "--max_epoch", "1",
                  "--lr_decay=-1"],
        all_of(exits_nonzero("a diverging run (--lr_decay -1) must stop"),
               no_nonfinite_checkpoint("{run}/pretrain")))

    # --- the documented single-stage command -----------------------------------------------
    single = ["--stage", "adjustable", "--bits_trainable", "--iter_train", "--run_dir",
              "{case}/new", *TINY, "--max_epoch", "0.1"]
    add("doc_single_stage", "documented",
        "train.py --stage adjustable --bits_trainable --iter_train --ckpt_path RUN/qat8 "
        "in a new --run_dir", "train", [*single, "--ckpt_path", "{fix}/qat8"],
        exits_zero("the command shown in train.py --help must work"))
    add("doc_single_stage_teacher", "documented",
        "the single-stage command with --teacher_ckpt RUN/pretrain", "train",
        [*single, "--ckpt_path", "{fix}/qat8", "--teacher_ckpt", "{fix}/pretrain"],
        exits_zero("with an explicit teacher"))
    add("doc_single_stage_lone", "documented",
        "the single-stage command, --ckpt_path a qat8 copied out of its run (no pretrain)",
        "train", [*single, "--ckpt_path", "{case}/lone/qat8", "#copy-lone"],
        all_of(exits_nonzero("no teacher can be found"),
               mentions("--teacher_ckpt", "the message does not name --teacher_ckpt")))

    # --- concurrency and a full disk -------------------------------------------------------
    add("train_concurrent_same_stage", "lock",
        "a second train.py on the stage a running train.py is training", "train",
        ["--stage", "pretrain", "--run_dir", "{run}", *TINY, "--max_epoch", "3"],
        exits_nonzero("a second process on the same stage must be refused (lock)"),
        runner="concurrent")
    add("train_disk_full", "disk", "train.py on a 3 MiB tmpfs (No space left on device at the "
        "second checkpoint)", "train",
        ["--stage", "pretrain", "--run_dir", "{case}/tmpfs/run", *TINY, "--max_epoch", "0.3"],
        no_orphans, runner="disk_full")

    # --- eval.py ---------------------------------------------------------------------------
    ev = ["--no-progress"]
    evals = [
        ("no_args", [], None),
        ("ckpt_missing", ["--ckpt_path", "{missing}"], None),
        ("ckpt_empty_dir", ["--ckpt_path", "{dir}"], None),
        ("ckpt_binary", ["--ckpt_path", "{bin}"], None),
        ("thresholds_dir", ["--ckpt_path", "{fix}/pretrain", "--thresholds", "{dir}"], None),
        ("thresholds_binary", ["--ckpt_path", "{fix}/pretrain", "--thresholds", "{bin}"], None),
        ("thresholds_strings", ["--ckpt_path", "{fix}/pretrain", "--thresholds",
                                "{f:thr_strings.json}"], None),
        ("thresholds_min_gt_max", ["--ckpt_path", "{fix}/pretrain", "--thresholds",
                                   "{f:thr_min_gt_max.json}"],
         exits_nonzero("thresholds with min > max must be refused")),
        ("thresholds_nan", ["--ckpt_path", "{fix}/pretrain", "--thresholds",
                            "{f:thr_nan.json}"], exits_nonzero("NaN thresholds")),
        ("thresholds_list", ["--ckpt_path", "{fix}/pretrain", "--thresholds",
                             "{f:thr_list.json}"], None),
        ("thresholds_missing", ["--ckpt_path", "{fix}/pretrain", "--thresholds", "{missing}"],
         None),
        ("output_missing_folder", ["--ckpt_path", "{fix}/qat8", "--output",
                                   "{case}/nope/quant_info.json"], not_after_the_work),
        ("plot_missing_folder", ["--ckpt_path", "{fix}/qat8", "--plot", "{case}/nope/bits.png"],
         not_after_the_work),
        ("plot_dir", ["--ckpt_path", "{fix}/qat8", "--plot", "{dir}"], None),
        ("float_on_quant", ["--ckpt_path", "{fix}/qat8", "--float"], None),
        ("tflite_missing", ["--tflite", "{missing}.tflite"], None),
        ("tflite_binary", ["--tflite", "{bin}"], None),
        ("batch_size_0", ["--ckpt_path", "{fix}/qat8", "--batch_size", "0"], None),
        ("eval_crop_nan", ["--ckpt_path", "{fix}/qat8", "--eval_crop=nan"],
         exits_nonzero("--eval_crop nan")),
        ("width_inf", ["--ckpt_path", "{fix}/pretrain", "--float", "--width_multiplier=inf"],
         exits_nonzero("--width_multiplier inf")),
        ("good_qat8", ["--ckpt_path", "{fix}/qat8"], exits_zero("a good evaluation")),
        ("good_float_thresholds", ["--ckpt_path", "{fix}/pretrain", "--thresholds",
                                   "{fix}/calibrate/initial_thresholds.json"],
         exits_zero("a good evaluation")),
    ]
    for name, extra, expect in evals:
        add(f"eval_{name}", "eval", "eval.py " + " ".join(extra), "eval", [*extra, *ev], expect)
    for kind in CORRUPTIONS:
        add(f"eval_corrupt_{kind}", "corrupt", f"eval.py --ckpt_path QAT8 with {kind}", "eval",
            ["--ckpt_path", "{corrupt/qat8/" + kind + "/best}", *ev],
            exits_nonzero("a corrupt checkpoint"))

    # --- export ----------------------------------------------------------------------------
    ex_float = ["--ckpt_path", "{fix}/pretrain", "--quantization", "float", "--output",
                "{case}/m.tflite", "--no-progress"]
    exports = [
        ("seed_neg", ["--ckpt_path", "{fix}/pretrain", "--quantization", "int8", "--output",
                      "{case}/m.tflite", "--seed", "-1"],
         exits_nonzero("export --seed -1 must be refused")),
        ("ckpt_missing", ["--ckpt_path", "{missing}", "--quantization", "float"], None),
        ("rep_images_0", ["--ckpt_path", "{fix}/pretrain", "--quantization", "int8",
                          "--output", "{case}/m.tflite", "--representative_images", "0"], None),
        ("rep_images_neg", ["--ckpt_path", "{fix}/pretrain", "--quantization", "int8",
                            "--output", "{case}/m.tflite", "--representative_images=-5"], None),
        ("output_missing_folder", ["--ckpt_path", "{fix}/pretrain", "--quantization", "float",
                                   "--output", "{case}/nope/m.tflite"], None),
        ("output_exists", ["--ckpt_path", "{fix}/pretrain", "--quantization", "float",
                           "--output", "{file}"], None),
        ("no_quantization", ["--ckpt_path", "{fix}/pretrain"], None),
        ("quantization_bogus", ["--ckpt_path", "{fix}/pretrain", "--quantization", "int4"], None),
        ("adjustable_of_float", ["--ckpt_path", "{fix}/pretrain", "--quantization",
                                 "adjustable", "--output", "{case}/m.tflite"], None),
        ("saved_model_int8", ["--ckpt_path", "{fix}/pretrain", "--format", "saved_model",
                              "--quantization", "int8", "--output", "{case}/sm"], None),
        ("eval_saved_model", ["--ckpt_path", "{fix}/pretrain", "--format", "saved_model",
                              "--quantization", "float", "--eval", "--output", "{case}/sm"], None),
        ("eval_crop_inf", [*ex_float, "--eval_crop=inf"], exits_nonzero("--eval_crop inf")),
        ("good_float", ex_float, exits_zero("a good float export")),
        ("good_adjustable", ["--ckpt_path", "{fix}/qat8", "--quantization", "adjustable",
                             "--output", "{case}/m.tflite"], exits_zero("a good export")),
    ]
    for name, extra, expect in exports:
        add(f"export_{name}", "export", "adjq-export " + " ".join(extra), "export", extra, expect)
    for kind in CORRUPTIONS:
        add(f"export_corrupt_{kind}", "corrupt", f"adjq-export --ckpt_path PRETRAIN with {kind}",
            "export", ["--ckpt_path", "{corrupt/pretrain/" + kind + "/best}", "--quantization",
                       "float", "--output", "{case}/m.tflite"],
            exits_nonzero("a corrupt checkpoint"))

    # --- adjq-quantize-checkpoint and quantizer.py -----------------------------------------
    good = "{fix}/pretrain"
    quants = [
        ("no_args", [], None),
        ("ckpt_missing", ["{missing}", "--algorithm", "bin", "--bits", "8"], None),
        ("ckpt_empty_dir", ["{dir}", "--algorithm", "bin", "--bits", "8"], None),
        ("ckpt_binary", ["{bin}", "--algorithm", "bin", "--bits", "8"], None),
        ("bits_0", [good, "--algorithm", "bin", "--bits", "0"], None),
        ("bits_99", [good, "--algorithm", "fixed-point", "--bits", "99"], None),
        ("bits_abc", [good, "--algorithm", "bin", "--bits", "abc"], None),
        ("algorithm_bogus", [good, "--algorithm", "ternary", "--bits", "2"], None),
        ("min_size_neg", [good, "--algorithm", "uint8", "--min_size=-1"], None),
        ("min_size_abc", [good, "--algorithm", "uint8", "--min_size", "abc"], None),
        ("uint8_bits_4", [good, "--algorithm", "uint8", "--bits", "4"], None),
        ("output_is_file", [good, "--algorithm", "bin", "--bits", "8", "--output", "{file}"],
         None),
        ("good_bin8", [good, "--algorithm", "bin", "--bits", "8", "--output", "{case}/q"],
         exits_zero("a good quantization")),
        ("good_uint8", [good, "--algorithm", "uint8", "--output", "{case}/q"],
         exits_zero("a good quantization")),
    ]
    for name, extra, expect in quants:
        add(f"quantize_{name}", "quantize", "adjq-quantize-checkpoint " + " ".join(extra),
            "quantize", extra, expect)
    for kind in CORRUPTIONS:
        add(f"quantize_corrupt_{kind}", "corrupt",
            f"adjq-quantize-checkpoint PRETRAIN_PREFIX with {kind}", "quantize",
            ["{corruptp/pretrain/" + kind + "/best}", "--algorithm", "bin", "--bits", "8",
             "--output", "{case}/q"], exits_nonzero("a corrupt checkpoint"))
    olds = [
        ("bad_network", ["34", good, "10", "1", "8"], None),
        ("bad_algorithm", ["50", good, "10", "3", "8"], None),
        ("bits_abc", ["50", good, "10", "1", "abc"], None),
        ("num_classes_0", ["50", good, "0", "1", "8"], None),
        ("missing_args", ["50", good], None),
        ("corrupt_flip_byte", ["50", "{corruptp/pretrain/flip_byte/best}", "10", "1", "8"],
         exits_nonzero("a corrupt checkpoint")),
        ("good", ["50", "{fix}/pretrain", "10", "1", "8"], exits_zero("the old form works")),
    ]
    for name, extra, expect in olds:
        add(f"oldquantizer_{name}", "corrupt" if "corrupt" in name else "quantize",
            "quantizer.py " + " ".join(extra), "oldquantizer", extra, expect)

    # --- adjq-score ------------------------------------------------------------------------
    scores = [
        ("weight_bits_1", ["--weight_bits", "1"], None),
        ("weight_bits_33", ["--weight_bits", "33"], None),
        ("bits_abc", ["--act_bits", "abc"], None),
        ("img_size_0", ["--img_size", "0"], None),
        ("width_nan", ["--width_multiplier", "nan"], exits_nonzero("--width_multiplier nan")),
        ("width_inf", ["--width_multiplier", "inf"], exits_nonzero("--width_multiplier inf")),
        ("depth_1e39", ["--depth_multiplier", "1e39"], None),
        ("num_classes_0", ["--num_classes", "0"], None),
        ("quant_info_missing", ["--quant_info", "{missing}"], None),
        ("quant_info_empty_dir", ["--quant_info", "{dir}"], None),
        ("quant_info_binary", ["--quant_info", "{bin}"], None),
        ("quant_info_strings", ["--quant_info", "{f:quant_info_strings.json}",
                                "--width_multiplier", "0.25", "--depth_multiplier", "0.25",
                                "--num_classes", "10"], None),
        ("json_and_per_layer", ["--json", "--per_layer"], None),
        ("good_default", [], exits_zero("the default score")),
        ("good_stage_dir", ["--quant_info", "{fix}/qat8"], exits_zero("a stage's quant_info")),
    ]
    for name, extra, expect in scores:
        add(f"score_{name}", "score", "adjq-score " + " ".join(extra), "score", extra, expect)

    for c in cases:  # the quantized-stage runs take 30-100 s on 2 busy cores
        if "adjustable" in c.args or c.runner or c.category == "guard":
            c.timeout = max(c.timeout, HEAVY_TIMEOUT)
    names = [c.name for c in cases]
    dupes = {n for n in names if names.count(n) > 1}
    assert not dupes, dupes
    return cases


# --------------------------------------------------------------------------- running


def run_case(case: Case, fx: Fixtures, work: str, env: dict, timeout: int) -> dict:
    case_dir = os.path.join(work, "cases", case.name)
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    ctx = Ctx(fx, case_dir)
    args = []
    for a in case.args:
        if a == "#copy-lone":  # a qat8 stage copied out of its run
            ctx._copy(os.path.join(fx.run, "qat8"), os.path.join("lone", "qat8"))
            continue
        if a.startswith("#"):  # a setup-only placeholder (e.g. corrupt a checkpoint)
            ctx.expand(a[1:])
            continue
        args.append(ctx.expand(a))
    argv = tool_argv(fx.repo, case.tool) + args
    if case.setup:
        case.setup(ctx)
    limit = max(timeout, case.timeout)
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    out_log, err_log = os.path.join(logs, case.name + ".out"), os.path.join(logs, case.name + ".err")
    if case.runner == "concurrent":
        res = run_concurrent(argv, ctx, fx, env, limit)
    elif case.runner == "disk_full":
        res = run_disk_full(argv, ctx, fx, env, limit)
    else:
        res = run_cmd(argv, fx.repo, env, limit)
    with open(out_log, "w") as f:
        f.write(res.stdout)
    with open(err_log, "w") as f:
        f.write(res.stderr)
    base, message = classify(res)
    outcome = base
    problem = None
    if case.expect and base not in ("skipped",):
        try:
            problem = case.expect(ctx, res)
        except Exception as err:  # noqa: BLE001
            problem = f"expectation check failed: {type(err).__name__}: {err}"
        if problem:
            if base in ("clean-run", "one-line", "multi-line"):
                outcome = "wrong"
            res.notes.append("expectation: " + problem)
    return {
        "name": case.name, "category": case.category, "description": case.desc,
        "argv": ["python" if a == sys.executable else a for a in argv],
        "rc": res.rc, "elapsed_s": round(res.elapsed, 1), "outcome": outcome,
        "base_outcome": base, "message": message, "expectation_problem": problem,
        "notes": res.notes, "stderr_lines": len(meaningful_lines(res.stderr)),
        "stderr_tail": res.stderr[-2000:], "stdout_tail": res.stdout[-1000:],
    }


def run_concurrent(argv, ctx: Ctx, fx: Fixtures, env: dict, timeout: int) -> Result:
    """Start ``argv`` in the background, wait for its first checkpoint, run it a second time
    (the measured run), then kill the first."""
    marker = os.path.join(ctx.field("run"), "pretrain", "checkpoints.json")
    first_out = open(os.path.join(ctx.case, "first.out"), "wb")
    first_err = open(os.path.join(ctx.case, "first.err"), "wb")
    first = subprocess.Popen(argv, cwd=fx.repo, env=env, stdin=subprocess.DEVNULL,
                             stdout=first_out, stderr=first_err, start_new_session=True)
    notes = []
    try:
        t0 = time.time()
        while time.time() - t0 < 180 and first.poll() is None and not os.path.exists(marker):
            time.sleep(0.5)
        if first.poll() is not None:
            notes.append(f"the first process had already exited ({first.returncode}) "
                         "before the second started: inconclusive")
        else:
            notes.append(f"second started {time.time() - t0:.0f}s after the first, "
                         "which had written a checkpoint")
        res = run_cmd(argv, fx.repo, env, timeout)
        notes.append("the first was still running when the second ended" if first.poll() is None
                     else f"the first exited ({first.returncode}) before the second ended")
    finally:
        if first.poll() is None:
            try:
                os.killpg(first.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        first.wait()
        first_out.close()
        first_err.close()
    res.notes.extend(notes)
    return res


def run_disk_full(argv, ctx: Ctx, fx: Fixtures, env: dict, timeout: int) -> Result:
    """Run ``argv`` with its run directory on a 3 MiB tmpfs, mounted in a private user and
    mount namespace (no root needed where unprivileged user namespaces are allowed)."""
    if not shutil.which("unshare"):
        return Result(None, "", "", 0.0, skipped="no unshare(1) on this machine")
    mnt = os.path.join(ctx.case, "tmpfs")
    os.makedirs(mnt, exist_ok=True)
    listing = os.path.join(ctx.case, "tmpfs_listing.txt")
    script = ('mount -t tmpfs -o size=3m tmpfs "$1" || exit 97; shift; "$@"; rc=$?; '
              f'ls -a "{mnt}/run/pretrain" > "{listing}" 2>&1; exit $rc')
    wrapped = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
               mnt, *argv]
    res = run_cmd(wrapped, fx.repo, env, timeout)
    if res.rc == 97:
        return Result(None, "", "", res.elapsed,
                      skipped=f"cannot mount a tmpfs in a user namespace: {res.stderr.strip()[:200]}")
    if res.rc is not None and res.rc > 128:  # the shell reports a signal as 128 + N
        res.rc = -(res.rc - 128)
    if os.path.exists(listing):
        res.notes.append("stage dir on the full disk: " + " ".join(open(listing).read().split()))
    return res


def child_env(repo: str) -> dict:
    env = dict(os.environ)
    for key in ("ADJQ_TRACEBACK", "TF_CPP_MIN_LOG_LEVEL", "PYTHONSTARTUP"):
        env.pop(key, None)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def check_import(repo: str, env: dict) -> None:
    res = run_cmd([sys.executable, "-c", "import adj_quant, os; print(os.path.realpath("
                   "adj_quant.__file__))"], repo, env, 120)
    where = res.stdout.strip()
    if res.rc != 0 or not where.startswith(os.path.realpath(repo) + os.sep):
        sys.exit(f"adj_quant is not imported from {repo} (got {where!r}, exit {res.rc}):\n"
                 f"{res.stderr[-2000:]}")
    print(f"adj_quant from {where}", flush=True)


ORDER = ("clean-run", "one-line", "multi-line", "traceback", "timeout", "wrong", "skipped")


def report(rows: list[dict]) -> str:
    width = max([len(r["name"]) for r in rows] + [4])
    cat = max([len(r["category"]) for r in rows] + [8])
    lines = [f"{'case':<{width}}  {'category':<{cat}}  {'outcome':<10}  message",
             "-" * (width + cat + 80)]
    for r in rows:
        msg = r["message"]
        if r["expectation_problem"] and r["outcome"] != "clean-run":
            msg = f"[{r['expectation_problem']}] {msg}"
        lines.append(f"{r['name']:<{width}}  {r['category']:<{cat}}  {r['outcome']:<10}  "
                     f"{msg[:140]}")
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ORDER}
    lines += ["", f"{len(rows)} cases: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="the checkout to test (default: this one)")
    p.add_argument("--work", help="work directory for fixtures, case copies and logs")
    p.add_argument("--only", action="append", default=[], metavar="SUBSTR",
                   help="run only cases whose name or category contains SUBSTR (repeatable)")
    p.add_argument("--json", metavar="OUT", help="write every case's result as JSON")
    p.add_argument("--timeout", type=int, default=TIMEOUT,
                   help=f"seconds per case (the quantized-stage, guard, lock and disk cases get "
                        f"at least {HEAVY_TIMEOUT})")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--resume", action="store_true",
                   help="keep the results already in --json and run only the other cases")
    a = p.parse_args(argv)
    cases = all_cases = build_cases()
    if a.only:
        cases = [c for c in cases if any(s in c.name or s == c.category for s in a.only)]
    if a.list:
        for c in cases:
            print(f"{c.name:<40} {c.category:<11} {c.desc}")
        print(f"{len(cases)} cases")
        return 0
    if not a.work:
        p.error("--work is required")
    repo, work = os.path.abspath(a.repo), os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    env = child_env(repo)
    check_import(repo, env)
    fx = Fixtures(work, repo, env, max(a.timeout, 600))  # training the fixtures takes a while
    fx.prepare()
    rows, others = [], []
    if a.resume and a.json and os.path.exists(a.json):
        with open(a.json) as f:
            done = {r["name"]: r for r in json.load(f)["cases"]}
        rows = [done[c.name] for c in cases if c.name in done]
        selected = {c.name for c in cases}
        others = [r for r in done.values() if r["name"] not in selected]  # kept in --json
        print(f"resuming: {len(rows)} cases already in {a.json}", flush=True)
    order = {c.name: i for i, c in enumerate(all_cases)}
    skip = {r["name"] for r in rows}
    started = time.time()
    for i, case in enumerate(cases, 1):
        if case.name in skip:
            continue
        row = run_case(case, fx, work, env, a.timeout)
        rows.append(row)
        print(f"[{i}/{len(cases)}] {case.name}: {row['outcome']} ({row['elapsed_s']}s)"
              + (f"  {row['message'][:100]}" if row["outcome"] not in ("clean-run",) else ""),
              flush=True)
        if a.json:  # rewritten after every case, so a partial run leaves its results
            everything = sorted(rows + others, key=lambda r: order.get(r["name"], len(order)))
            with open(a.json, "w") as f:
                json.dump({"repo": repo, "cases": everything}, f, indent=1)
    print()
    print(report(rows))
    print(f"\n{time.time() - started:.0f}s; logs in {os.path.join(work, 'logs')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
