"""Smoke tests of every stage at tiny size, eval.py outputs, resume, and bad input."""

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY

from adj_quant.checkpoints import ModelSpec, read_json, restore_model
from adj_quant.cli import evaluate as eval_cli
from adj_quant.cli import train as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(digits_run):
    return digits_run


def _load(stage_dir, which="best"):
    state = read_json(os.path.join(stage_dir, "checkpoints.json"))
    path = os.path.join(stage_dir, state[which])
    spec = ModelSpec.from_json(read_json(os.path.join(stage_dir, "model_spec.json")))
    model = spec.build()
    restore_model(model, path)
    return model, state


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
    qat8, _ = _load(run_dir / "qat8")
    assert all(np.all(q.bits().numpy() == 8) for q in qat8.quantizers().values()
               if not q.scope.endswith("bias_quant"))
    adj, adj_state = _load(run_dir / "adjustable")
    fin, fin_state = _load(run_dir / "finetune")
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
    fin, _ = _load(run_dir / "finetune")
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


def _run(args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kwargs)


def _tree_digest(path):
    h = hashlib.sha256()
    for f in sorted(glob.glob(os.path.join(path, "**"), recursive=True)):
        if os.path.isfile(f):
            h.update(f.encode())
            h.update(open(f, "rb").read())
    return h.hexdigest()


@pytest.mark.slow
def test_kill_and_resume_continues_exactly(tmp_path):
    args = ["train.py", "--stage", "pretrain", "--max_epoch", "0.5", *TINY]
    # Reference: an uninterrupted run.
    ref = _run([*args, "--run_dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    # Killed (SIGKILL) after its second checkpoint, then the same command again.
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *args, "--run_dir", str(run)], cwd=ROOT,
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
    resumed = _run([*args, "--run_dir", str(run)])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and f"(mini-epoch {killed_at})" in resumed.stdout
    final = read_json(state_file)
    assert final["checkpoints"][-1]["mini_epoch"] == 5
    a, _ = _load(tmp_path / "ref" / "pretrain", "latest")
    b, _ = _load(run / "pretrain", "latest")
    for va, vb in zip(a.trainable_variables, b.trainable_variables):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), rtol=1e-4, atol=1e-6, err_msg=va.name)


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


def test_bad_config_key_and_wrong_checkpoint(run_dir, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('img_size = 32\nlearning_rate = 0.1\n')
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--config", str(config), "--stage", "pretrain",
                        "--run_dir", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    # A checkpoint with another class count is refused, naming the mismatch.
    proc = _run(["train.py", "--stage", "qat8", "--run_dir", str(tmp_path / "r2"), *TINY,
                 "--num_classes", "12", "--ckpt_path", str(run_dir / "pretrain"),
                 "--teacher_ckpt", str(run_dir / "pretrain")])
    assert proc.returncode == 2 and "10 classes" in proc.stderr and "12" in proc.stderr
    # A thresholds file of another model is refused.
    bad = tmp_path / "thr.json"
    data = read_json(run_dir / "calibrate" / "initial_thresholds.json")
    data["Logits/weights"]["min"] = data["Logits/weights"]["min"][:3]
    bad.write_text(json.dumps(data))
    proc = _run(["eval.py", "--ckpt_path", str(run_dir / "pretrain"), "--thresholds", str(bad),
                 *TINY])
    assert proc.returncode == 2 and "Logits/weights min has 3 values" in proc.stderr


@pytest.mark.slow
def test_nan_loss_stops_with_last_good_checkpoint(tmp_path):
    run = tmp_path / "nan"
    proc = _run(["train.py", "--stage", "pretrain", "--run_dir", str(run), *TINY,
                 "--max_epoch", "0.3", "--lr", "1e30", "--lr_fixed"])
    assert proc.returncode == 2, proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the loss became" in errors[0]
    assert "last good checkpoint" in errors[0]
    assert "Traceback" not in proc.stderr
    state_file = run / "pretrain" / "checkpoints.json"
    if state_file.exists():  # whatever was saved before the divergence is intact and finite
        for entry in read_json(state_file)["checkpoints"]:
            assert np.isfinite(entry["top1"])
            assert os.path.exists(run / "pretrain" / f"{entry['name']}.index")
        assert not read_json(state_file)["finished"]


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
    current, _ = _load(run_dir / "qat8")
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
