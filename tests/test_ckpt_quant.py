"""Checkpoint quantizer: formulas against hand-computed values, checkpoint round trips, CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_main

from adj_quant.errors import UserError
from adj_quant.seed_quantizers.formulas import (
    bin_quantize,
    fixed_point_quantize,
    relative_error,
    uint8_dequantize,
    uint8_quantize,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = "adj_quant.cli.quantize_checkpoint"


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
    np.testing.assert_array_equal(
        fixed_point_quantize(np.array([0.625, 0.875, 3.0]), 4), [0.5, 1.0, 3.0]
    )


def test_fixed_point_negative_fractional_bits():
    # m=1000 -> int_bits=10, sign=1, f=4-10-1=-7 (steps of 128), q in [-7, 7]
    # 1000/128=7.81 -> 8 -> 7 -> 896; 250/128=1.95 -> 2 -> 256; -500/128=-3.9 -> -4 -> -512
    x = np.array([1000.0, 250.0, -500.0])
    np.testing.assert_array_equal(fixed_point_quantize(x, 4), [896.0, 256.0, -512.0])


def test_fixed_point_decimal_preshift():
    # m=0.03 -> 0.3 -> 3 (s=2), int_bits=2, sign=1, f=8-2-1=5: q = rint(x*100*32)
    # 0.03 -> 96 -> 0.03; -0.012 -> -38.4 -> -38 -> -38/3200 = -0.011875
    x = np.array([0.03, -0.012, 0.0])
    np.testing.assert_allclose(
        fixed_point_quantize(x, 8), [0.03, -0.011875, 0.0], rtol=0, atol=1e-15
    )
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


QUANTIZED = {
    "conv1/weights",
    "conv1/BatchNorm/gamma",
    "conv1/BatchNorm/beta",
    "logits/weights",
    "logits/biases",
}
# uint8 with the default --min_size 1024: only conv1/weights (3*3*64*64) of
# _slim_values(big=True) is that large; logits/weights (640), gamma, beta (64) and biases (10)
# stay float.
UINT8_QUANTIZED = {"conv1/weights"}


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


def _run_tool_in_process(*args):
    """The tool's ``main`` in this process (no TensorFlow start-up per call), with the exit
    code, stdout and stderr of a finished process."""
    from adj_quant.cli.quantize_checkpoint import main

    return run_main(main, args)


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

    from adj_quant.cli.quantize_checkpoint import main

    values = _slim_values()
    prefix = _write_slim(tmp_path / "run", values)
    assert main([prefix, "--algorithm", "bin", "--bits", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    outdir = tmp_path / "run" / "bin_4bits"
    assert out["output"] == str(outdir / "model.ckpt-100")
    assert tf.train.latest_checkpoint(str(outdir)) == out["output"]
    assert out["num_quantized"] == len(QUANTIZED) and out["num_copied"] == len(values) - len(
        QUANTIZED
    )
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
    assert (
        main(
            [
                str(tmp_path / "run"),
                "--algorithm",
                "fixed-point",
                "--bits",
                "6",
                "--output",
                str(outdir),
                "--overwrite",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "Processed 9 variables" in text and "Min error:" in text and "Avg error:" in text
    w = tf.train.load_checkpoint(str(outdir / "model.ckpt-100")).get_tensor(f"{SLIM}/conv1/weights")
    np.testing.assert_array_equal(w, fixed_point_quantize(values[f"{SLIM}/conv1/weights"], 6))
    assert (
        sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []
    )  # no temp dirs left


def test_no_trainable_and_uint8_bits(tmp_path, capsys):
    from adj_quant.cli.quantize_checkpoint import main

    prefix = _write_slim(
        tmp_path, {"global_step": np.array(5, np.int64), "bn/moving_mean": np.ones(3, np.float32)}
    )
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

    from adj_quant.cli.quantize_checkpoint import main
    from adj_quant.seed_quantizers.checkpoint_quantizer import (
        load_uint8_checkpoint,
        uint8_to_float_checkpoint,
    )

    values = _slim_values(big=True)
    prefix = _write_slim(tmp_path / "run", values)
    assert main([prefix, "--algorithm", "uint8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["output"] == str(tmp_path / "run" / "uint8" / "model.ckpt-100") and out["bits"] == 8
    assert set(out["errors"]) == {f"{SLIM}/{k}" for k in UINT8_QUANTIZED}
    assert out["left_float"] == {
        **{f"{SLIM}/{k}": "below-min-size" for k in QUANTIZED - UINT8_QUANTIZED},
        f"{SLIM}/conv1/weights/Momentum": "optimizer",
        f"{SLIM}/conv1/BatchNorm/moving_mean": "state",
        f"{SLIM}/conv1/BatchNorm/moving_variance": "state",
    }

    def data_bytes(p):
        return sum(os.path.getsize(f) for f in tf.io.gfile.glob(p + ".data-*"))

    quant_bytes = sum(values[f"{SLIM}/{k}"].nbytes for k in UINT8_QUANTIZED)
    copied_bytes = sum(
        v.nbytes for k, v in values.items() if k[len(SLIM) + 1 :] not in UINT8_QUANTIZED
    )
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
    logits = f"{SLIM}/logits/weights"  # 640 elements < 1024: stored float, bit for bit
    assert (
        loaded[logits].dtype == np.float32 and loaded[logits].tobytes() == values[logits].tobytes()
    )

    back = uint8_to_float_checkpoint(out["output"], tmp_path / "float")
    r2 = tf.train.load_checkpoint(back)
    assert (
        r2.get_variable_to_dtype_map()
        == tf.train.load_checkpoint(prefix).get_variable_to_dtype_map()
    )
    np.testing.assert_array_equal(r2.get_tensor(w_key), loaded[w_key])


# ---------------------------------------------------------------------------------------
# uint8 --min_size: TF quantize_weights' minimum_size rule
# ---------------------------------------------------------------------------------------

# Hand-built: "big" has exactly 1024 elements, "small" 1023, "tiny" 5; "ids" is int; "moving_mean"
# is large but batch-norm state, which is never quantized (the size rule only narrows the set).
BIG, SMALL, TINY, IDS, MEAN = (
    "net/big/kernel",
    "net/small/kernel",
    "net/tiny/bias",
    "net/ids",
    "net/bn/moving_mean",
)


def _min_size_values():
    rng = np.random.default_rng(11)
    # Levels j/256 - 0.5 for j = 0..255, four times: lo = -0.5, hi = 127/256, so
    # s = 255/(hi-lo) = 256
    # exactly and q = rha(256 x) - rha(-128) = j. Two values sit halfway between levels:
    # 256 x = +10.5 -> 11 -> q 139 and 256 x = -10.5 -> -11 -> q 117 (half away from zero; half to
    # even would give 138 and 118).
    j = np.tile(np.arange(256), 4)
    big = ((j - 128) / 256).astype(np.float32)
    big[1], big[2] = 10.5 / 256, -10.5 / 256
    q_big = j.astype(np.uint8)
    q_big[1], q_big[2] = 139, 117
    values = {
        BIG: big.reshape(32, 32),
        SMALL: rng.normal(0, 0.05, (33, 31)).astype(np.float32),
        # lo=-1, hi=2, s=85: q = rha(85 x) + 85 = [0, 85, 111 (25.5 -> 26), 255, 170]
        TINY: np.array([-1.0, 0.0, 0.3, 2.0, 1.0], np.float32),
        IDS: np.arange(4096, dtype=np.int32).reshape(64, 64),
        MEAN: rng.normal(0, 0.3, 2048).astype(np.float32),
    }
    expected_q = {BIG: q_big.reshape(32, 32), TINY: np.array([0, 85, 111, 255, 170], np.uint8)}
    expected_range = {BIG: (-0.5, 127 / 256), TINY: (-1.0, 2.0)}
    return values, expected_q, expected_range


def _check_min_size_output(path, values, expected_q, expected_range, quantized):
    """Quantized keys are uint8 with the hand-computed levels and range; all others
    bit-identical."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(path)
    dtypes = reader.get_variable_to_dtype_map()
    ranges = {k + s for k in quantized for s in ("/quant_min", "/quant_max")}
    assert set(dtypes) == set(values) | ranges | {"_ADJQ_UINT8_FORMAT"}
    for key, v in values.items():
        got = reader.get_tensor(key)
        if key in quantized:
            assert dtypes[key] == tf.uint8, key
            np.testing.assert_array_equal(got, expected_q[key])
            lo, hi = expected_range[key]
            assert reader.get_tensor(key + "/quant_min") == np.float32(lo)
            assert reader.get_tensor(key + "/quant_max") == np.float32(hi)
        else:
            assert got.dtype == v.dtype and got.shape == v.shape and got.tobytes() == v.tobytes(), (
                key
            )


