"""The adjustable quantizer (docs/method.md, "The quantizer"): the module class
:class:`AdjustableQuantizer`, registered as ``"adjq"``, and the functional API
(:func:`fake_quantize`, :func:`quantize`).

The formula, its gradients and the checks of the inputs are in
:mod:`adj_quant.quantizers.formula`; the compiled kernels that run it inside a
``tf.function`` in :mod:`adj_quant.quantizers.kernels`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from adj_quant.errors import UserError
from adj_quant.quantizers import kernels
from adj_quant.quantizers.base import register
from adj_quant.quantizers.formula import (
    _adjusted_range_math,
    _bits_math,
    _calibrated_range,
    _check_bits_tensor,
    _check_range,
    _float_input,
    _live_range_math,
    _numeric_input,
    _symmetric_amplitude_math,
    check_axis,
    check_bits,
    check_bits_grad,
    check_channels,
    range_preset,
)
from adj_quant.quantizers.kernels import use_fused_kernels  # noqa: F401  (re-exported)


def fake_quantize(x: tf.Tensor, low: tf.Tensor, width: tf.Tensor, bits: tf.Tensor,
                  axis: int = -1, bits_grad: str = "original") -> tf.Tensor:
    """Quantize-dequantize ``x`` with per-channel minimum ``low``, width and bits.

    ``low``, ``width`` and ``bits`` are scalars or vectors along ``axis``; this is the
    forward pass of the method with its straight-through gradients. ``bits_grad`` picks the
    estimator of the upper clip bound (:data:`~adj_quant.quantizers.formula.BITS_GRAD_MODES`).

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
    kernel = kernels.fake_quantize_kernel()
    out = kernel(x, low, width, bits, axis, bits_grad)
    return out if dtype == tf.float32 else tf.cast(out, dtype)


