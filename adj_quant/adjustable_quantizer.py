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
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from adj_quant.bits import MAX_BITS, MIN_BITS, is_bit_width  # noqa: F401  (re-exported)
from adj_quant.errors import UserError

EPSILON = 1e-7
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


def _forward_math(x, scale, zero, levels):
    r = tf.round(x * scale)
    c = tf.minimum(tf.maximum(r, zero), zero + levels)
    return c / scale, tf.equal(r, c)


def _backward_math(g, x, out, inside, scale, zero, levels):
    g_in = tf.where(inside, g, tf.zeros_like(g))
    d_scale = _sum_to(g_in * x - g * out, scale) / scale
    d_zero = _sum_to(g - g_in, zero) / scale
    above = tf.round(x * scale) > zero + levels
    d_levels = _sum_to(tf.where(above, g, tf.zeros_like(g)) / scale, levels)
    return g_in, d_scale, d_zero, d_levels


# Inside a tf.function (training, evaluation) the elementwise forward and the backward are
# each compiled by XLA into one fused kernel, while the convolutions stay on the regular
# kernels: one compilation per tensor shape. Eagerly (tests, calibration bookkeeping) the
# same math runs op by op. ``use_fused_kernels(False)`` turns the XLA kernels off (e.g.
# for graphs handed to the TFLite converter).
_forward_xla = tf.function(_forward_math, jit_compile=True)
_backward_xla = tf.function(_backward_math, jit_compile=True)
_FUSED = {"on": True}


def use_fused_kernels(enabled: bool) -> None:
    _FUSED["on"] = bool(enabled)


def _fused() -> bool:
    return _FUSED["on"] and tf.inside_function()


def _make_core(bound_gradient: bool):
    """The quantize-dequantize kernel with the estimator written out by hand.

    ``(clip(round(x s) - z, 0, n) + z) / s`` is computed as ``clip(round(x s), z, z + n) / s``;
    the two are equal because ``round(x s)``, ``z`` and ``n`` are integer-valued floats. With
    ``m`` = "inside", i.e. ``z <= round(x s) <= z + n`` (the ties go to ``t``, as TF's
    Maximum/Minimum gradients do), and ``u`` = "above", i.e. ``round(x s) > z + n``::

        d out/dx = m,   d out/ds = (m x - out) / s,   d out/dz = (1 - m) / s,
        d out/dn = u / s            (only with ``bound_gradient``; else 0)

    ``zero`` has ``scale``'s shape or ``scale`` is a scalar, so the per-channel sums can be
    divided by ``scale``; ``levels`` is a scalar or has ``scale``'s shape.
    """

    @tf.custom_gradient
    def core(x, scale, zero, levels):
        fused = _fused()
        out, inside = (_forward_xla if fused else _forward_math)(x, scale, zero, levels)

        def grad(g):
            backward = _backward_xla if fused else _backward_math
            g_in, d_scale, d_zero, d_levels = backward(g, x, out, inside, scale, zero, levels)
            if not bound_gradient:
                d_levels = tf.zeros_like(levels)
            return g_in, d_scale, d_zero, d_levels

        return out, grad

    return core


_CORE = {"original": _make_core(True), "scale_only": _make_core(False)}


def fake_quantize(x: tf.Tensor, low: tf.Tensor, width: tf.Tensor, bits: tf.Tensor,
                  axis: int = -1, bits_grad: str = "original") -> tf.Tensor:
    """Quantize-dequantize ``x`` with per-channel minimum ``low``, width and bits.

    ``low``, ``width`` and ``bits`` are scalars or vectors along ``axis``; this is the
    forward pass of the method with its straight-through gradients. ``bits_grad`` picks the
    estimator of the upper clip bound (:data:`BITS_GRAD_MODES`).
    """
    core = _CORE[check_bits_grad(bits_grad)]
    rank = len(x.shape)
    axis = axis % rank if rank else 0

    def per_channel(v):
        v = tf.cast(v, x.dtype)
        return tf.reshape(v, _channel_shape(rank, axis)) if v.shape.rank == 1 else v

    low, width, bits = per_channel(low), per_channel(width), per_channel(bits)
    levels = tf.pow(tf.constant(2.0, x.dtype), bits) - 1.0
    scale = levels / (width + EPSILON)
    zero = round_ste(low * scale)
    return core(x, scale, zero, levels)


