"""adjq's quantizers: the contract they fulfil and the registry of them by name.

* :mod:`.base`: the :class:`Quantizer` protocol, :func:`register`, :func:`get`, :func:`names`;
* :mod:`.formula`: the adjustable quantizer's formula, its gradients and the input checks;
* :mod:`.kernels`: the compiled XLA kernels and the gradient-tape plumbing;
* :mod:`.adjustable`: :class:`AdjustableQuantizer` (``"adjq"``), :func:`fake_quantize`,
  :func:`quantize`;
* :mod:`.lsq`: :class:`LsqQuantizer` (``"lsq"``), :func:`lsq_quantize`.

The registry needs neither TensorFlow nor the quantizer modules; the classes and functions
named here load (with TensorFlow) on first use.
"""

import importlib

from adj_quant.quantizers.base import Quantizer, get, names, register

_LAZY = {
    "AdjustableQuantizer": "adj_quant.quantizers.adjustable",
    "fake_quantize": "adj_quant.quantizers.adjustable",
    "quantize": "adj_quant.quantizers.adjustable",
    "LsqQuantizer": "adj_quant.quantizers.lsq",
    "lsq_quantize": "adj_quant.quantizers.lsq",
}
__all__ = ["Quantizer", "get", "names", "register", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adj_quant.quantizers' has no attribute {name!r}")


def __dir__():
    return sorted(set(__all__) | {"adjustable", "base", "formula", "kernels", "lsq"})
