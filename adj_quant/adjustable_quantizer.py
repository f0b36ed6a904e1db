"""The adjustable per-channel quantizer (docs/method.md, "The quantizer").

For channel ``c`` with calibrated minimum ``m_c`` and width ``w_c = M_c - m_c``::

    W_c = w_c * clip(range_scale_c, r_alpha)             # adjusted width
    L_c = m_c + w_c * clip(range_shift_c, r_beta)        # adjusted minimum
    b_c = clip(round(bits_scale_c * b0), 2, 8)           # trainable bits (else b0)
    s_c = (2^b_c - 1) / (W_c + 1e-7)
    z_c = round(L_c * s_c)
    out = (clip(round(x * s_c) - z_c, 0, 2^b_c - 1) + z_c) / s_c

Gradients (see ``docs/method.md``, "The estimator"): ``round`` is straight-through; the
clips of ``range_scale``, ``range_shift`` and the bits pass the gradient to their input only
inside ``[lo, hi]`` (bounds inclusive) and never to the bounds. The clip of the integer code
is ``minimum(maximum(t, 0), 2^b - 1)`` with ordinary gradients, as the original TF1 graph ran
it: elements above the range send their gradient to the upper bound ``2^b - 1`` and through
it to the bits (``bits_grad="original"``, the default). ``bits_grad="scale_only"`` gives the
bound no gradient (the estimator as the original's ``ClipByValue`` override was written,
which never fired); the bits then learn only through the scale ``s``.

The quantizer is total on finite inputs: its output is finite whenever ``x``, the range and
the bits are. Where the formula above would overflow float32 (ranges near +-3e38, a near-zero
width beyond ~1e27) its terms are bounded; elsewhere the bounds are inactive and the result
is bit for bit the formula's (see :func:`fake_quantize`). A negative width counts as zero.
The computation runs in float32 for every floating dtype; the result is cast back.
"""

from __future__ import annotations

import numbers

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import record as tape_record  # see _quantizer_call

from adj_quant.bits import MAX_BITS, MIN_BITS, is_bit_width  # noqa: F401  (re-exported)
from adj_quant.errors import UserError
from adj_quant import xla_config

xla_config.configure()  # faster XLA compilation and an on-disk kernel cache (see there)

EPSILON = 1e-7
#: Largest finite float32, and the smallest normal one (smaller ones may be flushed to 0).
_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).tiny)
#: Bound on the zero point ``|round(L s)|``: ``s`` is lowered to ``_MAX_CODE / |L|`` where
#: ``|L| s`` would exceed it (a near-zero width at a magnitude above ~1e27).
_MAX_CODE = 2.0 ** 124
#: ``--bits_grad``: does the upper clip bound ``2^b - 1`` pass gradient to the bits?
BITS_GRAD_MODES = ("original", "scale_only")

#: ``--range`` presets: (r_alpha, r_beta) clip intervals of range_scale and range_shift.
RANGE_PRESETS: dict[int, tuple[tuple[float, float], tuple[float, float]]] = {
    1: ((0.5, 1.3), (-0.2, 0.4)),
    2: ((0.5, 1.0), (-0.2, 0.4)),
    3: ((0.2, 1.7), (-0.4, 0.7)),
    4: ((0.1, 2.0), (-0.5, 1.0)),
    5: ((0.0, 2.0), (-0.6, 1.2)),
    6: ((0.0, 2.2), (-0.8, 1.5)),
    7: ((-100.0, 100.0), (-100.0, 100.0)),
}


def range_preset(preset: int) -> tuple[tuple[float, float], tuple[float, float]]:
    if preset not in RANGE_PRESETS:
        raise UserError(f"unknown range preset {preset!r}; choose one of "
                        f"{', '.join(map(str, RANGE_PRESETS))}")
    return RANGE_PRESETS[preset]


