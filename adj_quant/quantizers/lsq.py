"""LSQ+: a learned step (and offset) per channel at fixed bits (docs/baselines.md).

The baseline quantizer of Bhalgat, Lee, Nagel, Blankevoort and Kwak, "LSQ+: Improving
low-bit quantization through learnable offsets and better initialization" (CVPR workshops
2020), itself LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020) with a
learnable offset. It is the quantizer of Qualcomm's EfficientNet-B0 entry to the MicroNet
challenge; here it runs at fixed bits, selected with ``--quantizer lsq``.

For channel ``c`` with step ``s_c > 0``, offset ``beta_c`` (activations only) and ``b`` bits::

    unsigned (activations):  Q_N = 0,           Q_P = 2^b - 1
    signed (weights, biases): Q_N = -2^(b-1),   Q_P = 2^(b-1) - 1,   beta = 0
    v   = (x - beta_c) / s_c
    out = clip(round(v), Q_N, Q_P) * s_c + beta_c

Gradients (``round`` straight-through), per element::

    d out/dx    = 1 if Q_N <= v <= Q_P else 0
    d out/ds    = round(v) - v inside,  Q_N below,  Q_P above      (times g, see below)
    d out/dbeta = 0 inside,  1 outside

and the per-channel gradients are these summed over the channel's elements. The step's
gradient is multiplied by LSQ's gradient scale ``g = 1 / sqrt(N * Q_P)``, ``N`` the number
of elements that share the step (the tensor's size over the channel count: batch x H x W
of an activation channel, k x k x cin of a conv weight's output channel). Here ``g`` is
applied inside the custom gradient (the forward is untouched), not by the usual
``s * g + stop_gradient(s - s * g)`` rewrite of the step; the two give the same gradient.
The offset's gradient is not scaled.

The step is used as ``max(s, 1e-8)`` in the forward so that a step trained to zero or below
never divides by zero; its gradient passes that clamp unchanged (straight through), so a
step below the bound can still grow back.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from adj_quant.errors import UserError
from adj_quant.quantizers.base import register
from adj_quant.quantizers.formula import (
    _calibrated_range,
    _float_input,
    _sum_to,
    check_axis,
    check_bits,
    check_channels,
)

#: Lower bound of the step in the forward pass.
STEP_EPSILON = 1e-8
#: Smallest step a range or a weight tensor initialises to (a constant or all-zero channel).
MIN_INIT_STEP = 1e-6


def code_range(bits: int, signed: bool) -> tuple[float, float]:
    """``(Q_N, Q_P)``: the integer codes of ``bits`` bits, signed or unsigned."""
    bits = check_bits(bits)
    if signed:
        return -2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1.0
    return 0.0, 2.0 ** bits - 1.0


def _make_core(q_n: float, q_p: float):
    """The LSQ+ quantize-dequantize of ``x`` with broadcast ``step`` and ``offset``, its
    gradients written out by hand (the module docstring's rules, ``g`` included)."""

    def forward(x, step, offset):
        s = tf.maximum(step, STEP_EPSILON)
        v = (x - offset) / s
        return v, s

    @tf.custom_gradient
    def core(x, step, offset):
        v, s = forward(x, step, offset)
        out = tf.clip_by_value(tf.round(v), q_n, q_p) * s + offset

        def grad(dy):
            v, _ = forward(x, step, offset)  # recomputed, so nothing else is held
            below, above = v < q_n, v > q_p
            inside = ~(below | above)
            zeros = tf.zeros_like(dy)
            d_x = tf.where(inside, dy, zeros)
            per_element = tf.where(below, q_n, tf.where(above, q_p, tf.round(v) - v))
            # N: elements per step; the step's broadcast shape divides the tensor's size.
            n = tf.cast(tf.size(x), tf.float32) / tf.cast(tf.size(step), tf.float32)
            scale = tf.math.rsqrt(n * q_p)
            d_step = _sum_to(dy * per_element, step) * scale
            d_offset = _sum_to(tf.where(inside, zeros, dy), offset)
            return d_x, d_step, d_offset

        return out, grad

    return core


def _per_channel(v, rank: int, axis: int, channels: int, name: str) -> tf.Tensor:
    """A scalar or ``[channels]`` vector as a float32 tensor broadcasting along ``axis``."""
    v = tf.cast(tf.convert_to_tensor(v), tf.float32)
    if v.shape.rank == 0:
        return v
    if v.shape.rank != 1 or (channels is not None and v.shape[0] not in (1, channels)):
        raise UserError(f"lsq_quantize: {name} has shape {v.shape.as_list()}, expected a "
                        f"scalar or [{channels}] (the size of axis {axis} of x)")
    shape = [1] * rank
    shape[axis] = -1
    return tf.reshape(v, shape)


def lsq_quantize(x, step, offset=None, *, bits: int, signed: bool, axis: int = -1) -> tf.Tensor:
    """LSQ+ fake quantization of ``x`` at fixed ``bits`` (formula and gradients: module doc).

    ``step`` (and ``offset``, None for none) are scalars or vectors along ``axis``.
    ``signed`` picks the codes: ``[-2^(b-1), 2^(b-1) - 1]`` (weights) or ``[0, 2^b - 1]``
    (activations). ``x`` keeps its floating dtype; the computation runs in float32.
    Differentiable in ``x``, ``step`` and ``offset`` by LSQ's straight-through estimator
    with the step gradient scaled by ``1 / sqrt(N * Q_P)``.
    """
    q_n, q_p = code_range(bits, signed)
    x = _float_input(x, "lsq_quantize")
    dtype = x.dtype
    rank = len(x.shape)
    if rank:
        axis = check_axis(axis, rank, "lsq_quantize")
    channels = x.shape[axis] if rank else 1
    x32 = tf.cast(x, tf.float32)
    step = _per_channel(step, rank, axis, channels, "step")
    offset = tf.zeros_like(step) if offset is None else _per_channel(
        offset, rank, axis, channels, "offset")
    out = _make_core(q_n, q_p)(x32, step, offset)
    return out if dtype == tf.float32 else tf.cast(out, dtype)


def weight_init_step(values, bits: int, axis: int) -> np.ndarray:
    """LSQ+'s weight initialisation, per channel along ``axis``:
    ``s_c = max(|mean_c - 3 std_c|, |mean_c + 3 std_c|) / 2^(b-1)``."""
    values = np.asarray(values, np.float64)
    axes = tuple(i for i in range(values.ndim) if i != axis % max(values.ndim, 1))
    mean, std = values.mean(axis=axes), values.std(axis=axes)
    bound = np.maximum(np.abs(mean - 3 * std), np.abs(mean + 3 * std))
    return np.maximum(bound / 2.0 ** (check_bits(bits) - 1), MIN_INIT_STEP).astype(np.float32)


@register("lsq")
class LsqQuantizer(tf.Module):
    """Per-channel LSQ+ quantizer at fixed bits (``--quantizer lsq``), a drop-in for
    :class:`adj_quant.quantizers.adjustable.AdjustableQuantizer` in the quantized network
    (formula and gradients: the module docstring)::

        out = clip(round((x - beta) / s), Q_N, Q_P) * s + beta

    Variables (names under ``scope``): ``init_min`` / ``init_max`` (the calibrated range,
    not trainable, kept for ``initial_thresholds.json``), ``step`` and, unsigned only,
    ``offset`` (trainable, one per channel). ``signed=True`` quantizes weights and biases
    (symmetric codes, no offset), ``signed=False`` activations. ``channels=1`` is one step
    for the whole tensor (biases).

    :meth:`set_range` initialises the step and offset from a calibrated range (see there);
    :meth:`init_from_weights` applies LSQ+'s weight initialisation from the tensor itself.
    """

    bits_trainable = False
    live_range = False

    def __init__(self, scope: str, channels: int, *, axis: int = -1, init_bits: int = 8,
                 signed: bool = False, bits_trainable: bool = False, live_range: bool = False):
        super().__init__(name=None)
        if bits_trainable:
            raise UserError(f"quantizer {scope}: LSQ+ runs at fixed bits; build it without "
                            "bits_trainable (use the adjq quantizer to learn bits)")
        if live_range:
            raise UserError(f"quantizer {scope}: LSQ+ learns its step, a live range does not "
                            "apply; build it without live_range")
        self.scope, self.channels, self.axis = scope, channels, axis
        self.init_bits = check_bits(init_bits)
        self.signed = bool(signed)
        self.q_n, self.q_p = code_range(self.init_bits, self.signed)
        self.init_min = tf.Variable(np.full([channels], -1.0, np.float32), trainable=False,
                                    name=f"{scope}/init_min")
        self.init_max = tf.Variable(np.full([channels], 1.0, np.float32), trainable=False,
                                    name=f"{scope}/init_max")
        lo, hi = self._init_from_range(np.full([channels], -1.0), np.full([channels], 1.0))
        self.step = tf.Variable(hi, name=f"{scope}/step")
        self.offset = None if self.signed else tf.Variable(lo, name=f"{scope}/offset")

    @classmethod
    def for_tensor(cls, scope: str, channels: int, *, axis: int, init_bits: int,
                   bits_trainable: bool, signed: bool, live_range: bool, compiled: bool,
                   range_preset_id: int, bits_grad: str,
                   symmetric: bool = False) -> LsqQuantizer:
        """The quantizer of one tensor of the quantized network: ``signed`` for weights and
        biases (symmetric codes, no offset). Trainable bits and ``symmetric`` (the adjustable
        quantizer's narrow grid) are refused; ``live_range``, ``compiled``,
        ``range_preset_id`` and ``bits_grad`` do not apply (the step and the offset are
        learned)."""
        if symmetric:
            raise UserError(f"quantizer {scope}: LSQ+ has its own signed grid [-2^(b-1), "
                            "2^(b-1) - 1]; build it without symmetric, or use quantizer 'adjq'")
        return cls(scope, channels, axis=axis, init_bits=init_bits, signed=signed,
                   bits_trainable=bits_trainable)

    def _init_from_range(self, minimum: np.ndarray, maximum: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
        """``(offset, step)`` that make ``[minimum, maximum]`` representable per channel."""
        minimum, maximum = np.asarray(minimum, np.float64), np.asarray(maximum, np.float64)
        if self.signed:
            step = np.maximum(np.abs(minimum), np.abs(maximum)) / self.q_p
            offset = np.zeros_like(step)
        else:
            step = (maximum - minimum) / (2.0 ** self.init_bits - 1.0)
            offset = minimum
        step = np.maximum(step, MIN_INIT_STEP)
        return offset.astype(np.float32), step.astype(np.float32)

    def bits(self) -> tf.Tensor:
        """The fixed per-channel bits ``[channels]`` (float, as the cost code reads them)."""
        return tf.fill([self.channels], float(self.init_bits))

    def bits_variables(self) -> list[tf.Variable]:
        """None: the bits never train."""
        return []

    def base_range(self, x: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """``(m, M)``: the calibrated per-channel range."""
        return self.init_min, self.init_max

    def adjusted_range(self, x: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """``(L, W)``: the learned grid's lowest level and width per channel; the levels are
        ``L + k W / (2^b - 1)``, ``k = 0 .. 2^b - 1`` (as for the adjustable quantizer)."""
        step = tf.maximum(tf.convert_to_tensor(self.step), STEP_EPSILON)
        low = step * self.q_n if self.offset is None else tf.convert_to_tensor(self.offset)
        return low, step * (self.q_p - self.q_n)

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        """Quantize ``x`` (any floating dtype: computed in float32, returned in ``x``'s)."""
        x = _float_input(x, f"quantizer {self.scope}")
        rank = len(x.shape)
        axis = check_axis(self.axis, rank, f"quantizer {self.scope}") if rank else 0
        if rank:
            check_channels(x, axis, self.channels, f"quantizer {self.scope}")
        step, offset = self.step, self.offset
        if self.channels == 1:  # one step for the whole tensor
            step = tf.reshape(step, [])
            offset = None if offset is None else tf.reshape(offset, [])
        return lsq_quantize(x, step, offset, bits=self.init_bits, signed=self.signed, axis=axis)

    def set_range(self, minimum, maximum) -> None:
        """Set the calibrated per-channel range and initialise from it: activations
        ``s = (M - m) / (2^b - 1)``, ``beta = m`` (LSQ+'s min/max initialisation); signed
        ``s = max(|m|, |M|) / (2^(b-1) - 1)``, so that the whole range is representable
        (biases; weights then get :meth:`init_from_weights`). The range is checked as
        :func:`adj_quant.quantizers.adjustable.quantize` checks its range."""
        minimum, maximum = _calibrated_range(minimum, maximum, self.channels, self.axis,
                                             f"quantizer {self.scope}")
        self.init_min.assign(minimum)
        self.init_max.assign(maximum)
        offset, step = self._init_from_range(minimum, maximum)
        self.step.assign(step)
        if self.offset is not None:
            self.offset.assign(offset)

    def init_from_weights(self, weights) -> None:
        """LSQ+'s weight initialisation from the weights themselves
        (:func:`weight_init_step`, per channel along ``axis``)."""
        if not self.signed:
            raise UserError(f"quantizer {self.scope}: the weight initialisation is for signed "
                            "(weight) quantizers; initialise activations with set_range")
        values = np.asarray(weights)
        if self.channels == 1:
            values = values.reshape([-1, 1])
            axis = -1
        else:
            axis = self.axis
        self.step.assign(weight_init_step(values, self.init_bits, axis))
