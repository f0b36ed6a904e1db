"""EfficientNet-B0 as a ``tf.Module`` with slim variable names.

Scopes follow the slim convention used by the Adjustable Quantization submission::

    efficientnet_b0/Conv/weights, efficientnet_b0/Conv/BatchNorm/{gamma,beta,moving_mean,moving_variance}
    efficientnet_b0/expanded_conv[_i]/{expand,dws,se_1,se_2,project}/...
    efficientnet_b0/Conv_1/..., efficientnet_b0/Logits/{weights,biases}

The network definition is written once, in :func:`efficientnet_forward`, against a small
"layers" interface, so the float model here and the quantized model in
``adj_quant.qmodel`` run exactly the same graph.

Inputs are RGB images in ``[0, 1]``, NHWC; the model normalises them with the ImageNet
mean and standard deviation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import tensorflow as tf
from tf_slim.ops.arg_scope import add_arg_scope, arg_scope

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
    drop_rate: float

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


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Everything that fixes the shapes of the network."""

    num_classes: int = 1000
    width_multiplier: float = 1.0
    depth_multiplier: float = 1.0

    @property
    def stem_filters(self) -> int:
        return round_filters(32, self.width_multiplier)

    @property
    def head_filters(self) -> int:
        return round_filters(1280, self.width_multiplier)

    def blocks(self, drop_connect_rate: float = 0.2) -> list[BlockConfig]:
        stages = [
            (k, round_repeats(r, self.depth_multiplier), round_filters(fi, self.width_multiplier),
             round_filters(fo, self.width_multiplier), e, s)
            for k, r, fi, fo, e, s in _B0_STAGES
        ]
        total = sum(r for _, r, *_ in stages)
        configs = []
        for kernel, repeats, f_in, f_out, expand, stride in stages:
            for j in range(repeats):
                index = len(configs)
                configs.append(BlockConfig(
                    scope=block_scope(index), kernel=kernel, stride=stride if j == 0 else 1,
                    filters_in=f_in if j == 0 else f_out, filters_out=f_out, expand_ratio=expand,
                    drop_rate=drop_connect_rate * index / total))
        return configs


# --------------------------------------------------------------------------- layers


def _truncated_normal(rng: tf.random.Generator, shape, stddev: float) -> tf.Tensor:
    # 0.8796... is the stddev of a unit normal truncated at two standard deviations.
    return rng.truncated_normal(shape, stddev=stddev / 0.87962566103423978)


