"""Property tests (hypothesis) of the quantizer on its whole domain: finite float32 inputs
and ranges, bits 2-8, ranks 1-4, any axis, per-channel or scalar ranges and bits.

For every case, checked in numpy (float64 where it matters), not with the code under test:

* finite: the output is finite;
* levels: at most ``2^b`` distinct values per channel;
* idempotent: quantizing the output again gives the output (exactly, wherever float32 can
  hold the integer codes with room to spare, i.e. ``max(|min|, |max|) / step <= 2^21``;
  where the step is below float32's resolution at the range, to within a step);
* bounds: the output lies within ``[min - step, max + 1e-7 + step]`` with
  ``step = (max - min + 1e-7) / (2^b - 1)``, up to float32 rounding (a few ulps of the range's
  magnitude). The ``1e-7`` is the method's epsilon: its grid spans ``[min, max + 1e-7]``, so a
  zero-width range has a grid of width ``1e-7``.

For ``AdjustableQuantizer`` ``[min, max]`` is its adjusted range ``[L, L + W]`` (computed in
numpy float64 from its variables). Also: another float dtype gives the float32 result cast;
the fused XLA kernels inside ``tf.function`` give the eager result bit for bit; for ordinary
ranges the output is bit for bit the documented formula computed in numpy float32.

Every test runs 1,000 examples (derandomized: CI sees the same cases on every run).
"""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adj_quant.quantizers import adjustable as q
from adj_quant.quantizers import formula

F32_MAX = float(np.finfo(np.float32).max)
X_MAX = float(np.float32(1e30))  # "up to 1e30", as a float32
EPS = 1e-7  # the method's epsilon (docs/method.md): s = (2^b - 1) / (W + 1e-7)

PROPERTIES = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# A finite float32: ordinary, large (up to 1e30), or anything float32 holds (+-3.4e38,
# subnormals, zeros: hypothesis favours the edge cases).
finite32 = st.one_of(st.floats(-10, 10, width=32), st.floats(-X_MAX, X_MAX, width=32),
                     st.floats(width=32, allow_nan=False, allow_infinity=False))


@st.composite
def range_pairs(draw, value=finite32):
    """``(min, max)`` with ``min <= max``: independent ends, a zero width, or a narrow one."""
    a = draw(value)
    kind = draw(st.sampled_from(("any", "zero", "narrow")))
    if kind == "any":
        b = draw(value)
    elif kind == "zero":
        b = a
    else:
        grow = abs(a) * 10.0 ** draw(st.floats(-9, -2)) + draw(st.floats(0, 1e-3))
        b = float(np.float32(min(a + grow, F32_MAX)))
    return min(a, b), max(a, b)


@st.composite
def cases(draw, value=finite32, max_abs=F32_MAX):
    """x (float32), minimum, maximum, bits (each a scalar or per channel) and axis.

    One channel's range and bits come from hypothesis (edge cases, shrinking), the other
    channels' from a hypothesis-chosen numpy seed (a mix of magnitudes up to ``max_abs``,
    zero, narrow and wide widths), which keeps examples cheap to generate."""
    rank = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    axis = draw(st.integers(-rank, rank - 1))
    channels = shape[axis]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    special = rng.integers(channels)
    lo, hi = _numpy_ranges(rng, channels, max_abs)
    lo[special], hi[special] = draw(range_pairs(value))
    bits = rng.integers(2, 9, channels).astype(np.float32)
    bits[special] = draw(st.integers(2, 8))
    if not draw(st.booleans()):
        lo, hi = lo[special], hi[special]
    if not draw(st.booleans()):
        bits = np.float32(bits[special])
    return _values(draw, rng, shape, axis, lo, hi), lo, hi, bits, axis


def _numpy_ranges(rng, n, max_abs):
    """``n`` float32 ranges: log-uniform magnitudes, either sign; wide, zero or narrow."""
    def magnitudes():
        return rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-3, np.log10(max_abs), n)

    a = magnitudes()
    kind = rng.integers(0, 3, n)
    b = np.where(kind == 0, magnitudes(),
                 np.where(kind == 1, a, a + np.abs(a) * 10.0 ** rng.uniform(-9, -2, n)))
    a, b = (np.clip(v, -max_abs, max_abs).astype(np.float32) for v in (a, b))
    return np.minimum(a, b), np.maximum(a, b)


