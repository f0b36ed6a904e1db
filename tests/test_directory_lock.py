"""A stage directory belongs to one process: the lock file, its refusal and its takeover."""

import json
import os
import socket
import subprocess
import sys

import pytest

from adj_quant.directory_lock import LOCK_FILE, DirectoryLock
from adj_quant.errors import UserError


def _holder(path):
    return json.loads((path / LOCK_FILE).read_text())


def test_lock_holds_pid_and_host_and_is_released(tmp_path):
    with DirectoryLock(str(tmp_path / "stage")) as lock:
        holder = _holder(tmp_path / "stage")
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert lock.held
    assert not (tmp_path / "stage" / LOCK_FILE).exists()
    assert os.listdir(tmp_path / "stage") == []  # no temporary files left


def test_a_live_holder_is_refused_with_its_name(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stage = tmp_path / "stage"
        stage.mkdir()
        (stage / LOCK_FILE).write_text(json.dumps(
            {"pid": sleeper.pid, "host": socket.gethostname(), "since": "then"}))
        with pytest.raises(UserError, match=f"in use by process {sleeper.pid} on "):
            DirectoryLock(str(stage)).acquire()
        assert _holder(stage)["pid"] == sleeper.pid  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_second_of_two_locks_in_one_process_is_refused(tmp_path):
    with DirectoryLock(str(tmp_path)):
        with pytest.raises(UserError, match="in use by process"):
            DirectoryLock(str(tmp_path)).acquire()


def test_a_dead_holder_is_taken_over_with_a_line(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    with DirectoryLock(str(tmp_path)):
        assert _holder(tmp_path)["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"took over the stale lock of process {dead.pid}" in err
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_reused_pid_is_stale_and_another_host_is_never_taken_over(tmp_path):
    # Our own pid, but recorded with another process start time: the pid was reused.
    (tmp_path / LOCK_FILE).write_text(json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "process_start": "1"}))
    if DirectoryLock(str(tmp_path)).me["process_start"] is None:
        pytest.skip("no /proc here: process start times are unknown")
    with DirectoryLock(str(tmp_path)):
        pass
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere-host"}))
    with pytest.raises(UserError, match=r"elsewhere-host.*delete .*lock if that process is gone"):
        DirectoryLock(str(tmp_path)).acquire()


def test_a_directory_under_a_file_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"cannot be created \(Not a directory"):
        DirectoryLock(str(tmp_path / "notes.txt" / "run" / "pretrain")).acquire()
