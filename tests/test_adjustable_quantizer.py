"""The adjustable quantizer against TensorFlow's fake_quant ops and hand-derived gradients."""

import numpy as np
import pytest
import tensorflow as tf

from adj_quant.errors import UserError
from adj_quant.quantizers import adjustable as q
from adj_quant.quantizers import formula


@pytest.mark.parametrize("bits", range(2, 9))
def test_forward_equals_fake_quant_per_channel(bits):
    rng = np.random.default_rng(bits)
    channels = 6
    x = rng.normal(0, 1.5, (4, 5, 5, channels)).astype(np.float32)
    lo = -rng.uniform(0.1, 2.0, channels).astype(np.float32)  # ranges contain 0
    hi = rng.uniform(0.1, 2.0, channels).astype(np.float32)
    ours = q.quantize(x, lo, hi, bits).numpy()
    oracle = tf.quantization.fake_quant_with_min_max_vars_per_channel(
        x, lo, hi, num_bits=bits, narrow_range=False).numpy()
    step = (hi - lo) / (2**bits - 1)
    diff = np.abs(ours - oracle)
    mismatch = diff > 1e-4 * step
    # Only exact rounding ties may differ, and then by one step.
    assert mismatch.mean() < 1e-3
    np.testing.assert_allclose(diff[mismatch] / np.broadcast_to(step, x.shape)[mismatch], 1.0,
                               atol=1e-3)
    assert len(np.unique(ours[..., 0])) <= 2**bits


def test_depthwise_axis_and_scalar_broadcast():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (3, 3, 4, 1)).astype(np.float32)
    lo, hi = w.min(axis=(0, 1, 3)), w.max(axis=(0, 1, 3))
    ours = q.quantize(w, lo, hi, 4, axis=2).numpy()
    oracle = tf.quantization.fake_quant_with_min_max_vars_per_channel(
        np.transpose(w, (0, 1, 3, 2)), lo, hi, num_bits=4).numpy().transpose(0, 1, 3, 2)
    assert np.mean(np.abs(ours - oracle) > 1e-5) < 1e-2
    scalar = q.quantize(w, -0.9, 1.1, 3).numpy()  # (-1, 1) would tie on the zero point
    oracle = tf.quantization.fake_quant_with_min_max_vars(w, -0.9, 1.1, num_bits=3).numpy()
    assert np.mean(np.abs(scalar - oracle) > 1e-5) < 1e-2


def test_mixed_per_channel_bits():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (50, 3)).astype(np.float32)
    bits = np.array([2, 5, 8])
    ours = q.quantize(x, -1.7, 2.3, bits).numpy()
    for c, b in enumerate(bits):
        oracle = tf.quantization.fake_quant_with_min_max_vars(x[:, c], -1.7, 2.3, num_bits=int(b))
        np.testing.assert_allclose(ours[:, c], oracle.numpy(), atol=1e-5)


def _expected_gradients(x, g, m, w, a, beta, b0, bits_scale, bits_grad="original"):
    """Hand-derived gradients of sum(g * out) for one channel (see the derivation below).

    With W = w*a, L = m + w*beta, b = round(bits_scale*b0), n = 2^b - 1, s = n / (W + eps):
      inside the range   out = round(x s)/s         d out = (x - out)/s * ds
      clipped below      out = z/s                  d out = dL + (L - out)/s * ds
      clipped above      out = (z + n)/s            d out = dL + (L - out)/s * ds [+ dn/s]
    and ds/dW = -n/(W+eps)^2, ds/db = ln2 * 2^b / (W+eps), dn/db = ln2 * 2^b, dW/da = w,
    dL/dbeta = w, db/dbits_scale = b0. The bracketed term (the upper bound's gradient)
    exists only with bits_grad="original".
    """
    eps = 1e-7
    W, L = w * a, m + w * beta
    b = np.round(bits_scale * b0)
    n = 2.0**b - 1
    s = n / (W + eps)
    z = np.round(L * s)
    k = np.round(x * s) - z
    inside = (k >= 0) & (k <= n)
    out = (np.clip(k, 0, n) + z) / s
    d_out_ds = np.where(inside, (x - out) / s, (L - out) / s)
    d_out_dL = np.where(inside, 0.0, 1.0)
    ds_dW = -n / (W + eps) ** 2
    ds_db = np.log(2.0) * 2.0**b / (W + eps)
    grad_s = np.sum(g * d_out_ds)
    above = k > n
    grad_n = np.sum(g * above / s) if bits_grad == "original" else 0.0
    return {
        "range_scale": grad_s * ds_dW * w,
        "range_shift": np.sum(g * d_out_dL) * w,
        "bits_scale": (grad_s * ds_db + grad_n * np.log(2.0) * 2.0**b) * b0,
        "x": g * inside,
    }


