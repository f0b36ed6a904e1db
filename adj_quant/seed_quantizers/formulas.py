"""The seeds' checkpoint-quantization formulas on arrays (docs/checkpoint_quantization.md,
sections 1-2): pure numpy functions, float64 internally, cast back to the input dtype.

* :func:`bin_quantize` - ``2^b`` equal bins between min and max, each value replaced by its
  bin centre; the last bin is closed, so the maximum goes to the last bin centre.
* :func:`fixed_point_quantize` - the seed's decimal-shifted fixed point, saturating on both
  sides (the seed saturated only the positive side).
* :func:`uint8_quantize` / :func:`uint8_dequantize` - per-tensor affine uint8 with an exactly
  representable zero.

``uint8`` follows TensorFlow's classic ``quantize_weights`` graph transform
(``tensorflow/tools/graph_transforms/quantize_weights.cc``): only float tensors with at least
``minimum_size`` elements (default :data:`UINT8_MIN_SIZE` = 1024) are stored in 8 bits
(:func:`check_min_size`; the checkpoint side applies the rule).

No TensorFlow here, so that the command line checks its flags without TensorFlow's start-up.
"""

from __future__ import annotations

import numpy as np

from adj_quant.errors import UserError

ALGORITHMS = ("bin", "fixed-point", "uint8")
BIN_BITS = (1, 16)
FIXED_POINT_BITS = (2, 32)

# TF's quantize_weights transform: ``minimum_size`` (default 1024). A float tensor with fewer
# elements is left float; ``uint8`` applies the same rule (``--min_size``).
UINT8_MIN_SIZE = 1024
_MIN_SIZE_FIX = f"pass a whole number of elements >= 0 (default {UINT8_MIN_SIZE})"


def _as_float64(x, what="x"):
    arr = np.asarray(x)
    x64 = arr.astype(np.float64)
    if x64.size and not np.all(np.isfinite(x64)):
        raise UserError(f"{what} contains NaN or Inf; only finite tensors can be quantized")
    return arr, x64


def _check_bits(bits, lo, hi, algorithm):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise UserError(f"bits={bits!r} is not an integer; "
                        f"pass an integer in {lo}..{hi} for {algorithm}")
    if not lo <= int(bits) <= hi:
        raise UserError(f"--bits {bits} is out of range for {algorithm}; use {lo}..{hi}")
    return int(bits)


def _out_dtype(arr):
    floating = np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"
    return arr.dtype if floating else np.float32


def bin_quantize(x, bits):
    """Replace every value by the centre of its bin among ``2^bits`` equal bins in [min, max].

    Bins are ``[lo + k*w, lo + (k+1)*w)`` with ``w = (hi - lo) / 2^bits``; the last bin is closed,
    so ``max(x)`` goes to the last bin centre. A constant tensor comes back exactly.
    """
    bits = _check_bits(bits, *BIN_BITS, "bin")
    arr, x64 = _as_float64(x)
    if x64.size == 0:
        return arr.copy()
    lo, hi = float(x64.min()), float(x64.max())
    if hi == lo:
        return arr.copy()
    n = 2**bits
    w = (hi - lo) / n
    k = np.floor((x64 - lo) / w)
    k = np.where(x64 < hi, k, n - 1)
    k = np.clip(k, 0, n - 1)  # guard float rounding of (x - lo) / w just below hi
    return (lo + (k + 0.5) * w).astype(_out_dtype(arr))


def fixed_point_params(x, bits):
    """Return ``(s, f, sign, qmax)`` of the decimal-shifted fixed-point scheme for ``x``.

    ``s`` is the decimal pre-shift, ``f`` the number of fractional bits (may be negative),
    ``sign`` 1 when ``min(x) < 0``, and ``qmax = 2^(bits - sign) - 1`` the saturation bound.
    Returns ``None`` for an all-zero (or empty) tensor.
    """
    bits = _check_bits(bits, *FIXED_POINT_BITS, "fixed-point")
    _, x64 = _as_float64(x)
    if x64.size == 0 or not np.any(x64):
        return None
    m = abs(float(x64.max()))
    if m == 0.0:
        # max(x) == 0 with negative values: the seed took log2(0) here. Size the integer part
        # from the negative side instead (a documented deviation).
        m = abs(float(x64.min()))
    s = 0
    while 0 < m < 1:
        m *= 10
        s += 1
    int_bits = int(np.floor(m)).bit_length()  # == floor(log2(floor(m))) + 1, exactly
    sign = 1 if float(x64.min()) < 0 else 0
    f = bits - int_bits - sign
    qmax = 2 ** (bits - sign) - 1
    return s, f, sign, qmax