def _values(draw, rng, shape, axis, lo, hi):
    """x: a mix of values inside/around the range, ordinary ones and huge ones (|x| <= 1e30),
    from the numpy ``rng``, plus a few hypothesis-chosen special values."""
    channels = shape[axis]
    lo_c = np.broadcast_to(np.asarray(lo, np.float64), [channels])
    hi_c = np.broadcast_to(np.asarray(hi, np.float64), [channels])
    moved = list(shape)
    moved.append(moved.pop(axis % len(shape)))
    t = rng.uniform(-0.3, 1.3, moved)
    around = np.clip(lo_c + t * (hi_c - lo_c), -F32_MAX, F32_MAX)
    ordinary = rng.normal(0, 10.0 ** rng.uniform(-3, 3), moved)
    huge = rng.choice([-1, 1], moved) * 10.0 ** rng.uniform(-30, 30, moved)
    which = rng.integers(0, 3, moved)
    x = np.where(which == 0, around, np.where(which == 1, ordinary, huge)).astype(np.float32)
    flat = x.reshape(-1)
    for v in draw(st.lists(st.floats(-X_MAX, X_MAX, width=32), max_size=3)):
        flat[rng.integers(flat.size)] = v
    return np.moveaxis(x, -1, axis % len(shape))


def _ulp(magnitude):
    """float32 spacing at ``magnitude`` (at most twice it; float64 in and out)."""
    m = np.minimum(magnitude, F32_MAX).astype(np.float32)
    return 2 * (m - np.nextafter(m, np.float32(0))).astype(np.float64)


def _by_channel(v, axis):
    """``v`` as ``[elements, channels]`` along ``axis``."""
    v = np.moveaxis(np.asarray(v), axis, -1)
    return v.reshape(-1, v.shape[-1])


def check_properties(out, lo, hi, bits, axis, again=None):
    """The four properties for one output; ``lo``/``hi`` are the (adjusted) range, float64."""
    assert np.isfinite(out).all(), "non-finite output"
    ch = _by_channel(out, axis).astype(np.float64)
    channels = ch.shape[1]
    lo_c = np.broadcast_to(np.asarray(lo, np.float64), [channels])
    hi_c = np.broadcast_to(np.asarray(hi, np.float64), [channels])
    b_c = np.broadcast_to(np.asarray(bits, np.float64), [channels])
    levels = 2.0**b_c
    for c in range(channels):
        assert len(np.unique(ch[:, c])) <= levels[c], f"channel {c}: more than 2^b values"
    step = (hi_c - lo_c + EPS) / (levels - 1)
    slack = 4 * _ulp(np.maximum(np.abs(lo_c), np.abs(hi_c)))
    below = ch < lo_c - step - slack
    above = ch > hi_c + EPS + step + slack
    assert not below.any() and not above.any(), (
        f"out of bounds: {ch[below | above][:3]} vs [{lo_c}, {hi_c}] step {step}")
    if again is not None:
        # Where the integer codes (|range| / step) stay below 2^21, re-quantizing gives the
        # same grid point up to float32 rounding of (c / s) * s (a few ulps at the range's
        # magnitude); where the step is finer than float32 resolves there, a value may move
        # by one step.
        diff = np.abs(_by_channel(again, axis).astype(np.float64) - ch)
        exact = np.maximum(np.abs(lo_c), np.abs(hi_c)) / step <= 2.0**21
        assert (diff[:, exact] <= slack[exact]).all(), "not idempotent"
        assert (diff <= step + slack).all(), "re-quantizing moved a value by more than a step"


