"""The library in a few calls: declare, quantize, calibrate, cost, save.

::

    import adj_quant as aq
    qnet = aq.quantize(aq.FloatNetwork(net), aq.QuantConfig(bits_trainable=True))
    aq.calibrate(qnet, images)
    cost = aq.micronet_cost(qnet, img_size=224)     # differentiable: .score .params .ops
    loss = task_loss + beta * cost.score
    aq.save_quant_info(qnet, "quant_info.json")
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from adj_quant import cost as cost_lib
from adj_quant import quant_info as quant_info_lib
from adj_quant.network import FloatNetwork, Network
from adj_quant.qnetwork import QuantConfig, QuantizedNetwork


def quantize(model: FloatNetwork | Network, config: QuantConfig | None = None, *,
             seed: int = 0) -> QuantizedNetwork:
    """The quantized twin of a float model: batch norm folded, weight ranges calibrated.

    ``model`` is a :class:`FloatNetwork` (its weights are used) or a bare
    :class:`Network` declaration (fresh weights). Activation ranges still need
    :func:`calibrate`.
    """
    if isinstance(model, Network):
        model = FloatNetwork(model, seed=seed)
    if not isinstance(model, FloatNetwork):
        raise TypeError(f"quantize() takes a FloatNetwork or a Network, not {type(model).__name__}")
    return QuantizedNetwork.from_float(model, config or QuantConfig(), seed=seed)


def calibrate(qnet: QuantizedNetwork, images, num_images: int | None = None,
              progress: bool = False) -> int:
    """Set every activation quantizer's range to the running per-channel min/max of its
    input over ``images`` (an array, a tensor, or an iterable of batches); returns the
    number of images seen."""
    if isinstance(images, (np.ndarray, tf.Tensor)):
        images = [images]
    return qnet.calibrate_activations(images, num_images, progress=progress)


def micronet_cost(qnet: QuantizedNetwork, img_size: int = 224, style: str = "micronet",
                  gamma: float = 0.7) -> cost_lib.Counts:
    """The model's MicroNet cost at its current bits: ``.score``, ``.params``, ``.ops``.

    :func:`adj_quant.cost.micronet_cost` with its defaults, as float32 tensors to add to a
    loss: differentiable with respect to the bits (``gamma`` splits the gradient of a max
    of weight and activation bits). ``style="adjq"`` counts as the original submission
    did.
    """
    counts = cost_lib.micronet_cost(qnet, img_size, style=style, gamma=gamma)
    as32 = lambda t: tf.cast(t, tf.float32)  # noqa: E731  (to add to a float32 loss)
    return cost_lib.Counts(as32(counts.params), as32(counts.multiplies), as32(counts.adds),
                           as32(counts.ops), as32(counts.score))


def save_quant_info(qnet: QuantizedNetwork, path, summary: dict | None = None) -> dict:
    """Write the per-channel bits of ``qnet`` as ``quant_info.json`` (atomically)."""
    return quant_info_lib.save_quant_info(os.fspath(path), qnet.bit_assignment(), qnet.net,
                                          summary or {})


def load_quant_info(path, net: Network) -> cost_lib.BitAssignment:
    """Read a ``quant_info.json`` written for ``net``, checking it against the network."""
    return quant_info_lib.load_quant_info(path, net)