def check_bits(bits, name: str = "bits") -> int:
    if not is_bit_width(bits):
        raise UserError(f"{name} {bits!r} is not a bit-width; use an integer from {MIN_BITS} "
                        f"to {MAX_BITS}")
    return int(bits)


def check_bits_grad(mode: str) -> str:
    if mode not in BITS_GRAD_MODES:
        raise UserError(f"bits_grad {mode!r} is not an estimator; choose one of "
                        f"{', '.join(BITS_GRAD_MODES)}")
    return mode


def check_axis(axis, rank: int, who: str) -> int:
    """``axis`` of a rank-``rank`` tensor as an index in ``[0, rank)``; else a UserError."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise UserError(f"{who}: axis {axis!r} is not an integer; use one from {-rank} to "
                        f"{rank - 1} (x has rank {rank})")
    if not -rank <= axis < rank:
        raise UserError(f"{who}: axis {axis} is out of range for x of rank {rank}; use an axis "
                        f"from {-rank} to {rank - 1}")
    return int(axis) % rank


def _float_input(x, who: str) -> tf.Tensor:
    """``x`` as a tensor of its own floating dtype; Python numbers and lists become float32.
    Integer, bool, string (...) tensors and arrays are refused."""
    if isinstance(x, (tf.Tensor, tf.Variable, np.ndarray, np.generic)):
        try:
            dtype = tf.as_dtype(x.dtype).base_dtype
        except TypeError:
            dtype = None
        if dtype is None or not dtype.is_floating:
            name = dtype.name if dtype is not None else str(x.dtype)
            raise UserError(f"{who}: x has dtype {name}; the quantizer takes floating-point "
                            "values (bfloat16, float16, float32, float64): cast x first")
        return tf.convert_to_tensor(x, dtype)
    try:
        return tf.convert_to_tensor(x, tf.float32)
    except (TypeError, ValueError):
        raise UserError(f"{who}: x is not a tensor, an array or a list of numbers") from None


def _numeric_input(v, who: str, name: str) -> tf.Tensor:
    """A range or bits argument as a float32 tensor (a tensor of any real dtype is cast)."""
    if isinstance(v, (tf.Tensor, tf.Variable)):
        if not (v.dtype.is_floating or v.dtype.is_integer):
            raise UserError(f"{who}: {name} has dtype {v.dtype.name}; pass real numbers")
        return tf.cast(v, tf.float32)
    try:
        return tf.convert_to_tensor(v, tf.float32)
    except (TypeError, ValueError):
        raise UserError(f"{who}: {name} {v!r} is not a number or a list of numbers") from None


# --------------------------------------------------------------------------- estimators


def round_ste(x: tf.Tensor) -> tf.Tensor:
    """``round`` whose gradient is the identity."""
    return x + tf.stop_gradient(tf.round(x) - x)


def clip_ste(x: tf.Tensor, lo, hi) -> tf.Tensor:
    """``clip`` passing gradient to ``x`` only where ``lo <= x <= hi``, none to the bounds."""
    return tf.clip_by_value(x, tf.stop_gradient(lo), tf.stop_gradient(hi))


def _channel_shape(rank: int, axis: int) -> list[int]:
    shape = [1] * rank
    shape[axis] = -1
    return shape


def _sum_to(t: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """Sum ``t`` over the axes along which ``like`` (a scalar or same-rank tensor) broadcasts."""
    if like.shape.rank == 0:
        return tf.reduce_sum(t)
    axes = [i for i, d in enumerate(like.shape) if d == 1]
    return tf.reduce_sum(t, axes, keepdims=True) if axes else t


def _max_to(t: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """``t`` reduced by max over the axes along which ``like`` broadcasts (cf. ``_sum_to``)."""
    if t.shape.rank == 0:
        return t
    if like.shape.rank != t.shape.rank:
        return tf.reduce_max(t)
    axes = [i for i, d in enumerate(like.shape) if d == 1 and t.shape[i] != 1]
    return tf.reduce_max(t, axes, keepdims=True) if axes else t


def _forward_math(x, scale, zero, levels):
    r = tf.round(x * scale)
    c = tf.minimum(tf.maximum(r, zero), zero + levels)
    # The clamp only acts where a grid point lies beyond the float32 range (a range
    # reaching within half a step of +-3.4e38); it keeps those outputs finite.
    out = tf.minimum(tf.maximum(c / scale, -_F32_MAX), _F32_MAX)
    return out, r, tf.equal(r, c)


def _make_core(bound_gradient: bool):
    """The quantize-dequantize kernel with the estimator written out by hand.

    ``(clip(round(x s) - z, 0, n) + z) / s`` is computed as ``clip(round(x s), z, z + n) / s``;
    the two are equal because ``round(x s)``, ``z`` and ``n`` are integer-valued floats. With
    ``m`` = "inside", i.e. ``z <= round(x s) <= z + n`` (the ties go to ``t``, as TF's
    Maximum/Minimum gradients do), and ``u`` = "above", i.e. ``round(x s) > z + n``::

        d out/dx = m,   d out/ds = (m x - out) / s,   d out/dz = (1 - m) / s,
        d out/dn = u / s            (only with ``bound_gradient``; else 0)

    The backward recomputes ``out`` and the masks from ``x`` instead of keeping them: inside
    one compiled kernel that costs a few flops per element and saves two tensors per
    quantizer from being held between the forward and the backward pass.

    ``zero`` has ``scale``'s shape or ``scale`` is a scalar, so the per-channel sums can be
    divided by ``scale``; ``levels`` is a scalar or has ``scale``'s shape.
    """

    @tf.custom_gradient
    def core(x, scale, zero, levels):
        out, _, _ = _forward_math(x, scale, zero, levels)

        def grad(g):
            out, r, inside = _forward_math(x, scale, zero, levels)
            g_in = tf.where(inside, g, tf.zeros_like(g))
            d_scale = _sum_to(g_in * x - g * out, scale) / scale
            d_zero = _sum_to(g - g_in, zero) / scale
            if bound_gradient:
                above = r > zero + levels
                d_levels = _sum_to(tf.where(above, g, tf.zeros_like(g)) / scale, levels)
            else:
                d_levels = tf.zeros_like(levels)
            return g_in, d_scale, d_zero, d_levels

        return out, grad

    return core


_CORE = {"original": _make_core(True), "scale_only": _make_core(False)}


def _fake_quantize_math(x, low, width, bits, axis: int, bits_grad: str):
    """:func:`fake_quantize` on a float32 ``x`` with a checked ``axis`` (the formula)."""
    rank = len(x.shape)

    def per_channel(v):
        v = tf.cast(v, tf.float32)
        return tf.reshape(v, _channel_shape(rank, axis)) if v.shape.rank == 1 else v

    low, width, bits = per_channel(low), per_channel(width), per_channel(bits)
    low = tf.clip_by_value(low, -_F32_MAX, _F32_MAX)
    width = tf.clip_by_value(width, 0.0, _F32_MAX)
    levels = tf.pow(tf.constant(2.0, tf.float32), bits) - 1.0
    scale = levels / (width + EPSILON)
    scale = tf.minimum(tf.maximum(scale, _F32_TINY),
                       tf.stop_gradient(_MAX_CODE / _max_to(tf.abs(low), scale)))
    zero = round_ste(low * scale)
    return _CORE[bits_grad](x, scale, zero, levels)


# Inside a tf.function (training, evaluation) a whole quantizer -- range adjustment, bits,
# quantize-dequantize -- runs as one function call forward and one backward, traced once
# per rank of x and setting (axis, bits, range...) for tensors of any size and shared by
# every call site with that rank and setting (AdjustableQuantizer.__call__, _trace_of);
# for activations, XLA compiles one kernel per shape from that trace. The graph
# of a network then holds two calls per quantizer instead of dozens of ops, and the
# elementwise work of an activation is one fused kernel each way, while the convolutions
# stay on the regular kernels. Eagerly (tests, calibration bookkeeping) the same math runs
# op by op. ``use_fused_kernels(False)`` turns the functions off (plain TF ops in the
# caller's graph); the functional ``fake_quantize`` compiles its own kernel per signature.
_fake_quantize_xla = tf.function(_fake_quantize_math, jit_compile=True)
_FUSED = {"on": True}


def use_fused_kernels(enabled: bool) -> None:
    _FUSED["on"] = bool(enabled)


def _fused() -> bool:
    return _FUSED["on"] and tf.inside_function()


def fake_quantize(x: tf.Tensor, low: tf.Tensor, width: tf.Tensor, bits: tf.Tensor,
                  axis: int = -1, bits_grad: str = "original") -> tf.Tensor:
    """Quantize-dequantize ``x`` with per-channel minimum ``low``, width and bits.

    ``low``, ``width`` and ``bits`` are scalars or vectors along ``axis``; this is the
    forward pass of the method with its straight-through gradients. ``bits_grad`` picks the
    estimator of the upper clip bound (:data:`BITS_GRAD_MODES`).

    Total on finite inputs (the output is finite), by bounds that are inactive, so leave
    values and gradients bit for bit unchanged, except where the formula would overflow:

    * a negative ``width`` counts as zero (and passes no gradient); a width beyond float32
      (``inf``, e.g. an overflowed ``max - min``) counts as the float32 maximum, so the grid
      then covers ``[low, low + 3.4e38]``;
    * ``low`` is clipped to the float32 range;
    * the scale ``s`` is kept at or above the smallest normal float32 (otherwise flushed to
      zero: 2 bits on a width above ~2.5e38) and at or below ``2**124 / |low|`` (a near-zero
      width at a magnitude above ~1e27), so that the zero point ``round(low s)`` stays
      finite; no gradient flows through these bounds;
    * outputs beyond float32 (a grid point within half a step of +-3.4e38) are clamped to it.

    ``x`` may have any floating dtype; the quantizer computes in float32 and casts the
    result back, so a bfloat16/float16/float64 result equals the float32 one cast.
    """
    bits_grad = check_bits_grad(bits_grad)
    x = _float_input(x, "fake_quantize")
    dtype = x.dtype
    rank = len(x.shape)
    axis = check_axis(axis, rank, "fake_quantize") if rank else 0
    if dtype != tf.float32:
        x = tf.cast(x, tf.float32)
    low, width, bits = (tf.cast(v, tf.float32) for v in (low, width, bits))
    kernel = _fake_quantize_xla if _fused() else _fake_quantize_math
    out = kernel(x, low, width, bits, axis, bits_grad)
    return out if dtype == tf.float32 else tf.cast(out, dtype)


def _check_range(minimum, maximum, axis) -> None:
    """Refuse ``minimum > maximum`` or a NaN bound (values known when tracing or eager)."""
    lo, hi = tf.get_static_value(minimum), tf.get_static_value(maximum)
    if lo is None or hi is None:
        return
    lo, hi = np.broadcast_arrays(np.atleast_1d(lo), np.atleast_1d(hi))
    bad = np.flatnonzero(~(lo <= hi))
    if not bad.size:
        return
    c = int(bad[0])
    where = f" for channel {c} of axis {axis}" if lo.size > 1 else ""
    more = f" (and {bad.size - 1} more channels)" if bad.size > 1 else ""
    if np.isnan(lo[c]) or np.isnan(hi[c]):
        raise UserError(f"quantize: the range [{lo[c]!s}, {hi[c]!s}]{where} is NaN{more}; pass "
                        "numbers")
    raise UserError(f"quantize: minimum {lo[c]!s} > maximum {hi[c]!s}{where}{more}; pass "
                    "minimum <= maximum (swapped arguments?)")


def _check_bits_tensor(bits: tf.Tensor) -> tf.Tensor:
    """Bits known when tracing (or eager) are checked now; others get a runtime assertion."""
    known = tf.get_static_value(bits)
    if known is not None:
        if (np.any(known < MIN_BITS) or np.any(known > MAX_BITS)
                or np.any(known != np.round(known))):
            raise UserError(f"quantize: bits {np.unique(known).tolist()} must be integers in "
                            f"[{MIN_BITS}, {MAX_BITS}]")
        return bits
    ok = tf.reduce_all((bits >= MIN_BITS) & (bits <= MAX_BITS) & (tf.round(bits) == bits))
    check = tf.debugging.Assert(
        ok, [f"quantize: bits must be integers in [{MIN_BITS}, {MAX_BITS}], got", bits])
    with tf.control_dependencies([check]):
        return tf.identity(bits)


def quantize(x, minimum, maximum, bits, axis: int = -1, bits_grad: str = "original") -> tf.Tensor:
    """Functional quantizer: per-channel ``minimum``, ``maximum`` and ``bits`` (scalars broadcast).

    Returns the dequantized tensor. Equals
    ``tf.quantization.fake_quant_with_min_max_vars_per_channel`` up to rounding ties.

    ``x`` keeps its floating dtype (bfloat16, float16, float32, float64; computed in float32,
    see :func:`fake_quantize`); Python numbers and lists give float32; other dtypes are a
    :class:`UserError`. Ranges and bits whose values are known (eagerly, or constants when
    tracing) are checked: ``minimum > maximum`` or non-integer bits are a UserError. Bits
    only known when a ``tf.function`` runs are checked then by a ``tf.debugging.Assert``
    (an ``InvalidArgumentError``; XLA-compiled functions skip it); a range only known then
    with ``minimum > maximum`` is quantized as a zero-width range at ``minimum``.
    """
    x = _float_input(x, "quantize")
    if x.shape.rank == 0:
        raise UserError("quantize: x must have at least one dimension")
    check_axis(axis, x.shape.rank, "quantize")
    minimum = _numeric_input(minimum, "quantize", "minimum")
    maximum = _numeric_input(maximum, "quantize", "maximum")
    bits = _numeric_input(bits, "quantize", "bits")
    channels = x.shape[axis]
    for name, v in (("minimum", minimum), ("maximum", maximum), ("bits", bits)):
        if v.shape.rank > 1 or (v.shape.rank == 1 and v.shape[0] not in (1, channels)):
            raise UserError(f"quantize: {name} has shape {v.shape.as_list()}, expected a scalar "
                            f"or [{channels}] (the size of axis {axis} of x)")
    bits = _check_bits_tensor(bits)
    _check_range(minimum, maximum, axis)
    return fake_quantize(x, minimum, maximum - minimum, bits, axis, bits_grad)


# --------------------------------------------------------------------------- the module


def _bits_math(bits_scale, init_bits: int) -> tf.Tensor:
    """``clip(round(bits_scale * init_bits), 2, 8)`` with straight-through round and clip."""
    return clip_ste(round_ste(bits_scale * init_bits), float(MIN_BITS), float(MAX_BITS))


def _live_range_math(x, axis: int, per_tensor: bool) -> tuple[tf.Tensor, tf.Tensor]:
    """``x``'s own min/max: per tensor (shape ``[1]``) or per channel along ``axis``."""
    if per_tensor:
        return tf.reshape(tf.reduce_min(x), [1]), tf.reshape(tf.reduce_max(x), [1])
    axes = [i for i in range(len(x.shape)) if i != axis]
    return tf.reduce_min(x, axes), tf.reduce_max(x, axes)


