"""Smoke tests of every stage at tiny size, eval.py outputs, resume, and bad input."""

import glob
import hashlib
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY, load_stage_model

from adj_quant.checkpoints import ModelSpec, read_json
from adj_quant.cli import evaluate as eval_cli
from adj_quant.cli import train as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(digits_run):
    return digits_run


def test_every_stage_writes_its_outputs(run_dir):
    for stage in ("pretrain", "calibrate", "qat8", "adjustable", "finetune"):
        assert os.path.exists(run_dir / stage / "result.json"), stage
        config = json.loads((run_dir / stage / "config.json").read_text())
        assert config["img_size"] == 32 and config["width_multiplier"] == 0.25
    state = read_json(run_dir / "pretrain" / "checkpoints.json")
    assert [e["mini_epoch"] for e in state["checkpoints"]][-3:] == [58, 59, 60]
    assert state["best"] in [e["name"] for e in state["checkpoints"]]
    assert state["checkpoints"][-1]["name"].startswith("me0060_metric")
    assert "_top1-" in state["checkpoints"][-1]["name"]
    assert len(glob.glob(str(run_dir / "pretrain" / "me*.index"))) <= 4  # best + 3 latest
    assert tf.train.latest_checkpoint(str(run_dir / "pretrain")).endswith(state["latest"])
    calib = read_json(run_dir / "calibrate" / "result.json")
    assert 0 <= calib["initial_thresholds_top1"] <= 1 and calib["calibration_images"] == 256
    thresholds = read_json(run_dir / "calibrate" / "initial_thresholds.json")
    assert "expanded_conv_1/project/input" in thresholds and "Conv/swish_input" in thresholds


def test_qat8_keeps_8_bits_and_finetune_freezes_learned_bits(run_dir):
    qat8, _ = load_stage_model(run_dir / "qat8")
    assert all(np.all(q.bits().numpy() == 8) for q in qat8.quantizers().values()
               if not q.scope.endswith("bias_quant"))
    adj, adj_state = load_stage_model(run_dir / "adjustable")
    fin, fin_state = load_stage_model(run_dir / "finetune")
    adj_bits = {n: q.bits().numpy() for n, q in adj.quantizers().items()}
    fin_bits = {n: q.bits().numpy() for n, q in fin.quantizers().items()}
    assert adj_bits.keys() == fin_bits.keys()
    for name in adj_bits:
        np.testing.assert_array_equal(adj_bits[name], fin_bits[name], err_msg=name)
    # The metric term at a low target pushed bits down during the adjustable stage.
    assert min(float(np.mean(b)) for n, b in adj_bits.items() if n.endswith("/weights")) < 8
    # SWA: the last checkpoint is the average and is the best pointer.
    assert fin_state["best"].startswith("swa_") and fin_state["latest"] == fin_state["best"]


def test_tensorboard_has_scalars_histograms_image_and_hparams(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "adjustable"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    tensors = set(tags["tensors"])
    for tag in ("loss/kd", "loss/cross_entropy", "loss/metric", "lr/weights", "val/top1",
                "val/score_adjq", "val/score_micronet", "val/params", "val/ops",
                "val/avg_weight_bits", "val/avg_act_bits", "bits/weights", "bits/per_layer"):
        assert tag in tensors, tag
    assert "_hparams_/session_start_info" in tensors


def test_eval_prints_scores_and_writes_quant_info(run_dir, tmp_path, capsys):
    plot = tmp_path / "bits.png"
    eval_cli.main(["--ckpt_path", str(run_dir / "finetune"), "--output", str(tmp_path),
                   "--plot", str(plot), "--no-progress"])
    out = capsys.readouterr().out
    for needle in ("top-1:", "top-5:", "score_micronet", "score_adjq", "params:", "ops:"):
        assert needle in out
    info = json.loads((tmp_path / "quant_info.json").read_text())
    assert set(info["summary"]) == {"avg_weight_bits", "avg_act_bits", "params", "ops",
                                    "score_adjq", "score_micronet", "top1", "top5"}
    fin, _ = load_stage_model(run_dir / "finetune")
    np.testing.assert_array_equal(info["expanded_conv_1"]["dws"]["weight"],
                                  fin.layers["expanded_conv_1/dws"].weight_quant.bits().numpy())
    np.testing.assert_array_equal(info["Logits"]["act"],
                                  fin.layers["Logits"].act_quant.bits().numpy())
    assert info["expanded_conv"]["expand"] is None and info["Conv"]["act"] == 8
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_float_checkpoint(run_dir, tmp_path, capsys):
    eval_cli.main(["--ckpt_path", str(run_dir / "pretrain"), "--float", "--json",
                   "--output", str(tmp_path), "--no-progress"])
    result = json.loads(capsys.readouterr().out)
    assert result["avg_weight_bits"] == 32 and 0 <= result["top1"] <= 1
    best = read_json(run_dir / "pretrain" / "checkpoints.json")
    best_entry = [e for e in best["checkpoints"] if e["name"] == best["best"]][0]
    assert result["top1"] == pytest.approx(best_entry["top1"])


def _tree_digest(path):
    h = hashlib.sha256()
    for f in sorted(glob.glob(os.path.join(path, "**"), recursive=True)):
        if os.path.isfile(f):
            h.update(f.encode())
            h.update(open(f, "rb").read())
    return h.hexdigest()


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "/no/such/dir"], "/no/such/dir"),
    (["--bogus_flag", "1"], "unrecognized arguments: --bogus_flag"),
    (["--weight_bits", "9"], "--weight_bits 9"),
    (["--bits_grad", "both"], "invalid choice: 'both'"),
    (["--augment", "flip"], "invalid choice: 'flip'"),
    (["--eval_crop", "1.5"], "--eval_crop 1.5"),
    (["--dropout", "1"], "--dropout 1.0 must be in [0, 1)"),
])
def test_bad_input_one_line_and_outputs_untouched(run_dir, extra, message, capsys):
    before = _tree_digest(str(run_dir))
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--stage", "adjustable", "--run_dir", str(run_dir), *TINY, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert _tree_digest(str(run_dir)) == before


