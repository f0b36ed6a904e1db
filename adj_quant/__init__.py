"""adjq: Adjustable Quantization for TensorFlow.

The public surface::

    import adj_quant as aq
    net = aq.nets.build("efficientnet_b0", num_classes=10)   # or aq.Network(...) of your own
    qnet = aq.quantize(aq.FloatNetwork(net), aq.QuantConfig(bits_trainable=True))
    aq.calibrate(qnet, images)
    cost = aq.micronet_cost(qnet, img_size=224)               # .score .params .ops
    loss = task_loss + beta * cost.score                      # or aq.adjustable_loss(...)
    aq.save_quant_info(qnet, "quant_info.json")

Importing the package has no side effects: names load (and TensorFlow with them) on
first use.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Network": "adj_quant.network",
    "Node": "adj_quant.network",
    "FloatNetwork": "adj_quant.network",
    "QuantConfig": "adj_quant.qnetwork",
    "QuantizedNetwork": "adj_quant.qnetwork",
    "AdjustableQuantizer": "adj_quant.quantizers.adjustable",
    "fake_quantize": "adj_quant.quantizers.adjustable",
    "LsqQuantizer": "adj_quant.quantizers.lsq",
    "lsq_quantize": "adj_quant.quantizers.lsq",
    "quantize": "adj_quant.api",
    "calibrate": "adj_quant.api",
    "micronet_cost": "adj_quant.api",
    "save_quant_info": "adj_quant.api",
    "load_quant_info": "adj_quant.api",
    "load_packed": "adj_quant.packed",
    "adjustable_loss": "adj_quant.training_rules",
    "UserError": "adj_quant.errors",
}
__all__ = sorted(_EXPORTS) + ["nets"]


def __getattr__(name):
    if name == "nets":
        return importlib.import_module("adj_quant.nets")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'adj_quant' has no attribute {name!r}")


def __dir__():
    return __all__