def _adjusted_range_math(minimum, maximum, range_scale, range_shift, alpha, beta):
    """``(L, W) = (m + w clip(range_shift, beta), w clip(range_scale, alpha))``, ``w = M - m``."""
    # Capped so that an overflowed width (calibrated at +-3e38) times a zero shift
    # stays finite; no effect on any width float32 can hold.
    width = tf.minimum(maximum - minimum, _F32_MAX)
    scale = clip_ste(range_scale, *alpha)
    shift = clip_ste(range_shift, *beta)
    return minimum + width * shift, width * scale


def _quantizer_math(x, init_min, init_max, range_scale, range_shift, bits_scale, *, axis: int,
                    init_bits: int, alpha, beta, bits_grad: str, live_range: bool,
                    per_tensor: bool) -> tf.Tensor:
    """One :class:`AdjustableQuantizer` call on a float32 ``x``, from its variables' values.

    ``bits_scale`` is None for fixed bits. The keyword arguments are the quantizer's
    settings; compiled (:data:`_quantizer_xla`) they are part of the function's signature.
    """
    if live_range:
        minimum, maximum = _live_range_math(x, axis, per_tensor)
    else:
        minimum, maximum = init_min, init_max
    low, width = _adjusted_range_math(minimum, maximum, range_scale, range_shift, alpha, beta)
    if bits_scale is None:
        bits = tf.fill(tf.shape(low), float(init_bits))
    else:
        bits = _bits_math(bits_scale, init_bits)
    if per_tensor:
        low, width, bits = low[0], width[0], bits[0]
    return _fake_quantize_math(x, low, width, bits, axis, bits_grad)


