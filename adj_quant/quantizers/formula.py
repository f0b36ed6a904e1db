"""The adjustable quantizer's formula, its gradients and the checks of its inputs
(docs/method.md, "The quantizer"). Pure functions of tensors: no variables, no compiled
kernels (those are in :mod:`adj_quant.quantizers.kernels`).

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

**Symmetric weight grids** (``symmetric=True``, ``--symmetric_weights``; weight quantizers
only). The grid is centred on 0 with zero point 0 and a narrow integer range::

    A_c = max(|m_c|, |M_c|) * clip(range_scale_c, r_alpha)   # amplitude
    b_c = clip(round(bits_scale_c * b0), 2, 8)               # as above
    n_c = 2^(b_c - 1) - 1
    s_c = n_c / (A_c + 1e-7)
    out = clip(round(x * s_c), -n_c, n_c) / s_c

``range_shift`` is not used (its gradient is 0). A channel has ``2 n_c + 1 = 2^b_c - 1``
levels ``k / s_c``, ``|k| <= n_c``: at 2 bits ``{-1, 0, 1} / s_c``. The estimator mirrors the
asymmetric one: the round is straight-through, and the code clip is
``minimum(maximum(t, -n), n)`` with ordinary gradients, so with ``bits_grad="original"`` an
element above the grid sends its gradient to the bound ``n`` and one below it to ``-n``
(``d out/dn = (u - l) / s``, ``u``/``l`` = above/below), and through ``n`` to the bits
(``dn/db = 2^(b-1) ln 2``); with ``"scale_only"`` the bounds pass none and the bits learn
only through ``s``. A negative amplitude counts as 0, one beyond float32 as its maximum,
and ``s`` is kept at or above the smallest normal float32 (no gradient through these
bounds); elsewhere they are inactive.

The quantizer is total on finite inputs: its output is finite whenever ``x``, the range and
the bits are. Where the formula above would overflow float32 (ranges near +-3e38, a near-zero
width beyond ~1e27) its terms are bounded; elsewhere the bounds are inactive and the result
is bit for bit the formula's (see :func:`adj_quant.quantizers.adjustable.fake_quantize`). A
negative width counts as zero. The computation runs in float32 for every floating dtype; the
result is cast back.
"""

from __future__ import annotations

import numbers

import numpy as np
import tensorflow as tf

