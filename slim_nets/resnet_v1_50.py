"""ResNet-V1-50 (He et al. 2016), declared once with the scopes of slim's ``resnet_v1_50``.

Variables (the names and shapes of slim's published ``resnet_v1_50.ckpt``)::

    resnet_v1_50/conv1/weights,
    resnet_v1_50/conv1/BatchNorm/{gamma,beta,moving_mean,moving_variance}
    resnet_v1_50/block<b>/unit_<u>/bottleneck_v1/{shortcut,conv1,conv2,conv3}/...
    resnet_v1_50/logits/{weights,biases}              (weights [1, 1, 2048, classes])

Two registered variants with the same variables:

``resnet_v1_50``
    slim's network: the stride of a block sits in the 3x3 ``conv2`` of its *last* unit
    (explicitly padded, as slim's ``conv2d_same``); an identity shortcut there is a 1x1,
    stride-2 subsampling; ``pool1`` is a SAME 3x3 max pool. Batch-norm epsilon 1e-5. Inputs
    are RGB in ``[0, 1]``, normalised as slim's VGG preprocessing does (``x*255 - mean``).
``resnet_v1_50_keras``
    ``keras.applications.ResNet50``'s arrangement (the original Caffe ResNet): the stride
    sits in the 1x1 ``conv1`` and the shortcut of a stage's *first* unit, ``pool1`` pads one
    pixel all round and pools VALID, epsilon 1.001e-5. What the Keras weights converter
    (``pretrained``) writes its checkpoints for.

``width_multiplier`` scales every channel count and ``depth_multiplier`` the units per block
(1.0 each is the published network; smaller values give the tiny test networks).
"""

from __future__ import annotations

import math

from adj_quant.network import Network, Node

SCOPE = "resnet_v1_50"
#: slim's VGG preprocessing subtracts these from 0..255 RGB values (and does not scale).
VGG_MEAN = (123.68, 116.78, 103.94)
INPUT_MEAN = tuple(m / 255.0 for m in VGG_MEAN)
INPUT_STD = (1.0 / 255.0,) * 3
# (scope, bottleneck depth, units, stride) of the four blocks.
_BLOCKS = (("block1", 64, 3, 2), ("block2", 128, 4, 2), ("block3", 256, 6, 2),
           ("block4", 512, 3, 1))


def _scaled(channels: int, width: float) -> int:
    return max(8, int(round(channels * width / 8)) * 8) if width != 1.0 else channels


def _network(name: str, keras: bool, num_classes: int, width: float, depth: float) -> Network:
    def conv(scope, filters, kernel=1, stride=1, padding="SAME"):
        return Node(scope, "conv", kernel=kernel, filters=filters, stride=stride, padding=padding)

    def relu(scope):
        return Node(f"{scope}/relu", "act", inputs=(scope,), fn="relu")

    nodes = [Node("conv1_pad", "pad", pads=(3, 3, 3, 3)),
             conv("conv1", _scaled(64, width), 7, 2, "VALID"), relu("conv1")]
    if keras:
        nodes += [Node("pool1_pad", "pad", pads=(1, 1, 1, 1)),
                  Node("pool1", "maxpool", kernel=3, stride=2, padding="VALID")]
    else:
        nodes.append(Node("pool1", "maxpool", kernel=3, stride=2))
    channels = _scaled(64, width)
    for block, base, units, block_stride in _BLOCKS:
        units = max(1, int(math.ceil(units * depth)))
        bottleneck, out = _scaled(base, width), _scaled(4 * base, width)
        for u in range(units):
            scope = f"{block}/unit_{u + 1}/bottleneck_v1"
            source = nodes[-1].name
            if keras:  # the stride in the first unit's 1x1 conv1 (and its shortcut)
                stride = 2 if u == 0 and block != "block1" else 1
                first_stride, middle_stride = stride, 1
            else:  # slim: in the last unit's 3x3 conv2
                stride = block_stride if u == units - 1 else 1
                first_stride, middle_stride = 1, stride
            if channels == out:  # identity, subsampled when strided
                shortcut = source
                if stride > 1:
                    nodes.append(Node(f"{scope}/shortcut", "maxpool", inputs=(source,),
                                      kernel=1, stride=stride))
                    shortcut = f"{scope}/shortcut"
            else:
                nodes.append(Node(f"{scope}/shortcut", "conv", inputs=(source,), filters=out,
                                  stride=stride))
                shortcut = f"{scope}/shortcut"
            nodes += [Node(f"{scope}/conv1", "conv", inputs=(source,), filters=bottleneck,
                           stride=first_stride), relu(f"{scope}/conv1")]
            if middle_stride > 1:  # slim's conv2d_same: explicit padding, then VALID
                nodes += [Node(f"{scope}/conv2_pad", "pad", pads=(1, 1, 1, 1)),
                          conv(f"{scope}/conv2", bottleneck, 3, middle_stride, "VALID")]
            else:
                nodes.append(conv(f"{scope}/conv2", bottleneck, 3))
            nodes += [relu(f"{scope}/conv2"), conv(f"{scope}/conv3", out),
                      Node(f"{scope}/add", "add", inputs=(f"{scope}/conv3", shortcut)),
                      relu(f"{scope}/add")]
            channels = out
    nodes += [Node("pool5", "gap", keepdims=False),
              Node("logits", "fc", filters=num_classes, batch_norm=False, conv_weights=True)]
    params = dict(num_classes=num_classes, width_multiplier=width, depth_multiplier=depth)
    return Network(name, SCOPE, tuple(nodes), tuple(sorted(params.items())), INPUT_MEAN,
                   INPUT_STD, 1.001e-5 if keras else 1e-5)


def resnet_v1_50(num_classes: int = 1000, width_multiplier: float = 1.0,
                 depth_multiplier: float = 1.0) -> Network:
    """slim's ResNet-V1-50 (strides in the last unit of each block)."""
    return _network("resnet_v1_50", False, num_classes, width_multiplier, depth_multiplier)


def resnet_v1_50_keras(num_classes: int = 1000, width_multiplier: float = 1.0,
                       depth_multiplier: float = 1.0) -> Network:
    """ResNet-V1-50 arranged as ``keras.applications.ResNet50``, with slim's variable names."""
    return _network("resnet_v1_50_keras", True, num_classes, width_multiplier,
                    depth_multiplier)


NETWORKS = {"resnet_v1_50": resnet_v1_50, "resnet_v1_50_keras": resnet_v1_50_keras}