def _quantizer_vjp_math(g, x, init_min, init_max, range_scale, range_shift, bits_scale,
                        **settings) -> list[tf.Tensor]:
    """The gradients of :func:`_quantizer_math` given the output gradient ``g``: for ``x``,
    ``init_min``, ``init_max``, ``range_scale``, ``range_shift`` and (if not None)
    ``bits_scale``. The forward is recomputed from ``x``; nothing of it is kept."""
    params = [init_min, init_max, range_scale, range_shift]
    params += [] if bits_scale is None else [bits_scale]
    with tf.GradientTape() as tape:
        tape.watch([x] + params)
        out = _quantizer_math(x, init_min, init_max, range_scale, range_shift, bits_scale,
                              **settings)
    return tape.gradient(out, [x] + params, output_gradients=g,
                         unconnected_gradients=tf.UnconnectedGradients.ZERO)


def _site_forward(x, *params, **settings) -> tf.Tensor:
    """:func:`_quantizer_math` with ``bits_scale`` left out for fixed bits (4 parameters)."""
    return _quantizer_math(x, *params, *[None] * (5 - len(params)), **settings)


def _site_vjp(g, x, *params, **settings) -> list[tf.Tensor]:
    """:func:`_quantizer_vjp_math` for :func:`_site_forward`: the gradients of ``x`` and of
    each parameter."""
    return _quantizer_vjp_math(g, x, *params, *[None] * (5 - len(params)), **settings)


