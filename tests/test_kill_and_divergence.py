"""A training run killed with SIGKILL resumes to the uninterrupted result, and a diverging
run stops with one line and its checkpoints intact.

Apart from the file of the shared digits run (``test_train.py``): these train their own runs,
so under pytest-xdist they need not wait for the worker that trains the shared one."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, TINY, load_stage_model

from adj_quant.checkpoints import read_json
from adj_quant.cli import train as train_cli


@pytest.mark.slow
def test_kill_and_resume_continues_exactly(tmp_path, capsys):
    args = ["--stage", "pretrain", "--max_epoch", "0.5", *TINY]
    # Reference: an uninterrupted run (in this process, as is the resumed run below: only
    # the run that is killed needs a process of its own).
    train_cli.main([*args, "--run_dir", str(tmp_path / "ref")])
    # Killed (SIGKILL) after its second checkpoint, then the same command again.
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--run_dir", str(run)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = run / "pretrain" / "checkpoints.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if state_file.exists() and len(read_json(state_file)["checkpoints"]) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = read_json(state_file)["checkpoints"][-1]["mini_epoch"]
    assert killed_at < 5, "the run finished before it could be killed"
    capsys.readouterr()
    train_cli.main([*args, "--run_dir", str(run)])
    out = capsys.readouterr().out
    assert "resuming from" in out and f"(mini-epoch {killed_at})" in out
    final = read_json(state_file)
    assert final["checkpoints"][-1]["mini_epoch"] == 5
    a, _ = load_stage_model(tmp_path / "ref" / "pretrain", "latest")
    b, _ = load_stage_model(run / "pretrain", "latest")
    for va, vb in zip(a.trainable_variables, b.trainable_variables):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), rtol=1e-4, atol=1e-6, err_msg=va.name)


@pytest.mark.slow
def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "nan"
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--stage", "pretrain", "--run_dir", str(run), *TINY,
                        "--max_epoch", "0.3", "--lr", "1e30", "--lr_fixed"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the loss became" in errors[0]
    assert "last good checkpoint" in errors[0]
    assert "Traceback" not in err
    state_file = run / "pretrain" / "checkpoints.json"
    if state_file.exists():  # whatever was saved before the divergence is intact and finite
        for entry in read_json(state_file)["checkpoints"]:
            assert np.isfinite(entry["top1"])
            assert os.path.exists(run / "pretrain" / f"{entry['name']}.index")
        assert not read_json(state_file)["finished"]
