"""MobileNetV2 (Sandler et al. 2018), declared once with the scopes of slim's ``mobilenet_v2``.

Two registered names: ``mobilenet_v2`` (depth multiplier 1.0) and ``mobilenet_v2_140``
(1.4, the MicroNet challenge's reference network). Variables::

    MobilenetV2/Conv/weights, MobilenetV2/Conv/BatchNorm/{gamma,beta,moving_mean,moving_variance}
    MobilenetV2/expanded_conv/{depthwise,project}/...
    MobilenetV2/expanded_conv_<i>/{expand,depthwise,project}/...   i = 1..16
    MobilenetV2/Conv_1/..., MobilenetV2/Logits/Conv2d_1c_1x1/{weights,biases}

``width_multiplier`` is what slim calls the depth multiplier (channels, rounded to a multiple
of 8 as slim rounds them); ``depth_multiplier`` scales the number of blocks per stage (1.0 is
the published network; smaller values give the tiny test networks). Inputs are RGB images in
``[0, 1]``, mapped to ``[-1, 1]`` as slim's preprocessing does.
"""

from __future__ import annotations

import math

from adj_quant.network import Network, Node

SCOPE = "MobilenetV2"
BN_EPSILON = 1e-3
INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)

# (expansion t, channels c, repeats n, stride s) of the inverted-residual stages after the
# first block (slim's V2_DEF).
_STAGES = ((6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
           (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """``value`` rounded to a multiple of ``divisor`` (at least ``min_value``), never more
    than 10% below it."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return int(new)


def _block_scope(index: int) -> str:
    return "expanded_conv" if index == 0 else f"expanded_conv_{index}"


def _network(name: str, num_classes: int, width: float, params: dict) -> Network:
    depth_multiplier = params["depth_multiplier"]

    def conv(scope, filters, kernel=1, stride=1):
        return Node(scope, "conv", kernel=kernel, filters=filters, stride=stride)

    def relu6(scope):
        return Node(f"{scope}/relu6", "act", inputs=(scope,), fn="relu6")

    stem = make_divisible(32 * width)
    nodes = [conv("Conv", stem, 3, 2), relu6("Conv")]
    # The first block: no expansion (factor 1), 16 channels.
    channels = make_divisible(16 * width)
    nodes += [Node("expanded_conv/depthwise", "dws", kernel=3), relu6("expanded_conv/depthwise"),
              conv("expanded_conv/project", channels)]
    index = 1
    for t, c, n, s in _STAGES:
        out = make_divisible(c * width)
        for j in range(int(math.ceil(n * depth_multiplier))):
            scope, stride, source = _block_scope(index), s if j == 0 else 1, nodes[-1].name
            nodes += [conv(f"{scope}/expand", make_divisible(channels * t)),
                      relu6(f"{scope}/expand"),
                      Node(f"{scope}/depthwise", "dws", kernel=3, stride=stride),
                      relu6(f"{scope}/depthwise"),
                      conv(f"{scope}/project", out)]
            if stride == 1 and channels == out:
                nodes.append(Node(f"{scope}/add", "add", inputs=(f"{scope}/project", source)))
            channels, index = out, index + 1
    head = make_divisible(1280 * width)  # slim scales the head too (no "finegrain" mode)
    nodes += [conv("Conv_1", head), relu6("Conv_1"),
              Node("Logits/AvgPool", "gap", keepdims=False), Node("Logits/Dropout", "dropout"),
              Node("Logits/Conv2d_1c_1x1", "fc", filters=num_classes, batch_norm=False,
                   conv_weights=True)]
    params = dict(params, num_classes=num_classes)
    return Network(name, SCOPE, tuple(nodes), tuple(sorted(params.items())), INPUT_MEAN,
                   INPUT_STD, BN_EPSILON)


def mobilenet_v2(num_classes: int = 1000, width_multiplier: float = 1.0,
                 depth_multiplier: float = 1.0) -> Network:
    """MobileNetV2 at slim depth multiplier ``width_multiplier`` (1.0 published)."""
    return _network("mobilenet_v2", num_classes, width_multiplier,
                    dict(width_multiplier=width_multiplier, depth_multiplier=depth_multiplier))


def mobilenet_v2_140(num_classes: int = 1000, width_multiplier: float = 1.0,
                     depth_multiplier: float = 1.0) -> Network:
    """MobileNetV2 x1.4 (the MicroNet reference); ``width_multiplier`` scales the 1.4."""
    return _network("mobilenet_v2_140", num_classes, 1.4 * width_multiplier,
                    dict(width_multiplier=width_multiplier, depth_multiplier=depth_multiplier))


NETWORKS = {"mobilenet_v2": mobilenet_v2, "mobilenet_v2_140": mobilenet_v2_140}
