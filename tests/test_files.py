"""Atomic writes: the mode ``open()`` gives, the old file kept when writing fails."""

import os
import stat

import pytest

from adj_quant.files import write_atomic, write_json_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_an_atomic_file_gets_the_mode_open_gives(tmp_path):
    with open(tmp_path / "plain.txt", "w") as f:  # the oracle: the process's umask at work
        f.write("x")
    write_atomic(tmp_path / "atomic.txt", "x")
    write_json_atomic(tmp_path / "atomic.json", {"a": 1})
    assert _mode(tmp_path / "atomic.txt") == _mode(tmp_path / "plain.txt")
    assert _mode(tmp_path / "atomic.json") == _mode(tmp_path / "plain.txt")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "info.json"
    write_json_atomic(target, {"old": True})
    before = target.read_bytes()
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})  # json cannot encode it
    with pytest.raises(TypeError):
        write_atomic(target, 12345)  # neither bytes nor text
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["info.json"]