def test_bad_config_key_and_wrong_checkpoint(run_dir, tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('img_size = 32\nlearning_rate = 0.1\n')
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--config", str(config), "--stage", "pretrain",
                        "--run_dir", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    # A checkpoint with another class count is refused, naming the mismatch.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--stage", "qat8", "--run_dir", str(tmp_path / "r2"), *TINY,
                        "--num_classes", "12", "--ckpt_path", str(run_dir / "pretrain"),
                        "--teacher_ckpt", str(run_dir / "pretrain")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "10 classes" in err and "12" in err
    # A thresholds file of another model is refused.
    bad = tmp_path / "thr.json"
    data = read_json(run_dir / "calibrate" / "initial_thresholds.json")
    data["Logits/weights"]["min"] = data["Logits/weights"]["min"][:3]
    bad.write_text(json.dumps(data))
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["--ckpt_path", str(run_dir / "pretrain"), "--thresholds", str(bad), *TINY])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Logits/weights min has 3 values" in err


def test_checkpoint_from_before_the_se_gate_quantizer_still_evaluates(run_dir, tmp_path, capsys):
    """A quantized stage written before the SE-gate quantizer, live bias ranges and
    --bits_grad existed (model_spec.json without those keys, no sigmoid_quant variables)
    is rebuilt as it was trained, says so in one line, and evaluates to the same top-1."""
    from adj_quant.qnetwork import QuantConfig

    new_spec = read_json(run_dir / "qat8" / "model_spec.json")
    old_quant = {k: v for k, v in new_spec["quant"].items() if k not in QuantConfig.LEGACY}
    legacy = ModelSpec.from_json({**new_spec, "quant": {**old_quant, **QuantConfig.LEGACY}})
    model = legacy.build()
    assert not model.gate_quant and all(
        not layer.bias_quant.live_range for layer in model.layers.values() if layer.bias_quant)
    current, _ = load_stage_model(run_dir / "qat8")
    from adj_quant.checkpoints import checkpoint_keys

    current_vars = checkpoint_keys(current)
    for key, var in checkpoint_keys(model).items():  # the old model's variables only
        var.assign(current_vars[key])
    old = tmp_path / "old_qat8"
    old.mkdir()
    prefix = tf.train.Checkpoint(model=model).write(str(old / "ckpt"))
    (old / "model_spec.json").write_text(json.dumps({**new_spec, "quant": old_quant}))
    capsys.readouterr()
    eval_cli.main(["--ckpt_path", prefix, *TINY, "--json", "--output", str(tmp_path)])
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "quantize_se_gate=False" in notes[0], err
    result = json.loads(out)
    from adj_quant.recipe import validation
    from adj_quant.recipe.config import resolve
    from adj_quant.recipe.data import validation_data

    o = resolve({"img_size": 32, "max_val_images": 360}, None)
    expected = validation.accuracy(model, validation_data(o, 10), progress=False,
                                   max_images=360)["top1"]
    assert result["top1"] == pytest.approx(expected)


@pytest.mark.parametrize("cli", [train_cli, eval_cli])
def test_help_lists_every_flag_with_its_choices(cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--eval_crop" in text
    if cli is train_cli:
        assert "--bits_grad {original,scale_only}" in text and "k % iter_train_freq" in text