def quantize(x, minimum, maximum, bits, axis: int = -1, bits_grad: str = "original") -> tf.Tensor:
    """Functional quantizer: per-channel ``minimum``, ``maximum`` and ``bits`` (scalars broadcast).

    Returns the dequantized tensor. Equals
    ``tf.quantization.fake_quant_with_min_max_vars_per_channel`` up to rounding ties.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    minimum = tf.convert_to_tensor(minimum, tf.float32)
    maximum = tf.convert_to_tensor(maximum, tf.float32)
    bits = tf.convert_to_tensor(bits, tf.float32)
    if x.shape.rank == 0:
        raise UserError("quantize: x must have at least one dimension")
    channels = x.shape[axis]
    for name, v in (("minimum", minimum), ("maximum", maximum), ("bits", bits)):
        if v.shape.rank > 1 or (v.shape.rank == 1 and v.shape[0] not in (1, channels)):
            raise UserError(f"quantize: {name} has shape {v.shape.as_list()}, expected a scalar "
                            f"or [{channels}] (the size of axis {axis} of x)")
    bits_np = bits.numpy() if tf.executing_eagerly() else None
    if bits_np is not None and (np.any(bits_np < MIN_BITS) or np.any(bits_np > MAX_BITS)
                                or np.any(bits_np != np.round(bits_np))):
        raise UserError(f"quantize: bits {np.unique(bits_np).tolist()} must be integers in "
                        f"[{MIN_BITS}, {MAX_BITS}]")
    return fake_quantize(x, minimum, maximum - minimum, bits, axis, bits_grad)


# --------------------------------------------------------------------------- the module


class AdjustableQuantizer(tf.Module):
    """Per-channel quantizer with trainable range and (optionally) trainable bits.

    Variables (names under ``scope``): ``init_min`` / ``init_max`` (calibrated, not
    trainable), ``range_scale``, ``range_shift`` and, with ``bits_trainable``,
    ``bits_scale``. ``channels=1`` makes it a per-tensor quantizer (used for biases).

    ``live_range=True`` takes the base range ``[m, M]`` from the quantized tensor itself at
    every call (its per-channel min/max, with gradient through them) instead of the
    calibrated ``init_min`` / ``init_max``; the original used this for biases.
    ``bits_grad`` is the estimator of the upper clip bound (:data:`BITS_GRAD_MODES`).
    """

    def __init__(self, scope: str, channels: int, *, axis: int = -1, init_bits: int = 8,
                 bits_trainable: bool = False, range_preset_id: int = 5,
                 bits_grad: str = "original", live_range: bool = False):
        super().__init__(name=None)
        self.scope, self.channels, self.axis = scope, channels, axis
        self.init_bits = check_bits(init_bits)
        (self.alpha_lo, self.alpha_hi), (self.beta_lo, self.beta_hi) = range_preset(range_preset_id)
        self.bits_trainable = bits_trainable
        self.bits_grad = check_bits_grad(bits_grad)
        self.live_range = bool(live_range)
        self.init_min = tf.Variable(tf.fill([channels], -1.0), trainable=False,
                                    name=f"{scope}/init_min")
        self.init_max = tf.Variable(tf.fill([channels], 1.0), trainable=False,
                                    name=f"{scope}/init_max")
        self.range_scale = tf.Variable(tf.ones([channels]), name=f"{scope}/range_scale")
        self.range_shift = tf.Variable(tf.zeros([channels]), name=f"{scope}/range_shift")
        self.bits_scale = (tf.Variable(tf.ones([channels]), name=f"{scope}/bits_scale")
                           if bits_trainable else None)

    def bits(self) -> tf.Tensor:
        """Current per-channel bits ``[channels]`` (float, integer-valued, differentiable)."""
        if self.bits_scale is None:
            return tf.fill([self.channels], float(self.init_bits))
        return clip_ste(round_ste(self.bits_scale * self.init_bits), float(MIN_BITS), float(MAX_BITS))

    def base_range(self, x: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """``(m, M)`` per channel: calibrated, or ``x``'s own min/max with ``live_range``."""
        if not self.live_range or x is None:
            return self.init_min, self.init_max
        if self.channels == 1:
            return tf.reshape(tf.reduce_min(x), [1]), tf.reshape(tf.reduce_max(x), [1])
        rank = len(x.shape)
        axes = [i for i in range(rank) if i != self.axis % rank]
        return tf.reduce_min(x, axes), tf.reduce_max(x, axes)

    def adjusted_range(self, x: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """``(L, W)``: the adjusted per-channel minimum and width (of ``x``'s live range
        with ``live_range``; pass the tensor being quantized)."""
        minimum, maximum = self.base_range(x)
        width = maximum - minimum
        scale = clip_ste(self.range_scale, self.alpha_lo, self.alpha_hi)
        shift = clip_ste(self.range_shift, self.beta_lo, self.beta_hi)
        return minimum + width * shift, width * scale

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        low, width = self.adjusted_range(x)
        if self.channels == 1:
            return fake_quantize(x, low[0], width[0], self.bits()[0], self.axis, self.bits_grad)
        return fake_quantize(x, low, width, self.bits(), self.axis, self.bits_grad)

    def set_range(self, minimum, maximum) -> None:
        """Set the calibrated per-channel range ``[minimum, maximum]``."""
        minimum = np.asarray(minimum, np.float32).reshape([self.channels])
        maximum = np.asarray(maximum, np.float32).reshape([self.channels])
        self.init_min.assign(minimum)
        self.init_max.assign(maximum)
