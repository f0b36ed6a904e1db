"""adjq-sweep --jobs 2 killed with kill -9 on its process group in the middle of a point
(issue 28, part 3): rerunning the same command finishes every point, trains no finished
stage again, takes over the dead sweep's lock with a line saying so, and writes the
sweep.csv of an uninterrupted sweep (wall times apart).

The oracle is the same sweep run without interruption in another directory."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import run_main, save_small_keras_model

from adj_quant.cli import sweep as sweep_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "digits.toml")

# Two seeds: the two float points train their pretrain stages side by side (--jobs 2); the
# W4A4 points then calibrate and train qat8, also side by side, and are killed in qat8.
SWEEP = """
[flags]
model = "{model}"
img_size = 32
batch_size = 64
calib_images = 128
max_val_images = 360
"pretrain.max_epoch" = 0.5
"pretrain.lr" = 3e-3
"pretrain.lr_fixed" = true
"qat8.max_epoch" = 0.5

[grid]
seed = [0, 1]

[[points]]
family = "float"

[[points]]
family = "uniform_qat"
label = "W4A4"
"qat8.weight_bits" = 4
"qat8.act_bits" = 4
"""


def _args(path, out):
    return [path, "--sweep_dir", str(out), "--jobs", "2", "--no-progress"]


def _command(path, out):
    return [sys.executable, "-m", "adj_quant.cli.sweep", *_args(path, out)]


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(path, out):
    """The same command in this process: only the sweep that is killed needs a process (and
    a process group) of its own; each point of any sweep trains in its own process."""
    return run_main(sweep_cli.main, _args(path, out))


def _rows(out):
    with open(out / "sweep.csv", newline="") as f:
        return {r["point"]: r for r in csv.DictReader(f)}


def _stage_dirs(out):
    root = out / "stages"
    return sorted(root / s for s in os.listdir(root)) if root.is_dir() else []


def _finished(out):
    """``{stage dir name: mtime_ns of its result.json}`` of the finished stages."""
    return {d.name: (d / "result.json").stat().st_mtime_ns for d in _stage_dirs(out)
            if (d / "result.json").exists()}


def _in_qat8(out):
    """A qat8 stage has a checkpoint and is not finished: the middle of a W4A4 point."""
    return any(d.name.startswith("qat8-") and (d / "checkpoints.json").exists()
               and not (d / "result.json").exists() for d in _stage_dirs(out))


@pytest.mark.slow
def test_a_killed_sweep_resumes_to_the_uninterrupted_result(tmp_path):
    model = save_small_keras_model(tmp_path / "small.keras")
    path = tmp_path / "s.toml"
    path.write_text(f'base = "{BASE}"\n' + textwrap.dedent(SWEEP).replace("{model}", model))
    path = str(path)

    killed = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    sweep = subprocess.Popen(_command(path, killed), cwd=ROOT, env=_env(), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 1500
        while not _in_qat8(killed) and sweep.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert sweep.poll() is None, "the sweep ended before a qat8 stage had a checkpoint"
        assert _in_qat8(killed), "no qat8 checkpoint in time"
        finished = _finished(killed)
        os.killpg(sweep.pid, signal.SIGKILL)  # the sweep and every point's process
        sweep.wait()
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
        log.close()
    # Killed in a qat8: its point's pretrain and calibrate are finished; the other point's
    # may be finished or still running (the two run at once), and nothing later is.
    kinds = [n.split("-")[0] for n in finished]
    assert set(kinds) == {"pretrain", "calibrate"} and len(kinds) >= 2, finished
    holder = json.loads((killed / "lock").read_text())  # the dead sweep's lock is left
    assert holder["pid"] == sweep.pid

    again = _run(path, killed)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert f"took over the stale lock of process {sweep.pid}" in again.stderr
    assert "4 of 4 points done" in again.stdout
    # No finished stage was trained again: their result.json files are the ones of the kill.
    assert {k: v for k, v in _finished(killed).items() if k in finished} == finished
    # The interrupted qat8 stages resumed from their checkpoints (the stage's own lock of
    # the killed process taken over as well).
    logs = "".join((killed / "points" / p / "log.txt").read_text()
                   for p in os.listdir(killed / "points"))
    assert "took over the stale lock" in logs
    assert not (killed / "lock").exists()

    reference = tmp_path / "reference"
    done = _run(path, reference)
    assert done.returncode == 0, done.stderr[-3000:]
    want, got = _rows(reference), _rows(killed)
    assert sorted(want) == sorted(got) and len(want) == 4
    for name in want:
        a = {k: v for k, v in want[name].items() if k != "wall_s"}
        b = {k: v for k, v in got[name].items() if k != "wall_s"}
        assert a == b, name
        assert b["status"] == "done"
    # The same stages, and their final checkpoints equal tensor by tensor (the resumed qat8
    # stages included): TensorFlow's checkpoint reader is the oracle, not the sweep's csv.
    assert [d.name for d in _stage_dirs(reference)] == [d.name for d in _stage_dirs(killed)]
    compared = 0
    for d in _stage_dirs(reference):
        if not (d / "checkpoints.json").exists():
            continue  # calibrate: its thresholds, below
        state = json.loads((d / "checkpoints.json").read_text())
        other = json.loads((killed / "stages" / d.name / "checkpoints.json").read_text())
        assert (state["latest"], state["best"]) == (other["latest"], other["best"]), d.name
        for which in ("latest", "best"):
            compared += _assert_same_checkpoint(str(d / state[which]),
                                                str(killed / "stages" / d.name / state[which]))
    assert compared > 0
    for d in _stage_dirs(reference):
        if d.name.startswith("calibrate-"):
            assert (json.loads((d / "initial_thresholds.json").read_text()) == json.loads(
                (killed / "stages" / d.name / "initial_thresholds.json").read_text()))


def _assert_same_checkpoint(a: str, b: str) -> int:
    """Every variable of checkpoints ``a`` and ``b`` bit for bit; the number compared."""
    import numpy as np
    import tensorflow as tf

    ra, rb = tf.train.load_checkpoint(a), tf.train.load_checkpoint(b)
    names = sorted(ra.get_variable_to_shape_map())
    assert names == sorted(rb.get_variable_to_shape_map())
    for name in names:
        if name == "_CHECKPOINTABLE_OBJECT_GRAPH":
            continue
        np.testing.assert_array_equal(ra.get_tensor(name), rb.get_tensor(name), err_msg=name)
    return len(names)
