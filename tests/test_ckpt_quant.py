"""Checkpoint quantizer: formulas against hand-computed values, checkpoint round trips, CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from adj_quant.ckpt_quant import (
    bin_quantize,
    fixed_point_quantize,
    relative_error,
    uint8_dequantize,
    uint8_quantize,
)
from adj_quant.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = "adj_quant.tools.quantize_checkpoint"


# ---------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------


def test_bin_closed_last_bin_hand_computed():
    # lo=0, hi=4, 2 bits -> w=1, bins [0,1) [1,2) [2,3) [3,4]; the max goes to the last centre.
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(bin_quantize(x, 2), [0.5, 1.5, 2.5, 3.5, 3.5])
    # lo=-1, hi=1, 1 bit -> w=1, bins [-1,0) [0,1]
    x = np.array([-1.0, -0.25, 0.0, 0.5, 1.0])
    np.testing.assert_array_equal(bin_quantize(x, 1), [-0.5, -0.5, 0.5, 0.5, 0.5])
    # dtype is preserved, shape too
    x32 = np.array([[0.0, 0.9], [2.2, 4.0]], np.float32)
    out = bin_quantize(x32, 2)
    assert out.dtype == np.float32 and out.shape == (2, 2)
    np.testing.assert_array_equal(out, np.array([[0.5, 0.5], [2.5, 3.5]], np.float32))


def test_bin_constant_and_zero_tensors():
    c = np.full((3, 4), 0.123, np.float32)
    np.testing.assert_array_equal(bin_quantize(c, 3), c)
    z = np.zeros(5, np.float32)
    np.testing.assert_array_equal(bin_quantize(z, 4), z)
    assert relative_error(z, bin_quantize(z, 4)) == 0.0
    assert relative_error(z, z + 1.0) == 0.0  # all-zero reference: 0, never NaN


def test_fixed_point_saturates_both_sides():
    # m=|max|=1 -> s=0, int_bits=1, sign=1, f=4-1-1=2, q in [-7, 7]
    # -3*4=-12 -> -7 (negative saturation), 0.5*4=2, 1*4=4
    x = np.array([-3.0, 0.5, 1.0])
    np.testing.assert_array_equal(fixed_point_quantize(x, 4), [-1.75, 0.5, 1.0])
    # unsigned: m=1.99 -> int_bits=1, f=3-1=2, q in [-7, 7]; 1.99*4=7.96 -> 8 -> 7
    np.testing.assert_array_equal(fixed_point_quantize(np.array([0.0, 1.99]), 3), [0.0, 1.75])
    # round half to even: m=3 -> int_bits=2, sign=0, f=4-2=2; 0.625*4=2.5 -> 2, 0.875*4=3.5 -> 4
    np.testing.assert_array_equal(fixed_point_quantize(np.array([0.625, 0.875, 3.0]), 4), [0.5, 1.0, 3.0])


def test_fixed_point_negative_fractional_bits():
    # m=1000 -> int_bits=10, sign=1, f=4-10-1=-7 (steps of 128), q in [-7, 7]
    # 1000/128=7.81 -> 8 -> 7 -> 896; 250/128=1.95 -> 2 -> 256; -500/128=-3.9 -> -4 -> -512
    x = np.array([1000.0, 250.0, -500.0])
    np.testing.assert_array_equal(fixed_point_quantize(x, 4), [896.0, 256.0, -512.0])


def test_fixed_point_decimal_preshift():
    # m=0.03 -> 0.3 -> 3 (s=2), int_bits=2, sign=1, f=8-2-1=5: q = rint(x*100*32)
    # 0.03 -> 96 -> 0.03; -0.012 -> -38.4 -> -38 -> -38/3200 = -0.011875
    x = np.array([0.03, -0.012, 0.0])
    np.testing.assert_allclose(fixed_point_quantize(x, 8), [0.03, -0.011875, 0.0], rtol=0, atol=1e-15)
    z = np.zeros(4, np.float32)
    np.testing.assert_array_equal(fixed_point_quantize(z, 8), z)


def test_bits_ranges():
    with pytest.raises(UserError, match="1..16"):
        bin_quantize(np.ones(3), 17)
    with pytest.raises(UserError, match="2..32"):
        fixed_point_quantize(np.ones(3), 1)
    with pytest.raises(UserError, match="NaN or Inf"):
        bin_quantize(np.array([1.0, np.nan]), 4)


def test_reference_errors_normal_005():
    x = np.random.default_rng(0).normal(0.0, 0.05, 4096).astype(np.float32)
    e8 = relative_error(x, bin_quantize(x, 8))
    e4 = relative_error(x, bin_quantize(x, 4))
    assert 0.70 < e8 < 0.95, e8  # reference ~0.82 %
    assert 11.5 < e4 < 14.5, e4  # reference ~13 %
    assert relative_error(x, fixed_point_quantize(x, 8)) < 2.0


def test_uint8_hand_computed_and_zero_exact():
    # lo=-1, hi=2, s=85: q = rha(85x) + 85 -> [0, 85, 111 (25.5 -> 26), 255]
    x = np.array([-1.0, 0.0, 0.3, 2.0], np.float32)
    q, lo, hi = uint8_quantize(x)
    assert q.dtype == np.uint8
    np.testing.assert_array_equal(q, [0, 85, 111, 255])
    assert (lo, hi) == (-1.0, 2.0)
    xhat = uint8_dequantize(q, lo, hi)
    assert xhat[1] == 0.0
    np.testing.assert_allclose(xhat, [-1.0, 0.0, 26 / 85, 2.0], rtol=1e-6)
    # positive-only tensor: lo is clamped to 0, zero still exact
    q, lo, hi = uint8_quantize(np.array([0.0, 0.5, 3.0]))
    assert lo == 0.0 and q[0] == 0 and uint8_dequantize(q, lo, hi)[0] == 0.0
    # random data: every zero comes back as exactly zero
    rng = np.random.default_rng(1)
    w = rng.normal(0.1, 0.05, 2000).astype(np.float32)
    w[::7] = 0.0
    q, lo, hi = uint8_quantize(w)
    back = uint8_dequantize(q, lo, hi)
    assert np.all(back[::7] == 0.0)
    assert relative_error(w, back) < 1.0
    # lo*s = -0.5*85 = -42.5 rounds away from zero to -43: q = [0, 43, 256 -> 255]
    q, lo, hi = uint8_quantize(np.array([-0.5, 0.0, 2.5]))
    np.testing.assert_array_equal(q, [0, 43, 255])
    np.testing.assert_allclose(uint8_dequantize(q, lo, hi), [-43 / 85, 0.0, 212 / 85], rtol=1e-6)
    assert uint8_dequantize(q, lo, hi)[1] == 0.0
    # all-zero tensor
    q, lo, hi = uint8_quantize(np.zeros(3))
    assert np.all(uint8_dequantize(q, lo, hi) == 0.0)


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------

SLIM = "resnet_v1_50"


def _slim_values(big=False):
    rng = np.random.default_rng(3)
    n = 64 if big else 8
    w = rng.normal(0, 0.05, (3, 3, n, n)).astype(np.float32)
    w[0, 0, 0, :] = 0.0
    return {
        f"{SLIM}/conv1/weights": w,
        f"{SLIM}/conv1/weights/Momentum": rng.normal(0, 1e-3, w.shape).astype(np.float32),
        f"{SLIM}/conv1/BatchNorm/gamma": rng.uniform(0.5, 1.5, n).astype(np.float32),
        f"{SLIM}/conv1/BatchNorm/beta": rng.normal(0, 0.1, n).astype(np.float32),
        f"{SLIM}/conv1/BatchNorm/moving_mean": rng.normal(0, 0.3, n).astype(np.float32),
        f"{SLIM}/conv1/BatchNorm/moving_variance": rng.uniform(0.1, 2.0, n).astype(np.float32),
        f"{SLIM}/logits/weights": rng.normal(0, 0.05, (1, 1, n, 10)).astype(np.float32),
        f"{SLIM}/logits/biases": rng.normal(0, 0.01, 10).astype(np.float32),
        "global_step": np.array(1234, np.int64),
    }


QUANTIZED = {"conv1/weights", "conv1/BatchNorm/gamma", "conv1/BatchNorm/beta", "logits/weights", "logits/biases"}


def _write_slim(directory, values, name="model.ckpt-100"):
    import tensorflow as tf

    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(str(directory), name)
    names = sorted(values)
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.constant(values[k]) for k in names],
    )
    return prefix


def _run_tool(*args):
    return subprocess.run(
        [sys.executable, "-m", TOOL, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": REPO},
    )


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert proc.stdout == ""


def test_slim_round_trip_bin(tmp_path, capsys):
    import tensorflow as tf

    from adj_quant.tools.quantize_checkpoint import main

    values = _slim_values()
    prefix = _write_slim(tmp_path / "run", values)
    assert main([prefix, "--algorithm", "bin", "--bits", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    outdir = tmp_path / "run" / "bin_4bits"
    assert out["output"] == str(outdir / "model.ckpt-100")
    assert tf.train.latest_checkpoint(str(outdir)) == out["output"]
    assert out["num_quantized"] == len(QUANTIZED) and out["num_copied"] == len(values) - len(QUANTIZED)
    assert set(out["errors"]) == {f"{SLIM}/{k}" for k in QUANTIZED}
    assert out["min_error"] <= out["avg_error"] <= out["max_error"]
    assert out["avg_error"] == pytest.approx(np.mean(list(out["errors"].values())))

    reader = tf.train.load_checkpoint(out["output"])
    orig = tf.train.load_checkpoint(prefix)
    assert reader.get_variable_to_shape_map() == orig.get_variable_to_shape_map()
    assert reader.get_variable_to_dtype_map() == orig.get_variable_to_dtype_map()
    for key, v in values.items():
        got = reader.get_tensor(key)
        if key in out["errors"]:
            np.testing.assert_array_equal(got, bin_quantize(v, 4))
            assert out["errors"][key] == pytest.approx(relative_error(v, got))
            assert not np.array_equal(got, v) or key.endswith("gamma")
        else:
            assert got.dtype == v.dtype and got.tobytes() == v.tobytes(), key  # bit-identical

    # the output exists now: refused without --overwrite, replaced with it
    with pytest.raises(SystemExit) as exc:
        main([prefix, "--algorithm", "bin", "--bits", "4"])
    assert exc.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([str(tmp_path / "run"), "--algorithm", "fixed-point", "--bits", "6", "--output",
                 str(outdir), "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "Processed 9 variables" in text and "Min error:" in text and "Avg error:" in text
    w = tf.train.load_checkpoint(str(outdir / "model.ckpt-100")).get_tensor(f"{SLIM}/conv1/weights")
    np.testing.assert_array_equal(w, fixed_point_quantize(values[f"{SLIM}/conv1/weights"], 6))
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []  # no temp dirs left


def test_no_trainable_and_uint8_bits(tmp_path, capsys):
    from adj_quant.tools.quantize_checkpoint import main

    prefix = _write_slim(tmp_path, {"global_step": np.array(5, np.int64),
                                    "bn/moving_mean": np.ones(3, np.float32)})
    with pytest.raises(SystemExit) as exc:
        main([prefix, "--algorithm", "bin", "--bits", "8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no trainable float variables" in err and prefix in err
    with pytest.raises(SystemExit):
        main([prefix, "--algorithm", "uint8", "--bits", "4"])
    assert "omit --bits" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty_dir_missing"), "--algorithm", "bin", "--bits", "8"])
    assert "checkpoint not found" in capsys.readouterr().err


def test_uint8_checkpoint_smaller_and_loadable(tmp_path, capsys):
    import tensorflow as tf

    from adj_quant.ckpt_quant import load_uint8_checkpoint, uint8_to_float_checkpoint
    from adj_quant.tools.quantize_checkpoint import main

    values = _slim_values(big=True)
    prefix = _write_slim(tmp_path / "run", values)
    assert main([prefix, "--algorithm", "uint8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["output"] == str(tmp_path / "run" / "uint8" / "model.ckpt-100") and out["bits"] == 8

    def data_bytes(p):
        return sum(os.path.getsize(f) for f in tf.io.gfile.glob(p + ".data-*"))

    quant_bytes = sum(values[f"{SLIM}/{k}"].nbytes for k in QUANTIZED)
    copied_bytes = sum(v.nbytes for k, v in values.items() if k[len(SLIM) + 1:] not in QUANTIZED)
    ratio = quant_bytes / (data_bytes(out["output"]) - copied_bytes)
    assert 3.8 < ratio <= 4.0, ratio  # the quantized part is about a quarter of its float size

    reader = tf.train.load_checkpoint(out["output"])
    w_key = f"{SLIM}/conv1/weights"
    assert reader.get_variable_to_dtype_map()[w_key] == tf.uint8
    assert reader.get_variable_to_dtype_map()[w_key + "/quant_min"] == tf.float32

    loaded = load_uint8_checkpoint(os.path.dirname(out["output"]))
    assert set(loaded) == set(values)
    w = values[w_key]
    np.testing.assert_array_equal(loaded[w_key], uint8_dequantize(*uint8_quantize(w)))
    assert loaded[w_key].dtype == np.float32
    assert np.all(loaded[w_key][0, 0, 0, :] == 0.0)  # zeros stay exactly zero
    assert relative_error(w, loaded[w_key]) == pytest.approx(out["errors"][w_key])
    assert loaded["global_step"] == 1234

    back = uint8_to_float_checkpoint(out["output"], tmp_path / "float")
    r2 = tf.train.load_checkpoint(back)
    assert r2.get_variable_to_dtype_map() == tf.train.load_checkpoint(prefix).get_variable_to_dtype_map()
    np.testing.assert_array_equal(r2.get_tensor(w_key), loaded[w_key])


def test_tf2_object_checkpoint_round_trip(tmp_path, capsys):
    import tensorflow as tf

    from adj_quant.tools.quantize_checkpoint import main

    rng = np.random.default_rng(5)
    kernel = rng.normal(0, 0.05, (16, 8)).astype(np.float32)
    bias = rng.normal(0, 0.01, 8).astype(np.float64)
    ckpt = tf.train.Checkpoint(
        v=tf.Variable(kernel),
        layer=tf.Module(),
        step=tf.Variable(7, dtype=tf.int64),
    )
    ckpt.layer.bias = tf.Variable(bias)
    ckpt.layer.moving_mean = tf.Variable(np.arange(8, dtype=np.float32) / 3)
    prefix = ckpt.save(str(tmp_path / "tf2" / "ckpt"))

    assert main([str(tmp_path / "tf2"), "--algorithm", "bin", "--bits", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["output"] == os.path.join(str(tmp_path / "tf2" / "bin_8bits"), os.path.basename(prefix))
    assert set(out["errors"]) == {"v/.ATTRIBUTES/VARIABLE_VALUE", "layer/bias/.ATTRIBUTES/VARIABLE_VALUE"}
    assert 0.5 < out["errors"]["v/.ATTRIBUTES/VARIABLE_VALUE"] < 1.2

    new = tf.train.Checkpoint(v=tf.Variable(np.zeros_like(kernel)), layer=tf.Module(),
                              step=tf.Variable(0, dtype=tf.int64))
    new.layer.bias = tf.Variable(np.zeros_like(bias))
    new.layer.moving_mean = tf.Variable(np.zeros(8, np.float32))
    new.restore(tf.train.latest_checkpoint(str(tmp_path / "tf2" / "bin_8bits"))).assert_consumed()
    np.testing.assert_array_equal(new.v.numpy(), bin_quantize(kernel, 8))
    assert new.layer.bias.dtype == tf.float64
    np.testing.assert_array_equal(new.layer.bias.numpy(), bin_quantize(bias, 8))
    np.testing.assert_array_equal(new.layer.moving_mean.numpy(), np.arange(8, dtype=np.float32) / 3)
    assert int(new.step.numpy()) == 7
    assert int(new.save_counter.numpy()) == 1


def test_keras_model_with_optimizer(tmp_path, capsys):
    """Keras 3 lists model weights under optimizer/_trainable_variables and slots under _variables."""
    import tensorflow as tf

    from adj_quant.tools.quantize_checkpoint import main

    def build():
        model = tf.keras.Sequential([tf.keras.Input((6,)), tf.keras.layers.Dense(4),
                                     tf.keras.layers.BatchNormalization()])
        opt = tf.keras.optimizers.SGD(momentum=0.9)
        opt.build(model.trainable_variables)
        return model, opt

    model, opt = build()
    rng = np.random.default_rng(7)
    for var in model.variables + opt.variables:
        if var.dtype == tf.float32:
            var.assign(rng.normal(0, 0.1, var.shape).astype(np.float32))
    prefix = tf.train.Checkpoint(model=model, optimizer=opt).write(str(tmp_path / "k" / "ckpt"))
    assert main([prefix, "--algorithm", "bin", "--bits", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_quantized"] == 4  # kernel, bias, gamma, beta; not moving stats, momentums, lr

    model2, opt2 = build()
    tf.train.Checkpoint(model=model2, optimizer=opt2).read(out["output"]).assert_consumed()
    for a, b in zip(model.trainable_variables, model2.trainable_variables):
        np.testing.assert_array_equal(b.numpy(), bin_quantize(a.numpy(), 3))
    for a, b in zip(model.non_trainable_variables + opt.variables,
                    model2.non_trainable_variables + opt2.variables):
        np.testing.assert_array_equal(b.numpy(), a.numpy())


def test_cli_errors_subprocess(tmp_path):
    missing = tmp_path / "nope" / "model.ckpt-1"
    _assert_one_line_error(_run_tool(missing, "--algorithm", "bin", "--bits", "8"), "checkpoint not found", str(missing))
    _assert_one_line_error(_run_tool(missing, "--algorithm", "bin", "--bits", "17"), "--bits 17", "1..16")
    _assert_one_line_error(_run_tool(missing, "--algorithm", "fixed-point", "--bits", "1"), "--bits 1", "2..32")
    _assert_one_line_error(_run_tool(missing, "--algorithm", "bin"), "--bits is required")
    proc = _run_tool(missing, "--algorithm", "ternary", "--bits", "8")
    _assert_one_line_error(proc, "invalid choice", "ternary")


def test_cli_subprocess_success_then_exists(tmp_path):
    prefix = _write_slim(tmp_path, _slim_values())
    ok = _run_tool(prefix, "--algorithm", "bin", "--bits", "8")
    assert ok.returncode == 0, ok.stderr
    assert "Traceback" not in ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0].startswith("Processed 9 variables: 5 quantized, 4 copied")
    assert lines[1] == "Output: " + str(tmp_path / "bin_8bits" / "model.ckpt-100")
    assert [line.split(":")[0] for line in lines[2:]] == ["Min error", "Max error", "Avg error"]
    assert all(line.endswith("%") for line in lines[2:])
    again = _run_tool(prefix, "--algorithm", "bin", "--bits", "8")
    _assert_one_line_error(again, "already exists", "--overwrite", str(tmp_path / "bin_8bits"))


def test_old_quantizer_form(tmp_path, capsys):
    import tensorflow as tf

    sys.path.insert(0, REPO)
    try:
        import quantizer
    finally:
        sys.path.remove(REPO)
    values = _slim_values()
    prefix = _write_slim(tmp_path, values)
    assert quantizer.main(["50", prefix, "10", "2", "8"]) == 0
    captured = capsys.readouterr()
    assert "--algorithm fixed-point --bits 8" in captured.err
    w = tf.train.load_checkpoint(str(tmp_path / "fixed-point_8bits" / "model.ckpt-100")).get_tensor(
        f"{SLIM}/logits/weights")
    np.testing.assert_array_equal(w, fixed_point_quantize(values[f"{SLIM}/logits/weights"], 8))
    for argv, needle in ((["34", prefix, "10", "1", "8"], "NETWORK"),
                         (["101", prefix, "ten", "1", "8"], "NUM_CLASSES"),
                         (["101", prefix, "10", "3", "8"], "ALGORITHM")):
        with pytest.raises(SystemExit) as exc:
            quantizer.main(argv)
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err
