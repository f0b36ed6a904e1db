"""Flags and config files: every impossible value is one line before anything is written,
and a resumed stage keeps its model, its data and a record of its flags."""

import json
import os

import pytest

from adj_quant.cli import evaluate as eval_cli
from adj_quant.cli import train as train_cli
from adj_quant.errors import UserError
from adj_quant.recipe import config as config_lib
from adj_quant.recipe.config import FIELDS, Options, check_config_change, record_config, resolve

FLOAT_FLAGS = [name for name, f in FIELDS.items() if config_lib._type_of(f) is float]


def _refused(argv, capsys, main=train_cli.main):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
@pytest.mark.parametrize("flag", FLOAT_FLAGS)
def test_non_finite_numbers_are_one_line(flag, value, capsys, tmp_path):
    line = _refused([f"--{flag}", value, "--stage", "pretrain", "--run_dir", str(tmp_path)],
                    capsys)
    assert f"--{flag}" in line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flag", ["lr", "lr_bits", "lr_decay", "metric", "warm_up_epoch",
                                  "alpha", "beta", "swa_delay", "seed"])
def test_negative_values_parse_with_a_space_and_are_refused(flag, capsys, tmp_path):
    line = _refused([f"--{flag}", "-1e-3" if flag != "seed" else "-1", "--stage", "pretrain",
                     "--run_dir", str(tmp_path)], capsys)
    assert line.startswith(f"error: --{flag} -") and "must not be negative" in line


@pytest.mark.parametrize("argv, message", [
    (["--lr", "1e39"], "beyond float32's range"),
    (["--alpha", "1e39"], "--alpha 1e+39 is beyond float32's range"),
    (["--metric", "-1e39"], "--metric -1e+39 is beyond float32's range"),
    (["--gamma", "1.5"], "--gamma 1.5"),
    (["--max_epoch", "1e30"], "--max_epoch 1e+30 epochs"),
    (["--width_multiplier", "1e30"], "--width_multiplier 1e+30"),
    (["--img_size", "100000"], "--img_size 100000"),
    (["--max_loss", "0"], "--max_loss 0.0 must be positive"),
    (["--bn_momentum", "1"], "--bn_momentum 1.0"),
])
def test_out_of_range_values_are_one_line(argv, message, capsys, tmp_path):
    line = _refused([*argv, "--stage", "pretrain", "--run_dir", str(tmp_path)], capsys)
    assert message in line


def test_negative_numbers_parse_as_values():
    assert train_cli.parse(["--lr", "-1e-3", "--seed", "-1"]) == {"lr": -1e-3, "seed": -1}
    assert train_cli.parse(["--lr", "-.5E+2"])["lr"] == -50.0


def test_config_paths_that_are_not_toml_files(tmp_path, capsys):
    line = _refused(["--config", str(tmp_path), "--stage", "pretrain"], capsys)
    assert "is a directory" in line
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    line = _refused(["--config", str(binary), "--stage", "pretrain"], capsys)
    assert "is not valid TOML" in line
    strings = tmp_path / "strings.toml"
    strings.write_text('lr = "fast"\n')
    assert "lr must be a number" in _refused(["--config", str(strings), "--stage", "pretrain"],
                                             capsys)
    non_finite = tmp_path / "inf.toml"
    non_finite.write_text("[pretrain]\nmax_epoch = inf\n")
    assert "--max_epoch inf" in _refused(["--config", str(non_finite), "--stage", "pretrain"],
                                         capsys)


def test_run_dir_that_is_a_file(tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    line = _refused(["--run_dir", str(afile), "--stage", "pretrain", "--img_size", "32"], capsys)
    assert "is a file, not a directory" in line
    assert afile.read_text() == "x"


def test_eval_output_into_a_file_is_refused_before_evaluating(tmp_path, capsys):
    afile = tmp_path / "f"
    afile.write_text("x")
    ckpt = tmp_path / "stage"
    ckpt.mkdir()
    import numpy as np
    import tensorflow as tf

    prefix = tf.train.Checkpoint(v=tf.Variable(np.zeros(2, np.float32))).write(str(ckpt / "c"))
    line = _refused(["--ckpt_path", prefix, "--output", str(afile / "out.json")], capsys,
                    eval_cli.main)
    assert "--output" in line and "cannot create its folder" in line


# --------------------------------------------------------------------------- resuming


def _options(**changes):
    return resolve({"img_size": 32, **changes}, "pretrain")


def test_resume_with_other_model_or_data_is_refused_listing_the_keys(tmp_path):
    record_config(_options(), str(tmp_path), {})
    saved = (tmp_path / "config.json").read_text()
    with pytest.raises(UserError) as info:
        check_config_change(_options(img_size=64, width_multiplier=0.5, lr=0.1), str(tmp_path),
                            resuming=True)
    message = str(info.value)
    assert "img_size 32 -> 64" in message and "width_multiplier 1.0 -> 0.5" in message
    assert "lr" not in message.split("(")[1]  # only the model and data keys are listed
    assert (tmp_path / "config.json").read_text() == saved
    # Not resuming (no checkpoint yet): anything goes.
    assert check_config_change(_options(img_size=64), str(tmp_path), resuming=False) == {}


def test_resume_with_other_training_flags_needs_allow_and_is_recorded(tmp_path, capsys):
    first = _options()
    record_config(first, str(tmp_path), {})
    with pytest.raises(UserError, match=rf"lr {first.lr} -> 0.01.*--allow_config_change"):
        check_config_change(_options(lr=0.01), str(tmp_path), resuming=True)
    changed = _options(lr=0.01, seed=3, allow_config_change=True, progress=False)
    changes = check_config_change(changed, str(tmp_path), resuming=True)
    assert changes == {"lr": (first.lr, 0.01), "seed": (0, 3)}
    record_config(changed, str(tmp_path), changes)
    history = json.loads((tmp_path / "config_history.json").read_text())
    assert [h["changed"] for h in history] == [
        {}, {"lr": {"from": first.lr, "to": 0.01}, "seed": {"from": 0, "to": 3}}]
    assert history[0]["config"]["lr"] == first.lr and history[1]["config"]["lr"] == 0.01
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.01
    assert "resumes with changed flags" in capsys.readouterr().err
    # The same flags again: nothing to record.
    assert check_config_change(changed, str(tmp_path), resuming=True) == {}


def test_progress_bars_only_on_a_terminal(monkeypatch):
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

        def write(self, text):
            pass

    monkeypatch.setattr("sys.stderr", Stream(False))
    assert resolve({}, "pretrain").progress is False
    monkeypatch.setattr("sys.stderr", Stream(True))
    assert resolve({}, "pretrain").progress is True
    assert resolve({"progress": False}, "pretrain").progress is False
    assert isinstance(Options().progress, bool)
