"""What a bit-width is, in one place (no TensorFlow needed).

A quantized tensor has an integer bit-width in [2, 8]; 32 marks a float (unquantized)
tensor where a file or a cost allows one.
"""

from __future__ import annotations

import math
import numbers

MIN_BITS, MAX_BITS = 2, 8
FLOAT_BITS = 32


def is_bit_width(value, *, allow_float: bool = False) -> bool:
    """An integer (not a bool) in [2, 8], or 32 where ``allow_float``.

    An integer-valued float (``4.0``) counts; ``3.5``, NaN and infinities do not.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    if not math.isfinite(value) or value != int(value):
        return False
    return MIN_BITS <= value <= MAX_BITS or (allow_float and value == FLOAT_BITS)