#: :func:`_site_forward` and its gradients as XLA-compiled functions, one per signature
#: (see ``_fused``): for activations, where one fused pass over a large tensor each way pays
#: for the compilation.
_quantizer_xla = tf.function(_site_forward, jit_compile=True, autograph=False)
_quantizer_vjp_xla = tf.function(_site_vjp, jit_compile=True, autograph=False)
#: The same as plain functions whose traces generalise over shapes: weights, biases and
#: small activations (the SE layers' 1x1 maps), where the elementwise work is small and a
#: compilation per shape would cost more than it saves. One trace serves every call site of
#: a rank and setting. Not inlined: TensorFlow would otherwise copy the shape-generic body
#: into the caller's graph at every call site and optimise each copy (about 16 s of start-up
#: for EfficientNet-B0's weights and biases).
_NOINLINE = {"_noinline": True}
_quantizer_shared = tf.function(_site_forward, autograph=False,
                                experimental_attributes=_NOINLINE)
_quantizer_vjp_shared = tf.function(_site_vjp, autograph=False,
                                    experimental_attributes=_NOINLINE)


#: Concrete functions of the four functions above, by (function, rank of x, number of
#: parameters, settings): see :func:`_trace_of`.
_TRACES: dict = {}


def _trace_of(fn, rank: int, num_params: int, settings: dict, *, vjp: bool):
    """``fn``'s one trace for every ``x`` of this rank (any shape, any channel count):
    traced for inputs of unknown sizes, so XLA compiles one kernel per shape from it.

    Calling the concrete function skips ``tf.function``'s per-call signature matching, which
    cost about 4 ms per call site when tracing EfficientNet-B0's ~300 quantizers each way.
    """
    key = (fn, rank, num_params, tuple(sorted(settings.items())))
    trace = _TRACES.get(key)
    if trace is None:
        x = tf.TensorSpec([None] * rank, tf.float32)
        params = [tf.TensorSpec([None], tf.float32)] * num_params
        args = [x] * (2 if vjp else 1) + params
        trace = _TRACES[key] = fn.get_concrete_function(*args, **settings)
    return trace