@PROPERTIES
@given(cases(), st.sampled_from([tf.bfloat16, tf.float16, tf.float64]))
def test_quantize_properties(case, dtype):
    """``quantize`` on finite float32 data and ranges: finite, <= 2^b levels, idempotent,
    bounded. And ``x`` in another float dtype: computed in float32, the result cast back."""
    x, lo, hi, bits, axis = case
    out = q.quantize(x, lo, hi, bits, axis).numpy()
    again = q.quantize(out, lo, hi, bits, axis).numpy()
    check_properties(out, lo, hi, bits, axis, again)

    xd = tf.cast(tf.constant(x), dtype)
    out_d = q.quantize(xd, lo, hi, bits, axis)
    assert out_d.dtype == dtype
    expected = tf.cast(q.quantize(tf.cast(xd, tf.float32), lo, hi, bits, axis), dtype)
    np.testing.assert_array_equal(out_d.numpy(), expected.numpy(), err_msg=f"{dtype.name} result")


def _numpy_quantizer(x, lo, hi, bits, axis):
    """The documented formula in numpy float32 (module docstring), no bounds; the integer
    code computed as ``clip(round(x s), z, z + n)`` as the kernel does (equal for integers)."""
    shape = [1] * x.ndim
    shape[axis] = -1
    f = np.float32
    lo, hi, bits = (np.asarray(v, f).reshape(shape) if np.ndim(v) else f(v)
                    for v in (lo, hi, bits))
    n = f(2.0) ** bits - f(1)
    s = n / ((hi - lo) + f(EPS))
    z = np.round(lo * s)
    with np.errstate(over="ignore"):
        code = np.minimum(np.maximum(np.round(x * s), z), z + n)  # = clip(round(xs) - z, 0, n) + z
    return (code / s).astype(f)


@PROPERTIES
@given(cases(value=st.floats(-1e4, 1e4, width=32), max_abs=1e4))
def test_quantize_equals_numpy_formula_on_ordinary_ranges(case):
    """Ranges within +-1e4 (x still up to +-1e30): bit for bit the numpy formula."""
    x, lo, hi, bits, axis = case
    out = q.quantize(x, lo, hi, bits, axis).numpy()
    np.testing.assert_array_equal(out, _numpy_quantizer(x, lo, hi, bits, axis))


_QUANTIZERS: dict = {}


def _module(channels, axis, init_bits, bits_trainable, preset, live):
    """Quantizers are cached by configuration (variables are re-assigned per example)."""
    key = (channels, axis, init_bits, bits_trainable, preset, live)
    if key not in _QUANTIZERS:
        _QUANTIZERS[key] = q.AdjustableQuantizer(
            "p", channels, axis=axis, init_bits=init_bits, bits_trainable=bits_trainable,
            range_preset_id=preset, live_range=live)
    return _QUANTIZERS[key]


@st.composite
def module_cases(draw):
    """An AdjustableQuantizer (per-channel or per-tensor, trainable bits or not, any preset,
    calibrated or live range) with arbitrary range_scale/range_shift/bits_scale, and x."""
    x, lo, hi, _, axis = draw(cases())
    channels = x.shape[axis]
    n = 1 if draw(st.booleans()) else channels
    if n == 1:
        lo, hi = (np.array([v], np.float32) for v in draw(range_pairs()))
    else:
        lo, hi = np.broadcast_to(lo, [n]).copy(), np.broadcast_to(hi, [n]).copy()
    # range_scale, range_shift, bits_scale: channel 0 from hypothesis, the others numpy.
    factors = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).uniform(-3, 3, (3, n))
    factors[:, 0] = draw(st.tuples(*3 * [st.floats(-3, 3, width=32)]))
    factors = factors.astype(np.float32)
    return dict(x=x, axis=axis, channels=n, lo=lo, hi=hi,
                init_bits=draw(st.integers(2, 8)), bits_trainable=draw(st.booleans()),
                preset=draw(st.integers(1, 7)), live=draw(st.booleans()),
                range_scale=factors[0], range_shift=factors[1], bits_scale=factors[2])


def _run_module(c):
    quant = _module(c["channels"], c["axis"], c["init_bits"], c["bits_trainable"], c["preset"],
                    c["live"])
    quant.set_range(c["lo"], c["hi"])
    quant.range_scale.assign(c["range_scale"])
    quant.range_shift.assign(c["range_shift"])
    if quant.bits_scale is not None:
        quant.bits_scale.assign(c["bits_scale"])
    return quant, quant(tf.constant(c["x"])).numpy()


