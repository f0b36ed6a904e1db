"""EfficientNet-B0, declared once with slim scope names.

Scopes follow the slim convention used by the Adjustable Quantization submission::

    efficientnet_b0/Conv/weights,
    efficientnet_b0/Conv/BatchNorm/{gamma,beta,moving_mean,moving_variance}
    efficientnet_b0/expanded_conv[_i]/{expand,dws,se_1,se_2,project}/...
    efficientnet_b0/Conv_1/..., efficientnet_b0/Logits/{weights,biases}

:func:`network` returns the declaration (an :class:`adj_quant.network.Network`); the float
module, the quantized module, the counting and the export are derived from it.

Inputs are RGB images in ``[0, 1]``, NHWC; the network normalises them with the ImageNet
mean and standard deviation.
"""

from __future__ import annotations

import dataclasses
import math

from adj_quant.network import Network, Node

NAME = "efficientnet_b0"
SCOPE = "efficientnet_b0"
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (kernel, repeats, filters_in, filters_out, expand_ratio, stride) of the seven B0 stages.
_B0_STAGES = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
SE_RATIO = 0.25


def round_filters(filters: int, width_multiplier: float, divisor: int = 8) -> int:
    """Channel count scaled by the width multiplier, rounded to a multiple of ``divisor``."""
    filters *= width_multiplier
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:  # never round down by more than 10%
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth_multiplier: float) -> int:
    return int(math.ceil(depth_multiplier * repeats))


def block_scope(index: int) -> str:
    """Slim scope of block ``index``: ``expanded_conv``, ``expanded_conv_1``, ..."""
    return "expanded_conv" if index == 0 else f"expanded_conv_{index}"


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One inverted-residual (MBConv) block."""

    scope: str
    kernel: int
    stride: int
    filters_in: int
    filters_out: int
    expand_ratio: int

    @property
    def expanded(self) -> int:
        return self.filters_in * self.expand_ratio

    @property
    def has_expand(self) -> bool:
        return self.expand_ratio != 1

    @property
    def se_filters(self) -> int:
        """SE reduce width: ``max(1, int(block_input_filters * 0.25))``."""
        return max(1, int(self.filters_in * SE_RATIO))

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def blocks(width_multiplier: float = 1.0, depth_multiplier: float = 1.0) -> list[BlockConfig]:
    stages = [(k, round_repeats(r, depth_multiplier), round_filters(fi, width_multiplier),
               round_filters(fo, width_multiplier), e, s) for k, r, fi, fo, e, s in _B0_STAGES]
    configs = []
    for kernel, repeats, f_in, f_out, expand, stride in stages:
        for j in range(repeats):
            configs.append(BlockConfig(
                scope=block_scope(len(configs)), kernel=kernel, stride=stride if j == 0 else 1,
                filters_in=f_in if j == 0 else f_out, filters_out=f_out, expand_ratio=expand))
    return configs


def network(num_classes: int = 1000, width_multiplier: float = 1.0,
            depth_multiplier: float = 1.0) -> Network:
    """EfficientNet-B0 (Tan & Le 2019) with the slim scopes of the original submission."""
    def conv(name, filters, kernel=1, stride=1, **kw):
        return Node(name, "conv", kernel=kernel, filters=filters, stride=stride, **kw)

    def swish(name):
        return Node(f"{name}/swish", "act", inputs=(name,), fn="swish")

    nodes = [conv("Conv", round_filters(32, width_multiplier), 3, 2), swish("Conv")]
    configs = blocks(width_multiplier, depth_multiplier)
    for index, b in enumerate(configs):
        inputs = nodes[-1].name
        if b.has_expand:
            nodes += [conv(f"{b.scope}/expand", b.expanded), swish(f"{b.scope}/expand")]
        dws = f"{b.scope}/dws"
        nodes += [Node(dws, "dws", kernel=b.kernel, stride=b.stride), swish(dws),
                  # squeeze-and-excitation
                  Node(f"{b.scope}/se", "gap", inputs=(f"{dws}/swish",)),
                  conv(f"{b.scope}/se_1", b.se_filters, batch_norm=False),
                  swish(f"{b.scope}/se_1"),
                  conv(f"{b.scope}/se_2", b.expanded, batch_norm=False),
                  Node(f"{b.scope}/se_2/sigmoid", "act", fn="sigmoid"),
                  Node(f"{b.scope}/se_scale", "mul", inputs=(f"{dws}/swish",
                                                            f"{b.scope}/se_2/sigmoid")),
                  conv(f"{b.scope}/project", b.filters_out)]
        if b.has_residual:
            nodes.append(Node(f"{b.scope}/residual", "add",
                              inputs=(f"{b.scope}/project", inputs),
                              drop_path=(index, len(configs))))
    nodes += [conv("Conv_1", round_filters(1280, width_multiplier)), swish("Conv_1"),
              Node("Logits/AvgPool", "gap", keepdims=False), Node("Dropout", "dropout"),
              Node("Logits", "fc", filters=num_classes, batch_norm=False)]
    params = dict(num_classes=num_classes, width_multiplier=width_multiplier,
                  depth_multiplier=depth_multiplier)
    return Network(NAME, SCOPE, tuple(nodes), tuple(sorted(params.items())),
                   IMAGENET_MEAN, IMAGENET_STD, BN_EPSILON)