from adj_quant.bits import MAX_BITS, MIN_BITS, is_bit_width
from adj_quant.errors import UserError

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
        # Worded so that the "--" the command line puts in front reads "--range preset 0".
        raise UserError(f"range preset {preset!r} does not exist; choose one of "
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
    """:func:`~adj_quant.quantizers.adjustable.fake_quantize` on a float32 ``x`` with a
    checked ``axis`` (the formula)."""
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


def _symmetric_scale(amplitude, bits, bits_grad: str) -> tuple[tf.Tensor, tf.Tensor]:
    """``(s, n)`` of a symmetric grid: ``n = 2^(b - 1) - 1``, ``s = n / (A + 1e-7)``; ``n``
    carries no gradient with ``bits_grad="scale_only"`` (used as the clip bound). Also what
    :func:`adj_quant.packed.quantizer_grid` reads, so the file's scale is the quantizer's."""
    amplitude = tf.clip_by_value(amplitude, 0.0, _F32_MAX)
    half = tf.pow(tf.constant(2.0, tf.float32), bits - 1.0) - 1.0
    scale = tf.maximum(half / (amplitude + EPSILON), _F32_TINY)
    bound = half if bits_grad == "original" else tf.stop_gradient(half)
    return scale, bound


def _symmetric_quantize_math(x, amplitude, bits, axis: int, bits_grad: str):
    """``clip(round(x s), -n, n) / s`` per channel along ``axis`` (the symmetric grid of the
    module docstring) on a float32 ``x``, with the estimator of :func:`_make_core`: the
    core's clip ``[z, z + levels]`` with ``z = -n`` and ``levels = 2 n``."""
    rank = len(x.shape)

    def per_channel(v):
        v = tf.cast(v, tf.float32)
        return tf.reshape(v, _channel_shape(rank, axis)) if v.shape.rank == 1 else v

    scale, bound = _symmetric_scale(per_channel(amplitude), per_channel(bits), bits_grad)
    return _CORE[bits_grad](x, scale, -bound, 2.0 * bound)


def _check_range(minimum, maximum, axis, who: str = "quantize") -> None:
    """Refuse ``minimum > maximum``, a NaN or infinite bound, or a range whose width
    ``maximum - minimum`` overflows float32 (values known when tracing or eager; the check is
    Python on those values and adds no op to a traced function)."""
    lo, hi = tf.get_static_value(minimum), tf.get_static_value(maximum)
    if lo is None or hi is None:
        return
    lo, hi = np.broadcast_arrays(np.atleast_1d(np.asarray(lo, np.float32)),
                                 np.atleast_1d(np.asarray(hi, np.float32)))
    with np.errstate(over="ignore", invalid="ignore"):
        width = hi - lo
    bad = np.flatnonzero(~(lo <= hi) | ~np.isfinite(lo) | ~np.isfinite(hi) | ~np.isfinite(width))
    if not bad.size:
        return
    c = int(bad[0])
    where = f" for channel {c} of axis {axis}" if lo.size > 1 else ""
    more = f" (and {bad.size - 1} more channels)" if bad.size > 1 else ""
    span = f"[{lo[c]!s}, {hi[c]!s}]"
    if np.isnan(lo[c]) or np.isnan(hi[c]):
        raise UserError(f"{who}: the range {span}{where} is NaN{more}; pass numbers")
    if not (np.isfinite(lo[c]) and np.isfinite(hi[c])):
        raise UserError(f"{who}: the range {span}{where} is not finite{more}; pass finite "
                        "numbers (float32: at most 3.4e38 in magnitude)")
    if not lo[c] <= hi[c]:
        raise UserError(f"{who}: minimum {lo[c]!s} > maximum {hi[c]!s}{where}{more}; pass "
                        "minimum <= maximum (swapped arguments?)")
    raise UserError(f"{who}: the range {span}{where} is wider than float32 holds (maximum - "
                    f"minimum overflows){more}; pass a range narrower than 3.4e38")


def _calibrated_range(minimum, maximum, channels: int, axis, who: str
                      ) -> tuple[np.ndarray, np.ndarray]:
    """A quantizer's ``set_range`` arguments as two float32 ``[channels]`` arrays (any
    shape holding ``channels`` values). Not numbers, another number of values,
    ``minimum > maximum``, a NaN or infinite bound and a range wider than float32 holds are
    the one-line UserError that the functional
    :func:`~adj_quant.quantizers.adjustable.quantize` gives for them. Checked in NumPy on
    the concrete values: nothing is added to a traced computation."""
    arrays = []
    for name, v in (("minimum", minimum), ("maximum", maximum)):
        if isinstance(v, (tf.Tensor, tf.Variable)):
            known = v.numpy() if tf.executing_eagerly() else tf.get_static_value(v)
            if known is None:
                raise UserError(f"{who}: {name} is a symbolic tensor; call set_range eagerly "
                                "with concrete values")
            v = known
        try:
            with np.errstate(over="ignore"):
                a = np.asarray(v, np.float32)
        except (TypeError, ValueError):
            raise UserError(f"{who}: {name} is not a number or a list of numbers (got "
                            f"{type(v).__name__})") from None
        if a.size != channels:
            raise UserError(f"{who}: {name} has shape {list(a.shape)}, expected [{channels}] "
                            "(one value per channel)")
        arrays.append(a.reshape([channels]))
    _check_range(arrays[0], arrays[1], axis, who)
    return arrays[0], arrays[1]


def check_channels(x: tf.Tensor, axis: int, channels: int, who: str) -> None:
    """Refuse an ``x`` whose size along ``axis`` (known statically) is not ``channels`` (a
    one-channel quantizer takes any ``x``). Python on the static shape: adds no op."""
    if channels == 1 or x.shape.rank is None:
        return
    size = x.shape[axis]
    if size is not None and size != channels:
        raise UserError(f"{who}: x has {size} channels along axis {axis} (shape "
                        f"{x.shape.as_list()}), the quantizer has {channels}; quantize a tensor "
                        f"with {channels} channels or build the quantizer with channels={size}")


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


def _symmetric_amplitude_math(minimum, maximum, range_scale, alpha) -> tf.Tensor:
    """``A = max(|m|, |M|) clip(range_scale, alpha)``: a symmetric grid's amplitude."""
    return tf.maximum(tf.abs(minimum), tf.abs(maximum)) * clip_ste(range_scale, *alpha)


def _quantizer_math(x, init_min, init_max, range_scale, range_shift, bits_scale, *, axis: int,
                    init_bits: int, alpha, beta, bits_grad: str, live_range: bool,
                    per_tensor: bool, symmetric: bool = False) -> tf.Tensor:
    """One :class:`~adj_quant.quantizers.adjustable.AdjustableQuantizer` call on a float32
    ``x``, from its variables' values.

    ``bits_scale`` is None for fixed bits. The keyword arguments are the quantizer's
    settings; compiled (:mod:`adj_quant.quantizers.kernels`) they are part of the function's
    signature. ``symmetric`` selects the symmetric grid (module docstring; ``range_shift``
    and ``beta`` unused).
    """
    if live_range:
        minimum, maximum = _live_range_math(x, axis, per_tensor)
    else:
        minimum, maximum = init_min, init_max
    if symmetric:
        amplitude = _symmetric_amplitude_math(minimum, maximum, range_scale, alpha)
        if bits_scale is None:
            bits = tf.fill(tf.shape(amplitude), float(init_bits))
        else:
            bits = _bits_math(bits_scale, init_bits)
        if per_tensor:
            amplitude, bits = amplitude[0], bits[0]
        return _symmetric_quantize_math(x, amplitude, bits, axis, bits_grad)
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