def _expected_range_and_bits(c):
    """numpy float64: the adjusted range ``[L, L + W]`` (widened by float32 rounding) and the
    bits of the module."""
    x, axis, n = c["x"], c["axis"], c["channels"]
    if c["live"]:
        v = _by_channel(x, axis).astype(np.float64)
        m, M = (v.min(), v.max()) if n == 1 else (v.min(0), v.max(0))
    else:
        m, M = c["lo"].astype(np.float64), c["hi"].astype(np.float64)
    (a_lo, a_hi), (b_lo, b_hi) = formula.RANGE_PRESETS[c["preset"]]
    # Documented: a width or minimum beyond float32 counts as the float32 maximum; a negative
    # width (preset 7's negative range_scale) as zero.
    w = np.minimum(M - m, F32_MAX)
    low = np.clip(m + w * np.clip(c["range_shift"].astype(np.float64), b_lo, b_hi),
                  -F32_MAX, F32_MAX)
    width = np.clip(w * np.clip(c["range_scale"].astype(np.float64), a_lo, a_hi), 0, F32_MAX)
    bits = np.full(n, float(c["init_bits"]))
    if c["bits_trainable"]:
        bits = np.clip(np.round(c["bits_scale"].astype(np.float64) * c["init_bits"]), 2, 8)
    # The module computes the adjusted range in float32: allow a few ulps of its magnitude.
    slack = 8 * _ulp(np.max(np.abs(np.broadcast_arrays(m, M, low, low + width)), axis=0))
    return low - slack, low + width + slack, bits


@PROPERTIES
@given(module_cases())
@example({  # zero-width channels near 0.003: re-quantizing moved a value by one float32 ulp
    "x": np.array([3.073783e02, -1.164617e-03], np.float32), "axis": 0, "channels": 2,
    "lo": np.array([-1.872681, -1.872681], np.float32), "hi": np.array([0.0, 0.0], np.float32),
    "init_bits": 4, "bits_trainable": True, "preset": 5, "live": False,
    "range_scale": np.array([0.0, -1.3812797], np.float32),
    "range_shift": np.array([1.0017077, -2.900834], np.float32),
    "bits_scale": np.array([2.0, 2.4765334], np.float32)})
def test_module_properties(c):
    """AdjustableQuantizer, any preset (7 allows negative widths), any finite calibrated or live
    range (also ones whose width or adjusted minimum overflow float32), arbitrary range_scale,
    range_shift and bits_scale: finite, <= 2^b levels per channel, within the adjusted range,
    idempotent (for a calibrated range: a live one moves with the input)."""
    quant, out = _run_module(c)
    low, high, bits = _expected_range_and_bits(c)
    again = None if c["live"] else quant(tf.constant(out)).numpy()
    if c["channels"] == 1:
        out, again = out.reshape(-1, 1), (None if again is None else again.reshape(-1, 1))
        axis = -1
    else:
        axis = c["axis"]
    check_properties(out, low, high, bits, axis, again)


_SHAPE, _AXIS = (2, 3, 4), 1


@tf.function(input_signature=[tf.TensorSpec(_SHAPE, tf.float32)] + 3 * [tf.TensorSpec([3])])
def _traced(x, lo, hi, bits):
    return q.quantize(x, lo, hi, bits, _AXIS)


@PROPERTIES
@given(st.data())
def test_fused_xla_kernels_equal_eager_on_the_whole_domain(data):
    """Inside tf.function (fused XLA kernels; range and bits only known at run time) the
    output equals the eager one bit for bit, also for extreme ranges."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    lo, hi = _numpy_ranges(rng, 3, F32_MAX)
    special = rng.integers(3)
    lo[special], hi[special] = data.draw(range_pairs())
    bits = rng.integers(2, 9, 3).astype(np.float32)
    bits[special] = data.draw(st.integers(2, 8))
    x = _values(data.draw, rng, list(_SHAPE), _AXIS, lo, hi)
    eager = q.quantize(x, lo, hi, bits, _AXIS).numpy()
    assert np.isfinite(eager).all()
    np.testing.assert_array_equal(_traced(x, lo, hi, bits).numpy(), eager)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
