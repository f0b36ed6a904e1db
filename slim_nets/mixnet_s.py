"""MixNet-S (Tan and Le 2019, "MixConv: Mixed Depthwise Convolutional Kernels").

The network of the MicroNet leaderboard's best entry. An inverted-residual network whose
depthwise layers mix kernel sizes: the channels are split into groups, each group has its
own kernel (3x3, 5x5, ... ), and the groups are concatenated again. Some expansion and
projection 1x1 convolutions are grouped (two groups). Stages with ``swish`` use swish,
the others ReLU; most blocks have squeeze-and-excitation (reduced to
``block input channels * se_ratio``, the block's activation, a sigmoid gate).

Scopes::

    mixnet_s/stem/...                       3x3 conv, stride 2, 16 channels
    mixnet_s/blocks_<i>/expand/...          1x1 conv (groups: the "a" of the block string)
    mixnet_s/blocks_<i>/dws_<g>/...         depthwise conv of channel group g
    mixnet_s/blocks_<i>/se_reduce|se_expand/{weights,biases}
    mixnet_s/blocks_<i>/project/...         1x1 conv (groups: the "p" of the block string)
    mixnet_s/head/..., mixnet_s/logits/{weights,biases}

Channel groups split a count as the MixNet reference does: equal parts, the remainder
to the first. A grouped 1x1 convolution with equal parts is a ``groups`` conv.
``width_multiplier`` scales the channels (rounded to multiples of 8), ``depth_multiplier``
the block repeats. Inputs are RGB images in ``[0, 1]``, normalised with the ImageNet mean
and standard deviation.
"""

from __future__ import annotations

import math

from adj_quant.network import Network, Node

NAME = "mixnet_s"
SCOPE = "mixnet_s"
BN_EPSILON = 1e-3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STEM, HEAD = 16, 1536

#: (repeats, depthwise kernels, expand groups, project groups, stride, expand ratio,
#: channels in, channels out, SE ratio or None, swish) of MixNet-S's block strings
#: ``r1_k3.5.7_a1_p1.1_s22_e6_i40_o80_se0.25_sw`` and so on.
BLOCKS = (
    (1, (3,), 1, 1, 1, 1, 16, 16, None, False),
    (1, (3,), 2, 2, 2, 6, 16, 24, None, False),
    (1, (3,), 2, 2, 1, 3, 24, 24, None, False),
    (1, (3, 5, 7), 1, 1, 2, 6, 24, 40, 0.5, True),
    (3, (3, 5), 2, 2, 1, 6, 40, 40, 0.5, True),
    (1, (3, 5, 7), 1, 2, 2, 6, 40, 80, 0.25, True),
    (2, (3, 5), 1, 2, 1, 6, 80, 80, 0.25, True),
    (1, (3, 5, 7), 2, 2, 1, 6, 80, 120, 0.5, True),
    (2, (3, 5, 7, 9), 2, 2, 1, 3, 120, 120, 0.5, True),
    (1, (3, 5, 7, 9, 11), 1, 1, 2, 6, 120, 200, 0.5, True),
    (2, (3, 5, 7, 9), 1, 2, 1, 6, 200, 200, 0.5, True),
)


def round_filters(filters: float, multiplier: float, divisor: int = 8) -> int:
    """Channels scaled by ``multiplier``, a multiple of ``divisor``, never 10% below."""
    filters *= multiplier
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def split_channels(total: int, groups: int) -> list[int]:
    """``total`` in ``groups`` equal parts, the remainder added to the first."""
    parts = [total // groups] * groups
    parts[0] += total - sum(parts)
    return parts


def _pointwise(scope: str, source: str, filters: int, groups: int) -> Node:
    return Node(scope, "conv", (source,), kernel=1, filters=filters, groups=groups)


def _block(nodes: list, scope: str, source: str, cin: int, cout: int, kernels, expand_groups,
           project_groups, stride, ratio, se_ratio, swish) -> str:
    """Append one MixNet block reading ``source``; returns its output node's name."""
    act = "swish" if swish else "relu"
    x, channels = source, cin
    if ratio != 1:
        channels = cin * ratio
        nodes.append(_pointwise(f"{scope}/expand", x, channels, expand_groups))
        nodes.append(Node(f"{scope}/expand/{act}", "act", fn=act))
        x = nodes[-1].name
    if len(kernels) == 1:
        nodes.append(Node(f"{scope}/dws", "dws", (x,), kernel=kernels[0], stride=stride))
        mixed = nodes[-1].name
    else:
        parts, start = [], 0
        for g, (kernel, size) in enumerate(zip(kernels, split_channels(channels,
                                                                       len(kernels)))):
            nodes.append(Node(f"{scope}/split_{g}", "slice", (x,), start=start, filters=size))
            nodes.append(Node(f"{scope}/dws_{g}", "dws", kernel=kernel, stride=stride))
            parts.append(nodes[-1].name)
            start += size
        nodes.append(Node(f"{scope}/dws", "concat", tuple(parts)))
        mixed = nodes[-1].name
    nodes.append(Node(f"{scope}/dws/{act}", "act", (mixed,), fn=act))
    x = nodes[-1].name
    if se_ratio:
        reduced = max(1, int(cin * se_ratio))
        nodes += [Node(f"{scope}/se_squeeze", "gap", (x,), keepdims=True),
                  Node(f"{scope}/se_reduce", "conv", filters=reduced, batch_norm=False),
                  Node(f"{scope}/se_reduce/{act}", "act", fn=act),
                  Node(f"{scope}/se_expand", "conv", filters=channels, batch_norm=False),
                  Node(f"{scope}/se_expand/sigmoid", "act", fn="sigmoid"),
                  Node(f"{scope}/se_scale", "mul", (x, f"{scope}/se_expand/sigmoid"))]
        x = nodes[-1].name
    nodes.append(_pointwise(f"{scope}/project", x, cout, project_groups))
    if stride == 1 and cin == cout:
        nodes.append(Node(f"{scope}/add", "add", (f"{scope}/project", source)))
    return nodes[-1].name


def network(num_classes: int = 1000, width_multiplier: float = 1.0,
            depth_multiplier: float = 1.0) -> Network:
    """MixNet-S (``width_multiplier`` and ``depth_multiplier`` 1.0: the published one)."""
    stem = round_filters(STEM, width_multiplier)
    nodes = [Node("stem", "conv", kernel=3, stride=2, filters=stem),
             Node("stem/relu", "act", fn="relu")]
    x, channels, index = nodes[-1].name, stem, 0
    for repeats, kernels, a, p, stride, ratio, _, cout, se, swish in BLOCKS:
        cout = round_filters(cout, width_multiplier)  # cin: the previous stage's cout
        for j in range(int(math.ceil(repeats * depth_multiplier))):
            x = _block(nodes, f"blocks_{index}", x, channels, cout, kernels, a, p,
                       stride if j == 0 else 1, ratio, se, swish)
            channels, index = cout, index + 1
    nodes += [Node("head", "conv", (x,), filters=round_filters(HEAD, width_multiplier)),
              Node("head/relu", "act", fn="relu"),
              Node("avg_pool", "gap", keepdims=False), Node("dropout", "dropout"),
              Node("logits", "fc", filters=num_classes, batch_norm=False)]
    params = dict(num_classes=num_classes, width_multiplier=width_multiplier,
                  depth_multiplier=depth_multiplier)
    return Network(NAME, SCOPE, tuple(nodes), tuple(sorted(params.items())), IMAGENET_MEAN,
                   IMAGENET_STD, BN_EPSILON)
