"""The adjustable per-channel quantizer (specification section 1).

For channel ``c`` with calibrated minimum ``m_c`` and width ``w_c = M_c - m_c``::

    W_c = w_c * clip(range_scale_c, r_alpha)             # adjusted width
    L_c = m_c + w_c * clip(range_shift_c, r_beta)        # adjusted minimum
    b_c = clip(round(bits_scale_c * b0), 2, 8)           # trainable bits (else b0)
    s_c = (2^b_c - 1) / (W_c + 1e-7)
    z_c = round(L_c * s_c)
    out = (clip(round(x * s_c) - z_c, 0, 2^b_c - 1) + z_c) / s_c

Gradients: ``round`` is straight-through; ``clip`` passes the gradient to its input only
inside ``[lo, hi]`` and never to the bounds.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from adj_quant.errors import UserError

MIN_BITS, MAX_BITS = 2, 8
EPSILON = 1e-7

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
        raise UserError(f"unknown --range preset {preset!r}; choose one of "
                        f"{', '.join(map(str, RANGE_PRESETS))}")
    return RANGE_PRESETS[preset]


def check_bits(bits: int, flag: str = "--bits") -> int:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise UserError(f"{flag} {bits} is outside [{MIN_BITS}, {MAX_BITS}]; pass a bit-width "
                        f"from {MIN_BITS} to {MAX_BITS}")
    return int(bits)


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


def _backward_math(g, x, out, inside, scale, zero):
    g_in = tf.where(inside, g, tf.zeros_like(g))
    d_scale = _sum_to(g_in * x - g * out, scale) / scale
    d_zero = _sum_to(g - g_in, zero) / scale
    return g_in, d_scale, d_zero


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


@tf.custom_gradient
def _fake_quant_core(x, scale, zero, levels):
    """``(clip(round(x s) - z, 0, n) + z) / s``, computed as ``clip(round(x s), z, z + n) / s``.

    The two are equal: ``round(x s)``, ``z`` and ``n`` are integer-valued floats. The
    gradient is the spec's estimator written out by hand: with ``m`` = "inside", i.e.
    ``z <= round(x s) <= z + n``, ``d out/dx = m``, ``d out/ds = (m x - out) / s``,
    ``d out/dz = (1 - m) / s`` and no gradient to the clip bound ``n`` (``levels``).
    ``zero`` has ``scale``'s shape or ``scale`` is a scalar, so the per-channel sums can
    be divided by ``scale``.
    """
    fused = _fused()
    out, inside = (_forward_xla if fused else _forward_math)(x, scale, zero, levels)

    def grad(g):
        backward = _backward_xla if fused else _backward_math
        g_in, d_scale, d_zero = backward(g, x, out, inside, scale, zero)
        return g_in, d_scale, d_zero, tf.zeros_like(levels)

    return out, grad


def fake_quantize(x: tf.Tensor, low: tf.Tensor, width: tf.Tensor, bits: tf.Tensor,
                  axis: int = -1) -> tf.Tensor:
    """Quantize-dequantize ``x`` with per-channel minimum ``low``, width and bits.

    ``low``, ``width`` and ``bits`` are scalars or vectors along ``axis``; this is the
    forward pass of the spec with its straight-through gradients.
    """
    rank = len(x.shape)
    axis = axis % rank if rank else 0

    def per_channel(v):
        v = tf.cast(v, x.dtype)
        return tf.reshape(v, _channel_shape(rank, axis)) if v.shape.rank == 1 else v

    low, width, bits = per_channel(low), per_channel(width), per_channel(bits)
    levels = tf.pow(tf.constant(2.0, x.dtype), bits) - 1.0
    scale = levels / (width + EPSILON)
    zero = round_ste(low * scale)
    return _fake_quant_core(x, scale, zero, tf.stop_gradient(levels))


def quantize(x, minimum, maximum, bits, axis: int = -1) -> tf.Tensor:
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
    return fake_quantize(x, minimum, maximum - minimum, bits, axis)


# --------------------------------------------------------------------------- the module


class AdjustableQuantizer(tf.Module):
    """Per-channel quantizer with trainable range and (optionally) trainable bits.

    Variables (names under ``scope``): ``init_min`` / ``init_max`` (calibrated, not
    trainable), ``range_scale``, ``range_shift`` and, with ``bits_trainable``,
    ``bits_scale``. ``channels=1`` makes it a per-tensor quantizer (used for biases).
    """

    def __init__(self, scope: str, channels: int, *, axis: int = -1, init_bits: int = 8,
                 bits_trainable: bool = False, range_preset_id: int = 5):
        super().__init__(name=None)
        self.scope, self.channels, self.axis = scope, channels, axis
        self.init_bits = check_bits(init_bits)
        (self.alpha_lo, self.alpha_hi), (self.beta_lo, self.beta_hi) = range_preset(range_preset_id)
        self.bits_trainable = bits_trainable
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

    def adjusted_range(self) -> tuple[tf.Tensor, tf.Tensor]:
        """``(L, W)``: the adjusted per-channel minimum and width."""
        width = self.init_max - self.init_min
        scale = clip_ste(self.range_scale, self.alpha_lo, self.alpha_hi)
        shift = clip_ste(self.range_shift, self.beta_lo, self.beta_hi)
        return self.init_min + width * shift, width * scale

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        low, width = self.adjusted_range()
        if self.channels == 1:
            low, width = low[0], width[0]
            return fake_quantize(x, low, width, self.bits()[0], self.axis)
        return fake_quantize(x, low, width, self.bits(), self.axis)

    def set_range(self, minimum, maximum) -> None:
        """Set the calibrated per-channel range ``[minimum, maximum]``."""
        minimum = np.asarray(minimum, np.float32).reshape([self.channels])
        maximum = np.asarray(maximum, np.float32).reshape([self.channels])
        self.init_min.assign(minimum)
        self.init_max.assign(maximum)
