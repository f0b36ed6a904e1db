"""Flags and config files: every impossible value is one line before anything is written,
and a resumed stage keeps its model, its data and a record of its flags."""

import argparse
import dataclasses
import json
import os

import pytest

from adj_quant.cli import evaluate as eval_cli
from adj_quant.cli import train as train_cli
from adj_quant.errors import UserError
from adj_quant.recipe import config as config_lib
from adj_quant.recipe.config import FIELDS, Options, check_config_change, record_config, resolve

FLOAT_FLAGS = [opt.name for opt in config_lib.SCHEMA if opt.type is float]


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


# --------------------------------------------------------------------------- the schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_flags_table_is_the_generated_one():
    text = open(os.path.join(ROOT, "docs", "method.md"), encoding="utf-8").read()
    begin = text.index("<!-- flags table: generated by adj_quant.recipe.config.flags_table()")
    begin = text.index("\n", begin) + 1
    end = text.index("<!-- end of flags table -->")
    assert text[begin:end].strip() == config_lib.flags_table().strip()
    for name in FIELDS:  # every option has its row
        assert f"| `--{name}` |" in text[begin:end]


def test_schema_derives_the_option_sets_it_replaced():
    # The lists config.py held before the schema, in their own words.
    assert set(config_lib.TRAINED_FIELDS) == {
        "dataset", "img_size", "num_classes", "labels_offset", "batch_size", "eval_crop",
        "model", "width_multiplier", "depth_multiplier", "weight_bits", "act_bits", "swish_bits",
        "bias_bits", "range", "bias_range", "quantize_se_gate", "quantizer", "calib_images",
        "metric_img_size", "seed"}
    assert set(config_lib.ARCH_DATA_FIELDS) == {
        "dataset", "img_size", "num_classes", "labels_offset", "eval_crop", "model",
        "width_multiplier", "depth_multiplier", "weight_bits", "act_bits", "swish_bits",
        "bias_bits", "bits_trainable", "range", "bias_range", "quantize_se_gate", "quantizer",
        "sparsity", "learned_sparsity"}  # the pruning options came after the schema: the
    # masks are the model's
    assert set(config_lib.UNCOMPARED_FIELDS) == {
        "progress", "config", "stage", "run_dir", "allow_config_change", "strategy",
        "logical_cpus", "worker_timeout"}
    assert set(config_lib.NON_NEGATIVE) == {
        "lr", "lr_bits", "lr_decay", "alpha", "beta", "metric", "warm_up_epoch", "swa_delay",
        "labels_offset", "seed", "keep_checkpoints", "collapse_patience",
        "sparsity", "prune_start"}  # the pruning options came after the schema
    assert config_lib.PRETRAIN_ONLY == {"dropout": 0.2, "drop_connect": 0.2}
    assert [f.name for f in dataclasses.fields(Options)] == list(FIELDS)
    assert {f.name: f.default for f in dataclasses.fields(Options)} == {
        o.name: o.default for o in config_lib.SCHEMA}


def test_choices_come_from_the_owning_modules():
    from adj_quant import cost, distribution, qnetwork, quantizers
    from adj_quant.quantizers.formula import BITS_GRAD_MODES
    from adj_quant.recipe import data

    assert config_lib.choices_of("bits_grad") == BITS_GRAD_MODES
    assert config_lib.choices_of("bias_range") == qnetwork.BIAS_RANGES
    assert config_lib.choices_of("quantizer") == quantizers.names() == ("adjq", "lsq")
    assert config_lib.choices_of("metric_style") == cost.STYLES
    assert config_lib.choices_of("strategy") == distribution.STRATEGIES
    assert config_lib.choices_of("augment") == data.AUGMENTATIONS


def test_parser_follows_the_schema(capsys):
    parser = config_lib.build_parser("train.py", "doc")
    actions = {a.dest: a for a in parser._actions if a.dest in FIELDS}  # noqa: SLF001
    assert set(actions) == set(FIELDS)
    for opt in config_lib.SCHEMA:
        action = actions[opt.name]
        assert action.option_strings[0] == f"--{opt.name}"
        assert action.help.startswith(opt.help.replace("%", "%%"))
        if opt.type is bool:
            assert isinstance(action, argparse.BooleanOptionalAction)
            assert action.option_strings == [f"--{opt.name}", f"--no-{opt.name}"]
        else:
            assert action.type is opt.type
            assert action.choices == opt.resolved_choices()
        if opt.default is not None:
            assert action.help.endswith(f" (default: {opt.default})")
    # Unset flags stay unset (the config file's values then apply).
    assert train_cli.parse([]) == {}
    assert train_cli.parse(["--no-quantize_se_gate"]) == {"quantize_se_gate": False}


def test_place_defaults_per_stage():
    for stage in (None, *config_lib.STAGES):
        o = resolve({"dataset": "synthetic"}, stage)
        assert o.dropout == o.drop_connect == (0.2 if stage == "pretrain" else 0.0)
        assert o.augment == (None if stage in (None, "pretrain") else "none")
    assert resolve({"dataset": "synthetic", "dropout": 0.1}, "qat8").dropout == 0.1


@pytest.mark.parametrize("kwargs", [
    {}, {"swish_bits": 0, "bias_bits": 0, "bits_trainable": True, "range": 3, "sparsity": 0.5},
    {"swish_bits": -1, "bias_range": "calibrated", "quantize_se_gate": False,
     "quantizer": "lsq", "weight_bits": 4, "bits_grad": "scale_only"},
])
def test_quant_config_is_built_by_field_name(kwargs):
    from adj_quant.qnetwork import QuantConfig, SwishMode

    o = resolve({"dataset": "synthetic", **kwargs}, "qat8")
    qcfg = QuantConfig.from_options(o)
    for field in dataclasses.fields(QuantConfig):
        if field.name == "pruned":  # derived: masks when the stage prunes
            assert qcfg.pruned is (o.sparsity > 0)
            continue
        assert getattr(qcfg, field.name) == getattr(o, {"range_preset": "range"}.get(
            field.name, field.name))
    assert QuantConfig.from_options(o, bits_trainable=False).bits_trainable is False
    # The flag values mean: swish 8 fixed / 0 trainable / -1 float, bias 0 float.
    assert qcfg.swish is o.swish_mode is {8: SwishMode.FIXED8, 0: SwishMode.TRAINABLE,
                                          -1: SwishMode.FLOAT}[o.swish_bits]
    assert qcfg.quantized_bias_bits == o.quantized_bias_bits == (
        None if o.bias_bits == 0 else o.bias_bits)


def test_options_with_default_values_give_the_default_quant_config():
    from adj_quant.qnetwork import QuantConfig

    assert QuantConfig.from_options(Options()) == QuantConfig()


def test_config_json_keeps_the_flag_values_and_resumes(tmp_path):
    o = resolve({"dataset": "synthetic", "swish_bits": -1, "bias_bits": 0}, "qat8")
    record_config(o, str(tmp_path), {})
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["swish_bits"] == -1 and saved["bias_bits"] == 0
    assert check_config_change(o, str(tmp_path), resuming=True) == {}
    # The saved file, read as the trained-with options, builds the same options again.
    again = resolve({**config_lib.trained_config(str(tmp_path / "ckpt")), "dataset": "synthetic"},
                    "qat8")
    assert again.swish_bits == -1 and again.bias_bits == 0