@pytest.mark.parametrize("bits_grad", formula.BITS_GRAD_MODES)
@pytest.mark.parametrize("a, beta, bits_scale",
                         [(1.0, 0.0, 1.0), (0.7, 0.1, 1.3), (1.2, -0.15, 0.8)])
def test_gradients_match_hand_derivation(a, beta, bits_scale, bits_grad):
    x = np.array([-2.3, -1.3, -0.62, -0.1, 0.05, 0.33, 0.71, 0.98, 1.6], np.float64)
    g = np.array([0.6, 0.3, -1.0, 0.5, 2.0, -0.7, 1.1, -0.4, 0.9], np.float64)
    m, M, b0 = -0.93, 1.05, 4  # no rounding ties in float32 vs float64
    quant = q.AdjustableQuantizer("t", 1, init_bits=b0, bits_trainable=True, range_preset_id=5,
                                  bits_grad=bits_grad)
    quant.set_range([m], [M])
    quant.range_scale.assign([a])
    quant.range_shift.assign([beta])
    quant.bits_scale.assign([bits_scale])
    xt = tf.constant(x[:, None], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        out = quant(xt)
        loss = tf.reduce_sum(out * g[:, None].astype(np.float32))
    grads = tape.gradient(loss, [quant.range_scale, quant.range_shift, quant.bits_scale, xt])
    expected = _expected_gradients(x, g, m, M - m, a, beta, b0, bits_scale, bits_grad)
    w, b = M - m, np.round(bits_scale * b0)
    k = np.round(x * (2**b - 1) / (w * a)) - np.round((m + w * beta) * (2**b - 1) / (w * a))
    assert (k > 2**b - 1).any() and (k < 0).any()  # elements clipped at the top and bottom
    np.testing.assert_allclose(grads[0].numpy()[0], expected["range_scale"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(grads[1].numpy()[0], expected["range_shift"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(grads[2].numpy()[0], expected["bits_scale"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(grads[3].numpy()[:, 0], expected["x"], atol=1e-6)


def test_clip_passes_no_gradient_outside_or_to_bounds():
    quant = q.AdjustableQuantizer("t", 2, init_bits=4, bits_trainable=True, range_preset_id=1)
    quant.set_range([-1.0, -1.0], [1.0, 1.0])
    quant.range_scale.assign([1.5, 1.0])   # r_alpha = [0.5, 1.3]: channel 0 is clipped
    quant.range_shift.assign([0.0, 0.5])   # r_beta = [-0.2, 0.4]: channel 1 is clipped
    quant.bits_scale.assign([3.0, 1.0])    # 3*4 = 12 > 8: channel 0's bits are clipped
    x = tf.constant(np.random.default_rng(0).normal(0, 1, (64, 2)), tf.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(quant(x) ** 2)
    gs, gb, gbits = tape.gradient(loss, [quant.range_scale, quant.range_shift, quant.bits_scale])
    assert gs.numpy()[0] == 0 and gs.numpy()[1] != 0
    assert gb.numpy()[1] == 0 and gb.numpy()[0] != 0
    assert gbits.numpy()[0] == 0 and gbits.numpy()[1] != 0
    # Boundaries are inclusive: a value exactly on a bound still gets gradient.
    v = tf.Variable([2.0, 8.0, 1.0])
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(formula.clip_ste(v, 2.0, 8.0))
    np.testing.assert_array_equal(tape.gradient(y, v).numpy(), [1.0, 1.0, 0.0])


def test_bits_stay_in_range_for_any_bits_scale():
    quant = q.AdjustableQuantizer("t", 7, init_bits=6, bits_trainable=True)
    quant.bits_scale.assign([-50.0, 0.0, 0.2, 0.41, 1.0, 1.3, 1e6])
    bits = quant.bits().numpy()
    np.testing.assert_array_equal(bits, [2, 2, 2, 2, 6, 8, 8])
    fixed = q.AdjustableQuantizer("f", 3, init_bits=5)
    np.testing.assert_array_equal(fixed.bits().numpy(), [5, 5, 5])
    assert fixed.bits_scale is None


def test_range_presets_clip_the_adjusted_range():
    quant = q.AdjustableQuantizer("t", 1, init_bits=8, range_preset_id=2)
    quant.set_range([-1.0], [3.0])
    quant.range_scale.assign([5.0])
    quant.range_shift.assign([-5.0])
    low, width = quant.adjusted_range()
    assert width.numpy()[0] == pytest.approx(4.0 * 1.0)       # r_alpha upper bound 1.0
    assert low.numpy()[0] == pytest.approx(-1.0 + 4.0 * -0.2)  # r_beta lower bound -0.2


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="bits"):
        q.quantize(np.ones((2, 3), np.float32), -1.0, 1.0, 9)
    with pytest.raises(UserError, match="shape"):
        q.quantize(np.ones((2, 3), np.float32), np.zeros(4), 1.0, 8)
    with pytest.raises(UserError, match="range preset 9"):
        formula.range_preset(9)
    with pytest.raises(UserError, match="bits 1 is not a bit-width"):
        q.AdjustableQuantizer("t", 1, init_bits=1)
    with pytest.raises(UserError, match="bits 3.5 is not a bit-width"):
        q.AdjustableQuantizer("t", 1, init_bits=3.5)  # used to truncate silently


def test_fused_xla_kernels_equal_the_op_by_op_math():
    """Inside tf.function the quantizer runs XLA-fused kernels; they must match eager."""
    quant = q.AdjustableQuantizer("t", 5, init_bits=3, bits_trainable=True)
    rng = np.random.default_rng(7)
    quant.set_range(-rng.uniform(0.5, 1.5, 5), rng.uniform(0.5, 1.5, 5))
    quant.range_scale.assign(rng.uniform(0.7, 1.2, 5))
    quant.bits_scale.assign(rng.uniform(0.8, 2.0, 5))
    x = tf.constant(rng.normal(0, 1, (4, 3, 3, 5)), tf.float32)
    g = tf.constant(rng.normal(0, 1, (4, 3, 3, 5)), tf.float32)

    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = quant(x)
            loss = tf.reduce_sum(out * g)
        return [out] + tape.gradient(loss, [x, quant.range_scale, quant.range_shift,
                                            quant.bits_scale])

    eager = run(x)
    graph = tf.function(run)(x)
    for a, b in zip(eager, graph):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def _plain_tf_quantizer(x, low, width, bits):
    """The original's graph with ordinary autodiff: only ``round`` is straight-through.

    ``minimum(maximum(t, 0), 2^b - 1)`` is how TF 1.13 built ``clip_by_value``; its
    gradient sends the gradient of elements above the range to ``2^b - 1`` and so to ``b``.
    """
    ste = lambda v: v + tf.stop_gradient(tf.round(v) - v)  # noqa: E731
    levels = tf.pow(2.0, bits) - 1.0
    scale = levels / (width + formula.EPSILON)
    zero = ste(low * scale)
    t = ste(x * scale) - zero
    return (tf.minimum(tf.maximum(t, 0.0), levels) + zero) / scale


@pytest.mark.parametrize("seed", range(4))
def test_original_estimator_equals_plain_tf_autodiff(seed):
    """The fused kernel's ``original`` mode equals ordinary autodiff of the TF1 construction,
    eagerly and inside tf.function (XLA kernels), for per-channel ranges and bits."""
    rng = np.random.default_rng(seed)
    channels = 4
    x = tf.constant(rng.normal(0, 1.5, (6, 5, channels)), tf.float32)  # many clip at both ends
    g = tf.constant(rng.normal(0, 1, (6, 5, channels)), tf.float32)
    low = tf.Variable(-rng.uniform(0.3, 1.2, channels).astype(np.float32))
    width = tf.Variable(rng.uniform(0.8, 2.0, channels).astype(np.float32))
    bits = tf.Variable(rng.integers(2, 9, channels).astype(np.float32))

    def grads(fn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(fn() * g)
        return tape.gradient(loss, [x, low, width, bits])

    oracle = grads(lambda: _plain_tf_quantizer(x, low, width, bits))
    for run in (lambda f: f(), lambda f: tf.function(f)()):
        ours = run(lambda: grads(lambda: q.fake_quantize(x, low, width, bits, -1, "original")))
        for a, b in zip(ours, oracle):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-5, atol=1e-5)
    # The bound's gradient is really there: scale_only differs in the bits gradient only.
    scale_only = grads(lambda: q.fake_quantize(x, low, width, bits, -1, "scale_only"))
    for a, b in zip(scale_only[:3], oracle[:3]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-5, atol=1e-5)
    assert np.abs(scale_only[3].numpy() - oracle[3].numpy()).max() > 1e-3


def test_bits_grad_mode_is_checked():
    with pytest.raises(UserError, match="bits_grad 'both'.*original, scale_only"):
        q.AdjustableQuantizer("t", 1, bits_grad="both")


def test_live_range_follows_the_tensor_with_gradient():
    """A live-range quantizer uses the tensor's own min/max (bias quantizers of the original)."""
    quant = q.AdjustableQuantizer("b", 1, init_bits=4, live_range=True)
    quant.set_range([-100.0], [100.0])  # calibrated range, ignored in live mode
    b = tf.Variable([-0.5, 0.1, 0.37, 1.0])
    with tf.GradientTape() as tape:
        out = quant(b)
        loss = tf.reduce_sum(out * tf.constant([1.0, 2.0, -1.0, 3.0]))
    oracle = tf.quantization.fake_quant_with_min_max_vars(b, -0.5, 1.0, num_bits=4)
    np.testing.assert_allclose(out.numpy(), oracle.numpy(), atol=1e-6)
    # Same loss with min/max as constants: the difference is the gradient through min/max.
    with tf.GradientTape() as tape2:
        frozen = q.fake_quantize(b, tf.constant(-0.5), tf.constant(1.5), tf.constant(4.0))
        loss2 = tf.reduce_sum(frozen * tf.constant([1.0, 2.0, -1.0, 3.0]))
    g_live, g_frozen = tape.gradient(loss, b).numpy(), tape2.gradient(loss2, b).numpy()
    assert g_live[0] != g_frozen[0] and g_live[3] != g_frozen[3]   # the min and max elements
    np.testing.assert_allclose(g_live[1:3], g_frozen[1:3], atol=1e-6)


# --------------------------------------------------------------------------- the whole domain
# (issue 13, item 5; tests/test_quantizer_properties.py fuzzes the same properties)

F32_MAX = float(np.finfo(np.float32).max)


def _eager_and_traced(fn, *args):
    """``fn(*args)`` eagerly and inside tf.function (fused XLA kernels), as numpy."""
    return fn(*args).numpy(), tf.function(fn)(*args).numpy()


@pytest.mark.parametrize("lo, hi, bits", [
    (2e29, 2e29, 8),              # zero width at 2e29: round(L s) overflowed (NaN)
    (-1.1342745e31, -1.1342745e31, 2),
    (-3e38, 3e38, 8),             # max - min overflows float32
    (-3e38, 3e38, 2),             # ... and the scale would be subnormal
    (3e38, F32_MAX, 8),           # top grid point beyond float32
    (-F32_MAX, -3.4e38, 3),
])
def test_overflowing_ranges_give_finite_outputs(lo, hi, bits):
    """The formula is total: a range only known at run time (here given to fake_quantize as
    quantize would pass it) gives finite outputs; ``quantize`` refuses, when it sees the
    values, a range whose width overflows float32."""
    x = tf.constant([[1e29, -1e30, 0.5], [2e29, 1e30, 3e38], [0.0, -3e38, F32_MAX]], tf.float32)
    lo32, hi32 = np.float64(np.float32(lo)), np.float64(np.float32(hi))
    step = ((hi32 - lo32 + 1e-7) / (2**bits - 1)
            + 2 * np.spacing(np.float32(min(max(-lo, hi), 3e38))))

    def unchecked(x):
        low, high = tf.constant(lo, tf.float32), tf.constant(hi, tf.float32)
        return q.fake_quantize(x, low, high - low, float(bits))

    with np.errstate(over="ignore"):
        overflows = np.isinf(np.float32(hi) - np.float32(lo))
    if overflows:
        with pytest.raises(UserError, match="wider than float32 holds"):
            q.quantize(x, lo, hi, bits)
    else:
        np.testing.assert_array_equal(q.quantize(x, lo, hi, bits).numpy(), unchecked(x).numpy())
    for out in _eager_and_traced(unchecked, x):
        assert np.isfinite(out).all()
        assert (out >= lo32 - step).all() and (out <= hi32 + 1e-7 + step).all()
        assert len(np.unique(out)) <= 2**bits
    with tf.GradientTape() as tape:  # the gradient wrt x stays the 0/1 "inside" mask
        tape.watch(x)
        out = unchecked(x)
    np.testing.assert_array_equal(np.isin(tape.gradient(out, x).numpy(), [0.0, 1.0]), True)
    if lo == hi:
        np.testing.assert_allclose(out.numpy(), lo, rtol=1e-6)


def test_overflowing_calibrated_range_in_the_module_is_finite():
    """set_range refuses ``[-3e38, 3e38]``; a range that reaches the variables otherwise
    (a checkpoint, an assignment) still gives finite outputs."""
    quant = q.AdjustableQuantizer("t", 2, init_bits=4, bits_trainable=True)
    with pytest.raises(UserError, match="wider than float32 holds"):
        quant.set_range([-3e38, 2e29], [3e38, 2e29])
    # width inf (times shift 0: NaN) and 0 at 2e29
    quant.init_min.assign([-3e38, 2e29])
    quant.init_max.assign([3e38, 2e29])
    x = tf.constant([[1e30, -1e30], [0.0, 2e29], [-3e38, 3e38]], tf.float32)
    for out in _eager_and_traced(quant, x):
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out[:, 1], 2e29, rtol=1e-6)


def test_minimum_above_maximum_is_a_user_error():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(UserError, match=r"minimum 1.0 > maximum 0.9999999; pass minimum <= max"):
        q.quantize(x, 1.0, 1.0 - 1e-7, 8)
    with pytest.raises(UserError, match=r"minimum 2.0 > maximum 1.0 for channel 1 of axis -1"):
        q.quantize(x, [0.0, 2.0, 0.0], [1.0, 1.0, 1.0], 8)
    # Constants are checked when tracing. (With autograph on, TF re-raises a UserError from
    # traced code as a StagingError carrying the message.)
    traced = tf.function(lambda: q.quantize(x, [1.0, 0.0], 0.0, 4, 0), autograph=False)
    with pytest.raises(UserError, match="minimum 1.0 > maximum 0.0 for channel 0 of axis 0"):
        traced()
    with pytest.raises(UserError, match=r"range \[nan, 1.0\] is NaN"):
        q.quantize(x, float("nan"), 1.0, 8)


@pytest.mark.parametrize("width", [-1e-7, -1.0, -1e30])
def test_negative_width_when_traced_or_in_the_module_is_a_zero_width(width):
    """Inside traced code the range is not known until run time: a negative width (width
    -1e-7 made the scale infinite: all NaN) quantizes as a zero-width range."""
    x = tf.constant(np.linspace(-2, 2, 12).reshape(4, 3), tf.float32)
    low = tf.constant([0.3, -0.2, 1.0])
    zero_width = q.fake_quantize(x, low, tf.zeros(3), 4.0).numpy()
    assert np.isfinite(zero_width).all()
    for out in _eager_and_traced(lambda x: q.fake_quantize(x, low, tf.fill([3], width), 4.0), x):
        np.testing.assert_array_equal(out, zero_width)
    traced = tf.function(lambda x, lo, hi: q.quantize(x, lo, hi, 4))
    np.testing.assert_array_equal(traced(x, low, low + width).numpy(), zero_width)
    quant = q.AdjustableQuantizer("t", 3, init_bits=4, range_preset_id=7)  # range_scale < 0 allowed
    quant.set_range([0.3, -0.2, 1.0], [1.3, 0.8, 2.0])
    quant.range_scale.assign([width] * 3)
    np.testing.assert_array_equal(quant(x).numpy(), zero_width)


def test_low_precision_and_float64_inputs_compute_in_float32():
    """bfloat16 computed in bfloat16 gave 3 values spanning [100.5, 101.5] for [100, 101]."""
    x32 = tf.constant(np.linspace(99.0, 102.0, 40), tf.float32)
    for dtype in (tf.bfloat16, tf.float16, tf.float64):
        x = tf.cast(x32, dtype)
        expected = tf.cast(q.quantize(tf.cast(x, tf.float32), 100.0, 101.0, 4), dtype).numpy()
        out = q.quantize(x, 100.0, 101.0, 4)
        assert out.dtype == dtype
        np.testing.assert_array_equal(out.numpy(), expected)
        fq = q.fake_quantize(x, tf.constant(100.0), tf.constant(1.0), tf.constant(4.0))
        np.testing.assert_array_equal(fq.numpy(), expected)
        quant = q.AdjustableQuantizer("t", 1, init_bits=4)
        quant.set_range([100.0], [101.0])
        np.testing.assert_array_equal(quant(x).numpy(), expected)
        values = np.unique(out.numpy().astype(np.float64))
        assert values.min() >= 100.0 - 1e-4 and values.max() <= 101.0 + 1e-4
    assert set(np.unique(q.quantize(tf.cast(x32, tf.bfloat16), 100.0, 101.0, 4).numpy()
                         .astype(np.float32))) == {100.0, 100.5, 101.0}


@pytest.mark.parametrize("x, dtype", [(tf.constant([1, 2]), "int32"),
                                      (np.array([True, False]), "bool"),
                                      (tf.constant(["a", "b"]), "string"),
                                      (np.arange(3), "int64")])
def test_non_float_inputs_are_a_one_line_user_error(x, dtype):
    with pytest.raises(UserError, match=f"x has dtype {dtype}; .*cast x first") as err:
        q.quantize(x, 0.0, 1.0, 8)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=f"x has dtype {dtype}"):
        q.fake_quantize(x, 0.0, 1.0, 8.0)


def test_non_integer_bits_are_refused_inside_tf_function():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(UserError, match=r"bits \[3.5\] must be integers"):  # checked when tracing
        tf.function(lambda: q.quantize(x, 0.0, 1.0, 3.5), autograph=False)()
    # autograph: a StagingError
    with pytest.raises(Exception, match=r"bits \[3.5\] must be integers"):
        tf.function(lambda: q.quantize(x, 0.0, 1.0, 3.5))()
    traced = tf.function(lambda b: q.quantize(x, 0.0, 1.0, b))
    with pytest.raises(tf.errors.InvalidArgumentError, match="bits must be integers"):
        traced(tf.constant(3.5))  # only known at run time: a runtime assertion
    with pytest.raises(tf.errors.InvalidArgumentError, match="bits must be integers"):
        traced(tf.constant(9.0))
    np.testing.assert_array_equal(traced(tf.constant(3.0)).numpy(), q.quantize(x, 0.0, 1.0, 3))


@pytest.mark.parametrize("bits", [3.5, np.float32(3.5), float("nan"), float("inf"), True, "4"])
def test_init_bits_must_be_an_integer_bit_width(bits):
    with pytest.raises(UserError, match="is not a bit-width"):
        q.AdjustableQuantizer("t", 1, init_bits=bits)


def test_integer_valued_float_bits_are_accepted():
    assert q.AdjustableQuantizer("t", 1, init_bits=4.0).init_bits == 4
    assert formula.is_bit_width(4.0) and not formula.is_bit_width(3.5)
    assert not formula.is_bit_width(float("nan"))


def test_axis_out_of_range_is_a_user_error():
    x = np.zeros((2, 3), np.float32)
    for axis in (2, -3):
        with pytest.raises(UserError, match=f"axis {axis} is out of range for x of rank 2"):
            q.quantize(x, 0.0, 1.0, 8, axis=axis)
    with pytest.raises(UserError, match="axis 5 is out of range for x of rank 2"):
        q.fake_quantize(tf.constant(x), tf.zeros([3]), tf.ones([3]), 8.0, axis=5)  # wrapped to 1
    quant = q.AdjustableQuantizer("t", 3, axis=3)
    with pytest.raises(UserError, match="quantizer t: axis 3 is out of range for x of rank 2"):
        quant(tf.constant(x))


# --------------------------------------------------------------------------- set_range checks

BAD_RANGES = [
    ([0.0, 1.0], [1.0, 0.5]),                       # minimum > maximum in channel 1
    ([0.0, float("nan")], [1.0, 1.0]),              # a NaN bound
    ([2.0, 3.0], [1.0, float("nan")]),              # both, in two channels
]


@pytest.mark.parametrize("lo, hi", BAD_RANGES)
@pytest.mark.parametrize("kind", ["adjq", "lsq"])
def test_set_range_refuses_what_quantize_refuses_with_its_message(kind, lo, hi):
    from adj_quant.quantizers.lsq import LsqQuantizer

    with pytest.raises(UserError) as functional:
        q.quantize(tf.zeros([3, 2]), lo, hi, 8)
    make = q.AdjustableQuantizer if kind == "adjq" else LsqQuantizer
    quant = make("t/q", 2)
    before = [v.numpy().copy() for v in quant.variables]
    with pytest.raises(UserError) as module:
        quant.set_range(lo, hi)
    message = str(module.value)
    assert message == str(functional.value).replace("quantize:", "quantizer t/q:", 1)
    assert "\n" not in message and "channel" in message
    for old, v in zip(before, quant.variables):  # nothing was assigned
        np.testing.assert_array_equal(v.numpy(), old)


def test_set_range_refuses_another_channel_count_and_non_numbers_in_one_line():
    quant = q.AdjustableQuantizer("t/q", 2)
    with pytest.raises(UserError, match=r"^quantizer t/q: minimum has shape \[3\], expected "
                                        r"\[2\] \(one value per channel\)$"):
        quant.set_range([0.0, 0.0, 0.0], [1.0, 1.0])
    with pytest.raises(UserError, match=r"^quantizer t/q: maximum has shape \[\], expected \[2\]"):
        quant.set_range([0.0, 0.0], 1.0)
    with pytest.raises(UserError, match=r"^quantizer t/q: minimum is not a number or a list of "
                                        r"numbers \(got str\)$"):
        quant.set_range("low", [1.0, 1.0])
    # any shape holding one value per channel is still taken, and a one-channel scalar
    quant.set_range([[-2.0], [-1.0]], np.array([3.0, 4.0]))
    np.testing.assert_array_equal(quant.init_min.numpy(), [-2.0, -1.0])
    bias = q.AdjustableQuantizer("t/b", 1)
    bias.set_range(-0.5, 0.25)
    np.testing.assert_array_equal(bias.init_max.numpy(), [0.25])


@pytest.mark.parametrize("lo, hi, message", [
    ([-1.0, 0.0], [float("inf"), 1.0], r"the range \[-1.0, inf\] for channel 0 of axis -1 is "
                                       r"not finite; pass finite numbers"),
    ([0.0, -float("inf")], [1.0, 1.0], r"the range \[-inf, 1.0\] for channel 1 of axis -1 is "
                                       r"not finite"),
    ([0.0, 0.0], [1.0, 1e39], r"the range \[0.0, inf\] for channel 1 .* not finite"),
    ([-3e38, -3e38], [3e38, 3e38], r"the range \[-3e\+38, 3e\+38\] for channel 0 of axis -1 "
                                   r"is wider than float32 holds .*\(and 1 more channels\); "
                                   r"pass a range narrower than 3.4e38"),
])
@pytest.mark.parametrize("kind", ["adjq", "lsq"])
def test_infinite_and_overflowing_ranges_are_refused_as_quantize_refuses_them(kind, lo, hi,
                                                                              message):
    """``quantize(x, -1, inf, 8)`` returned zeros and ``[-3e38, 3e38]`` (width beyond
    float32) one value for every positive input; both are now the one-line UserError, in
    ``quantize`` and in either quantizer's ``set_range``, and nothing is assigned."""
    from adj_quant.quantizers.lsq import LsqQuantizer

    x = tf.constant([[-3e38, 0.0], [1e37, 3e38], [0.5, 2.0]], tf.float32)
    with pytest.raises(UserError, match="^quantize: " + message) as functional:
        q.quantize(x, lo, hi, 8)
    traced = tf.function(lambda x: q.quantize(x, lo, hi, 8), autograph=False)
    with pytest.raises(UserError, match=message):  # constants: checked when tracing
        traced(x)
    quant = (q.AdjustableQuantizer if kind == "adjq" else LsqQuantizer)("t/q", 2)
    before = [v.numpy().copy() for v in quant.variables]
    with pytest.raises(UserError) as module:
        quant.set_range(lo, hi)
    assert str(module.value) == str(functional.value).replace("quantize:", "quantizer t/q:", 1)
    assert "\n" not in str(module.value)
    for old, v in zip(before, quant.variables):
        np.testing.assert_array_equal(v.numpy(), old)
    # The widest range float32 holds is still taken: [-F32_MAX / 2, F32_MAX / 2].
    half = F32_MAX / 2
    quant.set_range([-half, -half], [half, half])
    assert np.isfinite(quant(x).numpy()).all()


@pytest.mark.parametrize("kind", ["adjq", "lsq"])
def test_another_channel_count_is_one_line_naming_both_counts(kind):
    """Was a raw InvalidArgumentError (adjq) or an lsq_quantize message about the step."""
    from adj_quant.quantizers.lsq import LsqQuantizer

    quant = (q.AdjustableQuantizer if kind == "adjq" else LsqQuantizer)("t/q", 3)
    x = tf.zeros([2, 4])
    want = (r"^quantizer t/q: x has 4 channels along axis 1 \(shape \[2, 4\]\), the "
            r"quantizer has 3; quantize a tensor with 3 channels or build the quantizer with "
            r"channels=4$")
    with pytest.raises(UserError, match=want):
        quant(x)
    with pytest.raises(UserError, match="x has 4 channels"):  # when traced, too
        tf.function(quant, autograph=False)(x)
    # The oracle: the right count works, and a one-channel quantizer takes any tensor.
    assert quant(tf.zeros([2, 3])).shape == [2, 3]
    one = (q.AdjustableQuantizer if kind == "adjq" else LsqQuantizer)("t/b", 1)
    assert one(x).shape == [2, 4]


def test_set_range_needs_concrete_values():
    quant = q.AdjustableQuantizer("t/q", 2)
    quant.set_range(tf.constant([-1.0, -2.0]), tf.Variable([1.0, 2.0]))  # eager: concrete
    np.testing.assert_array_equal(quant.init_min.numpy(), [-1.0, -2.0])
    with pytest.raises(UserError, match="minimum is a symbolic tensor; call set_range eagerly"):
        tf.function(lambda m: quant.set_range(m, [1.0, 1.0]))(tf.constant([0.0, 0.0]))


def test_an_unknown_range_preset_is_one_line_naming_the_presets():
    with pytest.raises(UserError) as err:
        formula.range_preset(0)
    assert str(err.value).startswith("range preset 0 does not exist; choose one of 1, 2, 3, ")