def _quantizer_call(forward, vjp, x, init_min, init_max, range_scale, range_shift, bits_scale,
                    **settings) -> tf.Tensor:
    """One call of the function ``forward``; its gradient is one call of ``vjp``.

    The gradient is attached here rather than differentiated through ``forward``:
    TensorFlow would then make the forward return the tensors its backward needs (``x``
    itself, copied out of a compiled kernel); this way the backward reads ``x`` directly.

    The call is recorded on the gradient tape directly (what ``tf.custom_gradient`` does
    eagerly) rather than through ``tf.custom_gradient``'s graph form, which wraps every call
    site in an ``IdentityN`` with one output per input and, in the backward, builds a zero
    tensor for each of those outputs (five or six graph ops per call site that grappler then
    prunes; about 1 900 of the quantized EfficientNet-B0 step's 11 000). Gradients are
    computed with ``tf.GradientTape``, as everywhere in adjq; the symbolic ``tf.gradients``
    does not see them.
    """
    values = [init_min, init_max, range_scale, range_shift]
    values += [] if bits_scale is None else [bits_scale]
    forward = _trace_of(forward, len(x.shape), len(values), settings, vjp=False)
    vjp = _trace_of(vjp, len(x.shape), len(values), settings, vjp=True)
    with tape_record.stop_recording():
        out = forward(x, *values, **settings)
    out.set_shape(x.shape)  # a trace shared by many shapes returns an unknown shape

    def grad(g):
        grads = vjp(g, x, *values, **settings)
        for grad_v, v in zip(grads, [x] + values):
            grad_v.set_shape(v.shape)
        return grads

    tape_record.record_operation("AdjustableQuantizer", [out], [x] + values, grad)
    return out