class BatchNorm(tf.Module):
    """Slim ``BatchNorm`` scope: gamma, beta and moving statistics."""

    def __init__(self, scope: str, channels: int, epsilon: float = BN_EPSILON,
                 momentum: float = BN_MOMENTUM):
        super().__init__(name=None)
        self.epsilon = epsilon
        self.momentum = momentum
        self.gamma = tf.Variable(tf.ones([channels]), name=f"{scope}/BatchNorm/gamma")
        self.beta = tf.Variable(tf.zeros([channels]), name=f"{scope}/BatchNorm/beta")
        self.moving_mean = tf.Variable(tf.zeros([channels]), trainable=False,
                                       name=f"{scope}/BatchNorm/moving_mean")
        self.moving_variance = tf.Variable(tf.ones([channels]), trainable=False,
                                           name=f"{scope}/BatchNorm/moving_variance")

    def __call__(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        if training:
            mean, variance = tf.nn.moments(x, axes=list(range(len(x.shape) - 1)))
            self.moving_mean.assign(self.momentum * self.moving_mean + (1 - self.momentum) * mean)
            self.moving_variance.assign(
                self.momentum * self.moving_variance + (1 - self.momentum) * variance)
        else:
            mean, variance = self.moving_mean, self.moving_variance
        return tf.nn.batch_normalization(x, mean, variance, self.beta, self.gamma, self.epsilon)

    def folding_factors(self) -> tuple[tf.Tensor, tf.Tensor]:
        """``(scale, shift)`` such that ``BN(y) = y * scale + shift`` in inference mode."""
        scale = self.gamma * tf.math.rsqrt(self.moving_variance + self.epsilon)
        return scale, self.beta - self.moving_mean * scale


class ConvLayer(tf.Module):
    """A slim conv scope: ``weights`` plus either ``BatchNorm`` or ``biases``.

    ``kind`` is ``"conv"`` (weights ``[k, k, cin, cout]``), ``"dws"`` (depthwise,
    ``[k, k, C, 1]``, slim name ``depthwise_weights``) or ``"fc"`` (``[cin, cout]``).
    """

    def __init__(self, scope: str, kind: str, kernel: int, cin: int, cout: int, stride: int,
                 batch_norm: bool, rng: tf.random.Generator):
        super().__init__(name=None)
        self.scope, self.kind, self.kernel, self.stride = scope, kind, kernel, stride
        self.cin, self.cout = cin, cout
        if kind == "conv":
            shape = [kernel, kernel, cin, cout]
            init = _truncated_normal(rng, shape, math.sqrt(2.0 / (kernel * kernel * cout)))
            name = "weights"
        elif kind == "dws":
            shape = [kernel, kernel, cin, 1]
            init = _truncated_normal(rng, shape, math.sqrt(2.0 / (kernel * kernel)))
            name = "depthwise_weights"
        elif kind == "fc":
            shape = [cin, cout]
            limit = math.sqrt(1.0 / cin)  # independent of the class count
            init = rng.uniform(shape, -limit, limit)
            name = "weights"
        else:
            raise ValueError(f"unknown layer kind {kind!r}")
        self.weights = tf.Variable(init, name=f"{scope}/{name}")
        self.bn = BatchNorm(scope, cout) if batch_norm else None
        self.biases = None if batch_norm else tf.Variable(tf.zeros([cout]), name=f"{scope}/biases")

    def __call__(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        y = apply_linear(self.kind, x, self.weights, self.stride)
        if self.bn is not None:
            return self.bn(y, training)
        return y + self.biases


def apply_linear(kind: str, x: tf.Tensor, weights: tf.Tensor, stride: int = 1) -> tf.Tensor:
    """The linear part of a layer: conv, depthwise conv (SAME padding) or matmul."""
    if kind == "conv":
        return tf.nn.conv2d(x, weights, strides=stride, padding="SAME")
    if kind == "dws":
        return tf.nn.depthwise_conv2d(x, weights, strides=[1, stride, stride, 1], padding="SAME")
    return tf.matmul(x, weights)


def fold_batch_norm(layer: ConvLayer) -> tuple[tf.Tensor, tf.Tensor]:
    """Weights and bias whose output equals ``layer`` (conv + BN) in inference mode.

    Layers without batch norm return their own weights and biases.
    """
    if layer.bn is None:
        return tf.identity(layer.weights), tf.identity(layer.biases)
    scale, shift = layer.bn.folding_factors()
    if layer.kind == "dws":  # [k, k, C, 1]: the channel is axis 2
        return layer.weights * scale[:, None], shift
    return layer.weights * scale, shift


@add_arg_scope
def conv(scope: str, kernel: int, cin: int, cout: int, stride: int = 1, *, kind: str = "conv",
         batch_norm: bool = True, rng: tf.random.Generator | None = None) -> ConvLayer:
    return ConvLayer(scope, kind, kernel, cin, cout, stride, batch_norm, rng)


# --------------------------------------------------------------------------- network


def swish(x: tf.Tensor) -> tf.Tensor:
    return x * tf.sigmoid(x)


def layer_scopes(arch: ArchConfig) -> list[str]:
    """Scopes of all weight layers, in execution order (``expanded_conv/dws``, ...)."""
    return list(build_layer_shapes(arch))


def swish_scopes(arch: ArchConfig) -> list[str]:
    """Scopes whose output goes through swish (the swish-input quantizer sites)."""
    scopes = ["Conv"]
    for block in arch.blocks():
        subs = (["expand"] if block.has_expand else []) + ["dws", "se_1"]
        scopes += [f"{block.scope}/{sub}" for sub in subs]
    return scopes + ["Conv_1"]


def efficientnet_forward(
    layers: dict[str, Callable], images: tf.Tensor, arch: ArchConfig, *,
    training: bool, swish_fn: Callable[[str, tf.Tensor], tf.Tensor],
    dropout_rate: float = 0.2, drop_connect_rate: float = 0.2,
    rng: tf.random.Generator | None = None,
) -> tf.Tensor:
    """EfficientNet-B0 logits from images in ``[0, 1]``.

    ``layers[scope](x, training)`` returns a layer's pre-activation output and
    ``swish_fn(scope, x)`` its swish; dropout and drop-connect draw from ``rng``.
    """
    x = (images - IMAGENET_MEAN) / IMAGENET_STD
    x = swish_fn("Conv", layers["Conv"](x, training))
    for block in arch.blocks(drop_connect_rate):
        inputs = x
        if block.has_expand:
            x = swish_fn(f"{block.scope}/expand", layers[f"{block.scope}/expand"](x, training))
        x = swish_fn(f"{block.scope}/dws", layers[f"{block.scope}/dws"](x, training))
        # Squeeze-and-excitation.
        se = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
        se = swish_fn(f"{block.scope}/se_1", layers[f"{block.scope}/se_1"](se, training))
        x = x * tf.sigmoid(layers[f"{block.scope}/se_2"](se, training))
        x = layers[f"{block.scope}/project"](x, training)
        if block.has_residual:
            if training and block.drop_rate > 0:
                x = _dropout(x, block.drop_rate, rng, noise_shape=[tf.shape(x)[0], 1, 1, 1])
            x = x + inputs
    x = swish_fn("Conv_1", layers["Conv_1"](x, training))
    x = tf.reduce_mean(x, axis=[1, 2])
    if training and dropout_rate > 0:
        x = _dropout(x, dropout_rate, rng)
    return layers["Logits"](x, training)


def _dropout(x, rate, rng, noise_shape=None):
    if rng is None:
        raise ValueError("training with dropout needs an rng (tf.random.Generator)")
    return tf.nn.experimental.stateless_dropout(x, rate, seed=rng.make_seeds(1)[:, 0],
                                                noise_shape=noise_shape)


class EfficientNetB0(tf.Module):
    """Float EfficientNet-B0 with batch norm; call it on NHWC images in ``[0, 1]``."""

    def __init__(self, num_classes: int = 1000, width_multiplier: float = 1.0,
                 depth_multiplier: float = 1.0, dropout_rate: float = 0.2,
                 drop_connect_rate: float = 0.2, seed: int = 0,
                 bn_momentum: float = BN_MOMENTUM):
        super().__init__(name=SCOPE)
        self.arch = ArchConfig(num_classes, width_multiplier, depth_multiplier)
        self.dropout_rate, self.drop_connect_rate = dropout_rate, drop_connect_rate
        self.rng = tf.random.Generator.from_seed(seed)
        init_rng = tf.random.Generator.from_seed(seed + 1)
        self.layers = build_layers(self.arch, init_rng)
        for layer in self.layers.values():
            if layer.bn is not None:
                layer.bn.momentum = bn_momentum

    def __call__(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        return efficientnet_forward(
            self.layers, images, self.arch, training=training, swish_fn=lambda _, x: swish(x),
            dropout_rate=self.dropout_rate, drop_connect_rate=self.drop_connect_rate, rng=self.rng)

    def slim_variables(self) -> dict[str, tf.Variable]:
        """All model variables by slim name (without ``:0``)."""
        return {v.name[:-2]: v for v in self.variables if v.name.startswith(SCOPE + "/")}


def build_layer_shapes(arch: ArchConfig) -> dict[str, tuple[str, int, int, int, int]]:
    """``{scope: (kind, kernel, cin, cout, stride)}`` of every weight layer, in execution order."""
    shapes = {"Conv": ("conv", 3, 3, arch.stem_filters, 2)}
    for b in arch.blocks():
        if b.has_expand:
            shapes[f"{b.scope}/expand"] = ("conv", 1, b.filters_in, b.expanded, 1)
        shapes[f"{b.scope}/dws"] = ("dws", b.kernel, b.expanded, b.expanded, b.stride)
        shapes[f"{b.scope}/se_1"] = ("conv", 1, b.expanded, b.se_filters, 1)
        shapes[f"{b.scope}/se_2"] = ("conv", 1, b.se_filters, b.expanded, 1)
        shapes[f"{b.scope}/project"] = ("conv", 1, b.expanded, b.filters_out, 1)
    shapes["Conv_1"] = ("conv", 1, arch.blocks()[-1].filters_out, arch.head_filters, 1)
    shapes["Logits"] = ("fc", 1, arch.head_filters, arch.num_classes, 1)
    return shapes


def has_batch_norm(scope: str) -> bool:
    """SE convs and the logits have biases; every other layer has batch norm."""
    return not scope.endswith(("/se_1", "/se_2")) and scope != "Logits"


def build_layers(arch: ArchConfig, rng: tf.random.Generator) -> dict[str, ConvLayer]:
    """Create every weight layer of the network, keyed by scope relative to ``efficientnet_b0``."""
    with arg_scope([conv], rng=rng):
        return {scope: conv(f"{SCOPE}/{scope}", kernel, cin, cout, stride, kind=kind,
                            batch_norm=has_batch_norm(scope))
                for scope, (kind, kernel, cin, cout, stride) in build_layer_shapes(arch).items()}
