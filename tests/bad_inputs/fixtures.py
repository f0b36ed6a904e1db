"""The fixtures of the cases, made once in ``WORK/fixtures`` with the commands under test,
and each case's own copies of them.

Two kinds, made only when a selected case needs them:

* ``files``: bad files made without training (a binary file, a text file, TOML with strings
  or NaN where numbers belong, invalid TOML, CSV files that are no sweep results);
* ``trained``: a tiny trained run (pretrain 0.2 epoch, calibrate, qat8 0.1 epoch, with the
  TINY flags of tests/conftest.py, then ``adjq-eval`` of qat8 for its quant_info.json), an
  interrupted pretrain stage (three mini-epochs trained, the last one removed, so that
  re-running resumes), and the bad files made from the run (thresholds with strings, NaN,
  min > max, 1e39 or a width beyond float32, quant_info.json with strings).

Each case gets a fresh copy (``WORK/cases/NAME``) of whatever it may modify, so cases are
independent; corrupt checkpoints are made in those copies (truncated ``.index``, truncated
or empty ``.data``, one flipped byte in the middle of the largest model variable in
``.data``, so that every restore of the model meets the checksum mismatch).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys

from .commands import run_cmd

DATA_SUFFIX = ".data-00000-of-00001"
CORRUPTIONS = ("trunc_index", "trunc_data", "empty_data", "flip_byte")
#: Placeholders of the trained fixture ({fix}, {partial}, {corrupt/...}, {f:<file made from
#: the run>}) and of the files fixture; the others ({case}, {run}, {missing}, {dir}, {repo})
#: need none.
TRAINED_FILES = ("thr_strings.json", "thr_min_gt_max.json", "thr_nan.json", "thr_list.json",
                 "thr_1e39.json", "thr_overflow.json", "quant_info_strings.json")
PLAIN_FILES = {
    "strings.toml": 'lr = "fast"\nmax_epoch = "0.1"\n',
    "syntax.toml": "lr = = 1e-3\n[pretrain\n",
    "unknown_key.toml": "learning_rate = 1e-3\n",
    "nan.toml": "dataset = \"digits\"\nimg_size = 32\nlr = nan\n",
    "inf_epoch.toml": "dataset = \"digits\"\nimg_size = 32\nmax_epoch = inf\n",
    "plain.txt": "just a text file\n",
    "empty.csv": "",
    "bad_columns.csv": "a,b\n1,2\n",
}


def needs(args) -> set[str]:
    """The fixtures (``trained``, ``files``) the placeholders of ``args`` need."""
    out = set()
    for arg in args:
        for key in re.findall(r"\{([^{}]+)\}", arg):
            if (key in ("fix", "partial") or key.split("/")[0] in ("corrupt", "corruptp")
                    or key[2:] in TRAINED_FILES):
                out.add("trained")
            elif key in ("bin", "file") or key.startswith("f:"):
                out.add("files")
        if arg == "#copy-lone":
            out.add("trained")
    return out


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
    """``WORK/fixtures``: made by :meth:`prepare` with the commands under test."""

    def __init__(self, work: str, repo: str, env: dict, timeout: int, argv_of, tiny: list[str]):
        self.dir = os.path.join(work, "fixtures")
        self.repo, self.env, self.timeout = repo, env, timeout
        self.argv_of, self.tiny = argv_of, list(tiny)  # command name -> argv prefix
        self.run = os.path.join(self.dir, "run")
        self.partial = os.path.join(self.dir, "partial")
        self.files = os.path.join(self.dir, "files")

    def path(self, name: str) -> str:
        return os.path.join(self.files, name)

    def _step(self, what: str, command: str, args: list[str]) -> None:
        print(f"fixture: {what} ...", flush=True)
        res = run_cmd(self.argv_of(command) + args, self.repo, self.env, self.timeout)
        if res.rc != 0:
            sys.exit(f"fixture step failed ({what}, exit {res.rc}):\n{res.stderr[-3000:]}")

    def prepare(self, kinds: set[str]) -> None:
        """Make the fixtures of ``kinds`` (``files``, ``trained``) unless this checkout made
        them before."""
        os.makedirs(self.files, exist_ok=True)
        if kinds & {"files", "trained"}:
            self._plain_files()
        if "trained" not in kinds:
            return
        marker = os.path.join(self.dir, "READY")
        if os.path.exists(marker):
            with open(marker) as f:
                if f.read().strip() == self.repo:
                    print(f"fixtures: reusing {self.dir}", flush=True)
                    return
        for path in (self.run, self.partial):
            shutil.rmtree(path, ignore_errors=True)
        self._train()
        self._files_from_the_run()
        with open(marker, "w") as f:
            f.write(self.repo + "\n")

    def _train(self) -> None:
        run = ["--run_dir", self.run, *self.tiny]
        self._step("pretrain 0.2 epoch", "adjq-train",
                   ["--stage", "pretrain", *run, "--max_epoch", "0.2"])
        self._step("calibrate", "adjq-train", ["--stage", "calibrate", *run])
        self._step("qat8 0.1 epoch", "adjq-train", ["--stage", "qat8", *run, "--max_epoch", "0.1"])
        self._step("eval qat8 (writes qat8/quant_info.json)", "adjq-eval",
                   ["--ckpt_path", os.path.join(self.run, "qat8"), "--no-progress"])
        self._step("interrupted pretrain (0.3 epoch, last mini-epoch removed)", "adjq-train",
                   ["--stage", "pretrain", "--run_dir", self.partial, *self.tiny,
                    "--max_epoch", "0.3"])
        unfinish(os.path.join(self.partial, "pretrain"), 2)

    def _plain_files(self) -> None:
        with open(self.path("binary.bin"), "wb") as f:
            f.write(bytes(range(256)) * 8 + b"\0" * 512)
        for name, text in PLAIN_FILES.items():
            with open(self.path(name), "w") as f:
                f.write(text)

    def _files_from_the_run(self) -> None:
        p = self.path
        with open(os.path.join(self.run, "calibrate", "initial_thresholds.json")) as f:
            thr = json.load(f)
        variants = {
            "thr_strings.json": {k: {m: [str(x) for x in v[m]] for m in v} for k, v in thr.items()},
            "thr_min_gt_max.json": {k: {"min": [x + 1.0 for x in v["max"]], "max": v["max"]}
                                    for k, v in thr.items()},
            "thr_nan.json": {k: {"min": [float("nan")] * len(v["min"]), "max": v["max"]}
                             for k, v in thr.items()},
            "thr_list.json": [1, 2, 3],
            # finite to JSON and Python, infinite as float32
            "thr_1e39.json": {k: {"min": v["min"], "max": [1e39] * len(v["max"])}
                              for k, v in thr.items()},
            # both bounds in float32, the width max - min beyond it
            "thr_overflow.json": {k: {"min": [-3e38] * len(v["min"]),
                                      "max": [3e38] * len(v["max"])} for k, v in thr.items()},
        }
        for name, data in variants.items():
            with open(p(name), "w") as f:
                json.dump(data, f)  # NaN is written as the non-standard NaN literal
        with open(os.path.join(self.run, "qat8", "quant_info.json")) as f:
            qi = json.load(f)
        with open(p("quant_info_strings.json"), "w") as f:
            json.dump(_stringify(qi), f)


def _stringify(x):
    """Every number of a JSON value as a string."""
    if isinstance(x, dict):
        return {k: _stringify(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_stringify(v) for v in x]
    return str(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x


class Ctx:
    """Paths of one case; fixture copies are made on first use."""

    def __init__(self, fx: Fixtures, case_dir: str):
        self.fx, self.case = fx, case_dir
        self.cache: dict[str, str] = {}
        self.snap: dict[str, bytes | None] = {}

    def copy(self, src: str, name: str) -> str:
        """A copy of directory ``src`` as ``name`` in the case directory (made once)."""
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
            v = self.copy(self.fx.run, "fix")
        elif key == "partial":  # a fresh copy of the interrupted run, its config.json updated
            v = self.copy(self.fx.partial, "partial")
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