def fixed_point_quantize(x, bits):
    """The seed's decimal-shifted fixed point, saturating both sides.

    ``q = round_half_even(x * 10^s * 2^f)`` clipped to ``[-qmax, qmax]``, ``x̂ = q * 2^-f / 10^s``
    (see :func:`fixed_point_params`). An all-zero tensor stays zero.
    """
    params = fixed_point_params(x, bits)
    arr, x64 = _as_float64(x)
    if params is None:
        return arr.copy()
    s, f, _sign, qmax = params
    scale10 = 10.0**s
    q = np.rint(np.ldexp(x64 * scale10, f))  # np.rint rounds half to even
    q = np.clip(q, -qmax, qmax)
    return (np.ldexp(q, -f) / scale10).astype(_out_dtype(arr))


def _round_half_away(v):
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def uint8_quantize(x):
    """Per-tensor affine uint8: returns ``(q_uint8, lo, hi)``.

    ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)`` (rounded to float32, the stored precision),
    ``s = 255 / (hi - lo)``, ``q = clip(rha(x*s) - rha(lo*s), 0, 255)`` with ``rha`` rounding half
    away from zero. Zero maps to an integer level, so it comes back exactly 0.
    """
    arr, x64 = _as_float64(x)
    if x64.size == 0:
        return np.zeros(arr.shape, np.uint8), 0.0, 0.0
    lo = float(np.float32(min(float(x64.min()), 0.0)))
    hi = float(np.float32(max(float(x64.max()), 0.0)))
    if hi == lo:  # all zero
        return np.zeros(arr.shape, np.uint8), lo, hi
    s = 255.0 / (hi - lo)
    q = np.clip(_round_half_away(x64 * s) - _round_half_away(lo * s), 0, 255)
    return q.astype(np.uint8), lo, hi


def uint8_dequantize(q, lo, hi):
    """Inverse of :func:`uint8_quantize`: ``x̂ = (q + rha(lo*s)) * step`` as float32."""
    q = np.asarray(q)
    lo = float(np.float32(lo))
    hi = float(np.float32(hi))
    if hi == lo:
        return np.zeros(q.shape, np.float32)
    s = 255.0 / (hi - lo)
    step = (hi - lo) / 255.0
    return ((q.astype(np.float64) + _round_half_away(lo * s)) * step).astype(np.float32)


def relative_error(x, xhat):
    """``100 * ||xhat - x|| / ||x||`` in percent (float64); 0 for an all-zero ``x``, never NaN."""
    x64 = np.asarray(x, dtype=np.float64).ravel()
    d = np.asarray(xhat, dtype=np.float64).ravel() - x64
    nx = float(np.linalg.norm(x64))
    if nx == 0.0:
        return 0.0
    return 100.0 * float(np.linalg.norm(d)) / nx


def quantize_array(x, algorithm, bits=None):
    """Quantize-dequantize ``x`` with ``algorithm`` (``bin`` / ``fixed-point`` / ``uint8``)."""
    if algorithm == "bin":
        return bin_quantize(x, bits)
    if algorithm == "fixed-point":
        return fixed_point_quantize(x, bits)
    if algorithm == "uint8":
        q, lo, hi = uint8_quantize(x)
        return uint8_dequantize(q, lo, hi).astype(_out_dtype(np.asarray(x)))
    raise UserError(f"unknown algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")


def check_bits(algorithm, bits):
    """Validate ``bits`` for ``algorithm``; returns the bits to use (8 for uint8)."""
    if algorithm == "bin":
        if bits is None:
            raise UserError("--bits is required for --algorithm bin; pass e.g. --bits 8 (1..16)")
        return _check_bits(bits, *BIN_BITS, "bin")
    if algorithm == "fixed-point":
        if bits is None:
            raise UserError("--bits is required for --algorithm fixed-point; "
                            "pass e.g. --bits 8 (2..32)")
        return _check_bits(bits, *FIXED_POINT_BITS, "fixed-point")
    if algorithm == "uint8":
        if bits is not None and bits != 8:
            raise UserError(f"--bits {bits} is not supported by --algorithm uint8; "
                            "omit --bits or pass 8")
        return 8
    raise UserError(f"unknown algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")


def check_min_size(algorithm, min_size=None):
    """Validate ``min_size``, the fewest elements a variable needs to be stored in 8 bits.

    ``None`` means "not given": :data:`UINT8_MIN_SIZE` (1024) for ``uint8``, ``None`` for the other
    algorithms. A given value must be an integer >= 0, and only ``uint8`` takes one: ``bin`` and
    ``fixed-point`` keep every value float and quantize every trainable float variable, so a size
    threshold there is refused rather than silently ignored.
    """
    if min_size is None:
        return UINT8_MIN_SIZE if algorithm == "uint8" else None
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)):
        raise UserError(f"--min_size {min_size!r} is not an integer; {_MIN_SIZE_FIX}")
    if min_size < 0:
        raise UserError(f"--min_size {min_size} is negative; {_MIN_SIZE_FIX}")
    if algorithm != "uint8":
        raise UserError(
            f"--min_size applies only to --algorithm uint8 ({algorithm} quantizes every trainable "
            "float variable whatever its size); drop --min_size"
        )
    return int(min_size)