def test_uint8_min_size_default_1024(tmp_path, capsys):
    from adj_quant.cli.quantize_checkpoint import main
    from adj_quant.seed_quantizers.checkpoint_quantizer import load_uint8_checkpoint

    values, expected_q, expected_range = _min_size_values()
    prefix = _write_slim(tmp_path / "run", values)
    assert main([prefix, "--algorithm", "uint8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["min_size"] == 1024
    assert (out["num_8bit"], out["num_quantized"], out["num_copied"]) == (1, 1, 4)
    assert (out["num_left_float"], out["num_below_min_size"]) == (3, 2)
    assert out["left_float"] == {MEAN: "state", SMALL: "below-min-size", TINY: "below-min-size"}
    assert set(out["errors"]) == {BIG}
    _check_min_size_output(out["output"], values, expected_q, expected_range, {BIG})

    # the dequantized levels are (q - 128) / 256, exactly; the small ones come back as stored
    loaded = load_uint8_checkpoint(out["output"])
    np.testing.assert_array_equal(loaded[BIG], (expected_q[BIG].astype(np.float32) - 128) / 256)
    assert loaded[SMALL].tobytes() == values[SMALL].tobytes() and loaded[IDS].dtype == np.int32


def test_uint8_min_size_boundaries_library(tmp_path):
    from adj_quant.seed_quantizers.checkpoint_quantizer import quantize_checkpoint

    values, expected_q, expected_range = _min_size_values()
    prefix = _write_slim(tmp_path / "run", values)
    # SMALL is random: its oracle is TF's MIN_FIRST formula, written out per element.
    x = values[SMALL].ravel().astype(np.float64)
    lo, hi = float(np.float32(min(x.min(), 0.0))), float(np.float32(max(x.max(), 0.0)))
    s = 255.0 / (hi - lo)

    def rha(v):
        return int(np.copysign(np.floor(abs(v) + 0.5), v))

    expected_q[SMALL] = np.array(
        [min(max(rha(v * s) - rha(lo * s), 0), 255) for v in x], np.uint8
    ).reshape(33, 31)
    expected_range[SMALL] = (lo, hi)

    for min_size, quantized in (
        (0, {BIG, SMALL, TINY}),
        (5, {BIG, SMALL, TINY}),
        (6, {BIG, SMALL}),
        (1023, {BIG, SMALL}),
        (1024, {BIG}),
    ):
        res = quantize_checkpoint(
            prefix, "uint8", output_dir=tmp_path / f"ms{min_size}", min_size=min_size
        )
        assert set(res.errors) == quantized, min_size
        assert res.min_size == min_size
        assert set(res.left_float) == {MEAN} | ({SMALL, TINY} - quantized)
        _check_min_size_output(res.output, values, expected_q, expected_range, quantized)

    # the default is 1024, and "not given" (None) means the default too
    for kwargs in ({}, {"min_size": None}):
        res = quantize_checkpoint(
            prefix, "uint8", output_dir=tmp_path / "default", overwrite=True, **kwargs
        )
        assert set(res.errors) == {BIG} and res.min_size == 1024

    # every quantizable variable too small: refused, nothing written
    with pytest.raises(
        UserError, match=f"no trainable float variable with at least 1025 elements.*{BIG}, 1024"
    ):
        quantize_checkpoint(prefix, "uint8", output_dir=tmp_path / "none", min_size=1025)
    assert not (tmp_path / "none").exists()
    for bad, needle in (
        (-1, "is negative"),
        (2.5, "not an integer"),
        ("8", "not an integer"),
        (True, "not an integer"),
    ):
        with pytest.raises(UserError, match=needle):
            quantize_checkpoint(prefix, "uint8", output_dir=tmp_path / "bad", min_size=bad)
    # bin / fixed-point take no size threshold: the default is accepted (all trainable floats are
    # quantized, whatever their size), any other value refused
    res = quantize_checkpoint(prefix, "bin", 8, output_dir=tmp_path / "bin")
    assert set(res.errors) == {BIG, SMALL, TINY} and res.min_size is None
    assert "min_size" not in res.summary() and "num_8bit" not in res.summary()
    with pytest.raises(UserError, match="applies only to --algorithm uint8"):
        quantize_checkpoint(prefix, "fixed-point", 8, output_dir=tmp_path / "fp", min_size=16)


def test_uint8_min_size_cli_report(tmp_path):
    values, _, _ = _min_size_values()
    prefix = _write_slim(tmp_path, values)
    ok = _run_tool_in_process(prefix, "--algorithm", "uint8")
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[:4] == [
        "Processed 5 variables: 1 quantized, 4 copied unchanged",
        "Stored in 8 bits: 1 variable (float, at least --min_size 1024 elements)",
        "Left float: 3 variables (2 below --min_size, 1 state)",
        "Output: " + str(tmp_path / "uint8" / "model.ckpt-100"),
    ]
    assert [line.split(":")[0] for line in lines[4:]] == ["Min error", "Max error", "Avg error"]
    ok = _run_tool_in_process(prefix, "--algorithm", "uint8", "--min-size", "6", "--output",
                              tmp_path / "ms6")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[1:3] == [
        "Stored in 8 bits: 2 variables (float, at least --min_size 6 elements)",
        "Left float: 2 variables (1 below --min_size, 1 state)",
    ]
    too_big = _run_tool_in_process(
        prefix, "--algorithm", "uint8", "--min_size", "5000", "--output", tmp_path / "none"
    )
    _assert_one_line_error(too_big, "at least 5000 elements", "--min_size 1024 or less")


@pytest.mark.slow  # several TensorFlow subprocesses
def test_min_size_cli_errors_in_process(tmp_path):
    missing = tmp_path / "nope" / "model.ckpt-1"  # the flag is checked first, before the checkpoint
    _assert_one_line_error(
        _run_tool_in_process(missing, "--algorithm", "uint8", "--min_size", "-1"),
        "--min_size -1 is negative",
        ">= 0",
    )
    _assert_one_line_error(
        _run_tool_in_process(missing, "--algorithm", "uint8", "--min_size=-5"),
        "--min_size -5 is negative",
    )
    _assert_one_line_error(
        _run_tool_in_process(missing, "--algorithm", "uint8", "--min_size", "1.5"),
        "--min_size '1.5' is not an integer",
        "default 1024",
    )
    _assert_one_line_error(
        _run_tool_in_process(missing, "--algorithm", "uint8", "--min_size", "abc"),
        "'abc' is not an integer",
    )
    _assert_one_line_error(
        _run_tool_in_process(missing, "--algorithm", "bin", "--bits", "8", "--min_size", "1024"),
        "--min_size applies only to --algorithm uint8",
        "bin",
    )
    _assert_one_line_error(
        _run_tool_in_process(
            missing, "--algorithm", "fixed-point", "--bits", "8", "--min_size", "0"
        ),
        "--min_size applies only to --algorithm uint8",
        "fixed-point",
    )
    _assert_one_line_error(
        _run_tool_in_process(missing, "--algorithm", "uint8", "--min_size", "0"),
        "checkpoint not found",
    )


def test_tf2_object_checkpoint_round_trip(tmp_path, capsys):
    import tensorflow as tf

    from adj_quant.cli.quantize_checkpoint import main

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
    assert out["output"] == os.path.join(
        str(tmp_path / "tf2" / "bin_8bits"), os.path.basename(prefix)
    )
    assert set(out["errors"]) == {
        "v/.ATTRIBUTES/VARIABLE_VALUE",
        "layer/bias/.ATTRIBUTES/VARIABLE_VALUE",
    }
    assert 0.5 < out["errors"]["v/.ATTRIBUTES/VARIABLE_VALUE"] < 1.2

    new = tf.train.Checkpoint(
        v=tf.Variable(np.zeros_like(kernel)), layer=tf.Module(), step=tf.Variable(0, dtype=tf.int64)
    )
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
    """Keras 3 lists model weights under optimizer/_trainable_variables and slots under
    _variables."""
    import tensorflow as tf

    from adj_quant.cli.quantize_checkpoint import main

    def build():
        model = tf.keras.Sequential(
            [tf.keras.Input((6,)), tf.keras.layers.Dense(4), tf.keras.layers.BatchNormalization()]
        )
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
    for a, b in zip(
        model.non_trainable_variables + opt.variables,
        model2.non_trainable_variables + opt2.variables,
    ):
        np.testing.assert_array_equal(b.numpy(), a.numpy())


@pytest.mark.slow  # several TensorFlow subprocesses
def test_cli_errors_in_process(tmp_path):
    missing = tmp_path / "nope" / "model.ckpt-1"
    _assert_one_line_error(
        _run_tool_in_process(missing, "--algorithm", "bin", "--bits", "8"),
        "checkpoint not found",
        str(missing),
    )
    _assert_one_line_error(
        _run_tool_in_process(missing, "--algorithm", "bin", "--bits", "17"), "--bits 17", "1..16"
    )
    _assert_one_line_error(
        _run_tool_in_process(missing, "--algorithm", "fixed-point", "--bits", "1"),
        "--bits 1",
        "2..32",
    )
    _assert_one_line_error(
        _run_tool_in_process(missing, "--algorithm", "bin"), "--bits is required"
    )
    proc = _run_tool_in_process(missing, "--algorithm", "ternary", "--bits", "8")
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
        f"{SLIM}/logits/weights"
    )
    np.testing.assert_array_equal(w, fixed_point_quantize(values[f"{SLIM}/logits/weights"], 8))
    for argv, needle in (
        (["34", prefix, "10", "1", "8"], "NETWORK"),
        (["101", prefix, "ten", "1", "8"], "NUM_CLASSES"),
        (["101", prefix, "10", "3", "8"], "ALGORITHM"),
    ):
        with pytest.raises(SystemExit) as exc:
            quantizer.main(argv)
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["--algorithm", "bin"], ["ckpt", "--algorithm", "int3"]])
def test_missing_or_bad_arguments_are_one_line(argv, capsys):
    from adj_quant.cli import quantize_checkpoint as cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "usage:" not in err
    assert "adjq-quantize-checkpoint --help" in err
