"""Issue 28, part 5: the messages of ``--range 0`` and of ``eval.py --thresholds`` with a
missing file are one line that says it once; the output folders of eval.py and
adjq-quantize-checkpoint are created (the project's one rule for output paths)."""

import os

import numpy as np
import pytest

from adj_quant.cli import evaluate as eval_cli
from adj_quant.cli import quantize_checkpoint as quantize_cli
from adj_quant.cli import train as train_cli


def _refused(argv, capsys, main):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("value", ["0", "8", "-1"])
def test_an_unknown_range_preset_names_the_flag(value, capsys, tmp_path):
    line = _refused(["--range", value, "--stage", "pretrain", "--run_dir", str(tmp_path)],
                    capsys, train_cli.main)
    assert line == (f"error: --range {value} is not a preset; choose one of "
                    "1, 2, 3, 4, 5, 6, 7")
    assert os.listdir(tmp_path) == []


def test_eval_with_a_missing_thresholds_file_says_so_once(capsys, tmp_path):
    missing = tmp_path / "calibrate" / "initial_thresholds.json"
    line = _refused(["--ckpt_path", str(tmp_path / "pretrain"), "--thresholds", str(missing),
                     "--no-progress"], capsys, eval_cli.main)
    assert line.startswith(f"error: --thresholds {missing} not found; ")
    assert line.count("first") <= 1 and "--thresholds out" in line


def test_quantize_checkpoint_creates_the_missing_folders_of_its_output(tmp_path, capsys):
    import tensorflow as tf

    v = tf.Variable(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), name="w")
    prefix = tf.train.Checkpoint(w=v).write(str(tmp_path / "ckpt" / "model"))
    out = tmp_path / "new" / "folders" / "q"
    assert quantize_cli.main([prefix, "--algorithm", "bin", "--bits", "8", "--output",
                              str(out)]) == 0
    assert (out / "checkpoint").exists()
    reader = tf.train.load_checkpoint(str(out))
    names = [n for n in reader.get_variable_to_shape_map() if n.startswith("w/")]
    assert names  # the variable is there, quantized to 256 levels of its range
    got = reader.get_tensor(names[0])
    assert got.shape == (3, 4) and len(np.unique(got)) <= 256