def quantize(x, minimum, maximum, bits, axis: int = -1, bits_grad: str = "original") -> tf.Tensor:
    """Functional quantizer: per-channel ``minimum``, ``maximum`` and ``bits`` (scalars broadcast).

    Returns the dequantized tensor. Equals
    ``tf.quantization.fake_quant_with_min_max_vars_per_channel`` up to rounding ties.

    ``x`` keeps its floating dtype (bfloat16, float16, float32, float64; computed in float32,
    see :func:`fake_quantize`); Python numbers and lists give float32; other dtypes are a
    :class:`UserError`. Ranges and bits whose values are known (eagerly, or constants when
    tracing) are checked: ``minimum > maximum``, a NaN or infinite bound, a range wider
    than float32 holds (``maximum - minimum`` overflows) or non-integer bits are a
    UserError. Bits only known when a ``tf.function`` runs are checked then by a
    ``tf.debugging.Assert`` (an ``InvalidArgumentError``; XLA-compiled functions skip it); a
    range only known then is quantized as :func:`fake_quantize` takes it (``minimum >
    maximum`` as a zero-width range at ``minimum``, an overflowing width bounded).
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


@register("adjq")
class AdjustableQuantizer(tf.Module):
    """Per-channel quantizer with trainable range and (optionally) trainable bits, the
    method's quantizer (``--quantizer adjq``; formula and gradients:
    :mod:`adj_quant.quantizers.formula`)::

        (L, W) = (m + w clip(range_shift, r_beta), w clip(range_scale, r_alpha)), w = M - m
        b = clip(round(bits_scale * b0), 2, 8)    (b0 at fixed bits)
        s = (2^b - 1) / (W + 1e-7),   z = round(L s)
        out = (clip(round(x s) - z, 0, 2^b - 1) + z) / s

    Variables (names under ``scope``): ``init_min`` / ``init_max`` (calibrated, not
    trainable), ``range_scale``, ``range_shift`` and, with ``bits_trainable``,
    ``bits_scale``. ``channels=1`` makes it a per-tensor quantizer (used for biases).

    ``live_range=True`` takes the base range ``[m, M]`` from the quantized tensor itself at
    every call (its per-channel min/max, with gradient through them) instead of the
    calibrated ``init_min`` / ``init_max``; the original used this for biases.
    ``bits_grad`` is the estimator of the upper clip bound
    (:data:`~adj_quant.quantizers.formula.BITS_GRAD_MODES`).
    ``compiled=False`` keeps the quantizer out of the per-shape XLA kernels (for weights
    and biases: many distinct small shapes); the result is the same either way.

    ``symmetric=True`` (``--symmetric_weights``, weight quantizers) puts every channel on the
    symmetric narrow grid ``clip(round(x s), -n, n) / s``, ``n = 2^(b-1) - 1``,
    ``s = n / (A + 1e-7)``, ``A = max(|m|, |M|) clip(range_scale, r_alpha)`` (zero point 0;
    ``range_shift`` unused): a channel of at most 4 bits then exports as INT4.
    """

    def __init__(self, scope: str, channels: int, *, axis: int = -1, init_bits: int = 8,
                 bits_trainable: bool = False, range_preset_id: int = 5,
                 bits_grad: str = "original", live_range: bool = False, compiled: bool = True,
                 symmetric: bool = False):
        super().__init__(name=None)
        self.compiled = bool(compiled)
        self.scope, self.channels, self.axis = scope, channels, axis
        self.init_bits = check_bits(init_bits)
        (self.alpha_lo, self.alpha_hi), (self.beta_lo, self.beta_hi) = range_preset(range_preset_id)
        self.bits_trainable = bits_trainable
        self.bits_grad = check_bits_grad(bits_grad)
        self.live_range = bool(live_range)
        self.symmetric = bool(symmetric)
        self.init_min = tf.Variable(np.full([channels], -1.0, np.float32), trainable=False,
                                    name=f"{scope}/init_min")
        self.init_max = tf.Variable(np.full([channels], 1.0, np.float32), trainable=False,
                                    name=f"{scope}/init_max")
        ones, zeros = np.ones([channels], np.float32), np.zeros([channels], np.float32)
        self.range_scale = tf.Variable(ones, name=f"{scope}/range_scale")
        self.range_shift = tf.Variable(zeros, name=f"{scope}/range_shift")
        self.bits_scale = (tf.Variable(ones, name=f"{scope}/bits_scale")
                           if bits_trainable else None)

    @classmethod
    def for_tensor(cls, scope: str, channels: int, *, axis: int, init_bits: int,
                   bits_trainable: bool, signed: bool, live_range: bool, compiled: bool,
                   range_preset_id: int, bits_grad: str,
                   symmetric: bool = False) -> AdjustableQuantizer:
        """The quantizer of one tensor of the quantized network (``signed`` does not apply:
        the range is calibrated and adjusted the same way for every tensor; ``symmetric``:
        the symmetric grid, asked for weights with ``--symmetric_weights``)."""
        return cls(scope, channels, axis=axis, init_bits=init_bits,
                   bits_trainable=bits_trainable, range_preset_id=range_preset_id,
                   bits_grad=bits_grad, live_range=live_range, compiled=compiled,
                   symmetric=symmetric)

    @property
    def _settings(self) -> dict:
        """The static arguments of :func:`~adj_quant.quantizers.formula._quantizer_math`
        (part of the compiled signature)."""
        return dict(init_bits=self.init_bits, alpha=(self.alpha_lo, self.alpha_hi),
                    beta=(self.beta_lo, self.beta_hi), bits_grad=self.bits_grad,
                    live_range=self.live_range, per_tensor=self.channels == 1,
                    symmetric=self.symmetric)

    def bits(self) -> tf.Tensor:
        """Current per-channel bits ``[channels]`` (float, integer-valued, differentiable)."""
        if self.bits_scale is None:
            return tf.fill([self.channels], float(self.init_bits))
        return _bits_math(self.bits_scale, self.init_bits)

    def bits_variables(self) -> list[tf.Variable]:
        """``[bits_scale]`` with trainable bits, else none."""
        return [] if self.bits_scale is None else [self.bits_scale]

    def base_range(self, x: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """``(m, M)`` per channel: calibrated, or ``x``'s own min/max with ``live_range``."""
        if not self.live_range or x is None:
            return self.init_min, self.init_max
        return _live_range_math(x, self.axis % max(len(x.shape), 1), self.channels == 1)

    def amplitude(self, x: tf.Tensor | None = None) -> tf.Tensor:
        """``A = max(|m|, |M|) clip(range_scale, r_alpha)`` per channel: the symmetric grid's
        amplitude (``symmetric``; its scale is ``(2^(b-1) - 1) / (A + 1e-7)``)."""
        minimum, maximum = self.base_range(x)
        return _symmetric_amplitude_math(minimum, maximum, self.range_scale,
                                         (self.alpha_lo, self.alpha_hi))

    def adjusted_range(self, x: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """``(L, W)``: the adjusted per-channel minimum and width (of ``x``'s live range
        with ``live_range``; pass the tensor being quantized). A ``symmetric`` quantizer's
        is ``(-A, 2 A)`` (:meth:`amplitude`): its ``2^b - 1`` levels span ``[-A, A]``."""
        if self.symmetric:
            amplitude = self.amplitude(x)
            return -amplitude, 2.0 * amplitude
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
            check_channels(x, axis, self.channels, f"quantizer {self.scope}")
        dtype = x.dtype
        x = tf.cast(x, tf.float32)
        # Values, not variables, so that one trace serves quantizers of any channel count.
        values = [None if v is None else tf.convert_to_tensor(v) for v in (
            self.init_min, self.init_max, self.range_scale, self.range_shift, self.bits_scale)]
        out = kernels.run_quantizer(x, values, compiled=self.compiled, axis=axis,
                                    **self._settings)
        return out if dtype == tf.float32 else tf.cast(out, dtype)

    def set_range(self, minimum, maximum) -> None:
        """Set the calibrated per-channel range ``[minimum, maximum]`` (``channels`` values
        each; checked as :func:`quantize` checks its range)."""
        minimum, maximum = _calibrated_range(minimum, maximum, self.channels, self.axis,
                                             f"quantizer {self.scope}")
        self.init_min.assign(minimum)
        self.init_max.assign(maximum)

    def init_from_weights(self, weights) -> None:
        """Nothing: a weight quantizer's base range is its weights' min/max (``set_range``)."""