#: Activations with fewer elements than this run :data:`_quantizer_shared`.
COMPILE_MIN_ELEMENTS = 1 << 16


class AdjustableQuantizer(tf.Module):
    """Per-channel quantizer with trainable range and (optionally) trainable bits.

    Variables (names under ``scope``): ``init_min`` / ``init_max`` (calibrated, not
    trainable), ``range_scale``, ``range_shift`` and, with ``bits_trainable``,
    ``bits_scale``. ``channels=1`` makes it a per-tensor quantizer (used for biases).

    ``live_range=True`` takes the base range ``[m, M]`` from the quantized tensor itself at
    every call (its per-channel min/max, with gradient through them) instead of the
    calibrated ``init_min`` / ``init_max``; the original used this for biases.
    ``bits_grad`` is the estimator of the upper clip bound (:data:`BITS_GRAD_MODES`).
    ``compiled=False`` keeps the quantizer out of the per-shape XLA kernels (for weights
    and biases: many distinct small shapes); the result is the same either way.
    """

    def __init__(self, scope: str, channels: int, *, axis: int = -1, init_bits: int = 8,
                 bits_trainable: bool = False, range_preset_id: int = 5,
                 bits_grad: str = "original", live_range: bool = False, compiled: bool = True):
        super().__init__(name=None)
        self.compiled = bool(compiled)
        self.scope, self.channels, self.axis = scope, channels, axis
        self.init_bits = check_bits(init_bits)
        (self.alpha_lo, self.alpha_hi), (self.beta_lo, self.beta_hi) = range_preset(range_preset_id)
        self.bits_trainable = bits_trainable
        self.bits_grad = check_bits_grad(bits_grad)
        self.live_range = bool(live_range)
        self.init_min = tf.Variable(np.full([channels], -1.0, np.float32), trainable=False,
                                    name=f"{scope}/init_min")
        self.init_max = tf.Variable(np.full([channels], 1.0, np.float32), trainable=False,
                                    name=f"{scope}/init_max")
        ones, zeros = np.ones([channels], np.float32), np.zeros([channels], np.float32)
        self.range_scale = tf.Variable(ones, name=f"{scope}/range_scale")
        self.range_shift = tf.Variable(zeros, name=f"{scope}/range_shift")
        self.bits_scale = (tf.Variable(ones, name=f"{scope}/bits_scale")
                           if bits_trainable else None)

    @property
    def _settings(self) -> dict:
        """The static arguments of :func:`_quantizer_math` (part of the compiled signature)."""
        return dict(init_bits=self.init_bits, alpha=(self.alpha_lo, self.alpha_hi),
                    beta=(self.beta_lo, self.beta_hi), bits_grad=self.bits_grad,
                    live_range=self.live_range, per_tensor=self.channels == 1)

    def bits(self) -> tf.Tensor:
        """Current per-channel bits ``[channels]`` (float, integer-valued, differentiable)."""
        if self.bits_scale is None:
            return tf.fill([self.channels], float(self.init_bits))
        return _bits_math(self.bits_scale, self.init_bits)

    def base_range(self, x: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """``(m, M)`` per channel: calibrated, or ``x``'s own min/max with ``live_range``."""
        if not self.live_range or x is None:
            return self.init_min, self.init_max
        return _live_range_math(x, self.axis % max(len(x.shape), 1), self.channels == 1)

    def adjusted_range(self, x: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """``(L, W)``: the adjusted per-channel minimum and width (of ``x``'s live range
        with ``live_range``; pass the tensor being quantized)."""
        minimum, maximum = self.base_range(x)
        return _adjusted_range_math(minimum, maximum, self.range_scale, self.range_shift,
                                    (self.alpha_lo, self.alpha_hi), (self.beta_lo, self.beta_hi))

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        """Quantize ``x`` (any floating dtype: computed in float32, returned in ``x``'s)."""
        x = _float_input(x, f"quantizer {self.scope}")
        rank = len(x.shape)
        axis = 0
        if rank or self.channels != 1:
            axis = check_axis(self.axis, rank, f"quantizer {self.scope}")
        dtype = x.dtype
        x = tf.cast(x, tf.float32)
        # Values, not variables, so that one trace serves quantizers of any channel count.
        values = [None if v is None else tf.convert_to_tensor(v) for v in (
            self.init_min, self.init_max, self.range_scale, self.range_shift, self.bits_scale)]
        if not _fused():
            out = _quantizer_math(x, *values, axis=axis, **self._settings)
        elif self.compiled and (x.shape.num_elements() or 0) >= COMPILE_MIN_ELEMENTS:
            out = _quantizer_call(_quantizer_xla, _quantizer_vjp_xla, x, *values, axis=axis,
                                  **self._settings)
        else:
            out = _quantizer_call(_quantizer_shared, _quantizer_vjp_shared, x, *values,
                                  axis=axis, **self._settings)
        return out if dtype == tf.float32 else tf.cast(out, dtype)

    def set_range(self, minimum, maximum) -> None:
        """Set the calibrated per-channel range ``[minimum, maximum]``."""
        minimum = np.asarray(minimum, np.float32).reshape([self.channels])
        maximum = np.asarray(maximum, np.float32).reshape([self.channels])
        self.init_min.assign(minimum)
        self.init_max.assign(maximum)
