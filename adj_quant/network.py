"""A network declared once, as data, and the float ``tf.Module`` derived from it.

A :class:`Network` is an ordered list of :class:`Node` s. Each node names its slim scope,
its operation and its inputs; shapes follow from the declaration and the image size.
Everything else in adjq is derived from this one declaration: the float module here, the
quantized module (:mod:`adj_quant.qnetwork`: where the quantizers go), the calibration
sites, the MicroNet / adjq counting (:mod:`adj_quant.cost`), the ``quant_info.json``
keys (:mod:`adj_quant.quant_info`) and the TFLite export (:mod:`adj_quant.cli.export`).

Operations (``Node.op``):

``conv``, ``dws``, ``fc``
    The weight layers: a convolution (weights ``[k, k, cin, filters]``), a depthwise
    convolution (``[k, k, C, 1]``, slim name ``depthwise_weights``) or a fully connected
    layer (``[cin, filters]``; ``conv_weights`` stores them as a 1x1 convolution kernel
    ``[1, 1, cin, filters]``, as slim's MobileNet and ResNet logits do). Convolutions use
    ``padding`` ``"SAME"`` (default) or ``"VALID"``. Followed by a slim ``BatchNorm`` scope
    when ``batch_norm`` is true, else by ``biases``. Their output is the pre-activation.
    A conv or depthwise conv may have a non-square kernel (``kernel`` rows by ``kernel_w``
    columns; SAME padding, or VALID at stride 1 with a square output is not possible, so
    VALID needs a square kernel), a ``dilation`` rate, and a conv ``groups``
    (weights ``[kh, kw, cin / groups, filters]``: each group of input channels feeds its
    own group of outputs). A 1x1 depthwise conv is a per-channel affine map (a standalone
    batch norm, a layer scale); it also reads ``[N, C]`` features.
``act``
    An activation function ``fn``: ``swish``, ``sigmoid``, ``relu``, ``relu6``,
    ``hard_swish`` (``x * relu6(x + 3) / 6``), ``hard_sigmoid`` (``relu6(x + 3) / 6``) or
    ``gelu`` (the exact ``x * Phi(x)``). The
    inputs of ``swish`` and ``sigmoid`` are quantizer sites; a site is keyed by the scope of
    the node that feeds it (``expanded_conv/dws`` for the swish after the depthwise conv).
``gap``
    Global average pooling over H and W (``keepdims`` keeps a 1x1 map).
``maxpool``
    Max pooling, ``kernel`` x ``kernel`` windows at ``stride``, ``padding`` SAME or VALID.
``pad``
    Zero padding of H and W by ``pads = (top, bottom, left, right)`` (slim's
    ``conv2d_same`` and Keras' ``ZeroPadding2D``; a VALID convolution follows). Images are
    square, so ``top + bottom`` must equal ``left + right``.
``mul``
    Elementwise product of two inputs (the squeeze-excitation scale).
``add``
    Residual addition of two inputs. During training the first input is dropped per
    example with probability ``drop_connect_rate * index / total`` (``drop_path``).
``dropout``
    Dropout during training with the network's ``dropout_rate``.
``concat``
    Concatenation of two or more inputs along the channels (equal spatial sides).
``slice``
    Channels ``start`` to ``start + filters`` of its input (a channel group).
``avgpool``
    Average pooling, ``kernel`` x ``kernel`` windows at ``stride``; with SAME padding a
    border window averages only the values inside the image (as TensorFlow and Keras do).
``flatten``
    The ``[N, H, W, C]`` map as ``[N, H * W * C]`` features (row-major, as Keras'
    ``Flatten``); fc layers read it. ``filters``, when given, is ``H * W * C``: the
    following fc's weights then fit that one image size (as VGG's do), whatever size the
    declaration's other users assume.
``crop``
    Removal of ``pads = (top, bottom, left, right)`` rows and columns (Keras'
    ``Cropping2D``; ``top + bottom == left + right``).
``layer_norm``
    Normalisation of every position over its channels, ``(x - mean) / sqrt(var +
    epsilon)``, without a scale or shift (an imported layer norm puts its gamma and beta in
    a following 1x1 depthwise conv).

A node's inputs default to the previous node; the first node reads ``"image"``, the input
normalised with ``input_mean`` / ``input_std``. The last node is the output (the logits).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import numpy as np
import tensorflow as tf
from tf_slim.ops.arg_scope import add_arg_scope, arg_scope

from adj_quant.errors import UserError

IMAGE = "image"
LINEAR_OPS = ("conv", "dws", "fc")
ACTIVATIONS = {
    "swish": lambda x: x * tf.sigmoid(x),
    "sigmoid": tf.sigmoid,
    "relu": tf.nn.relu,
    "relu6": tf.nn.relu6,
    "hard_swish": lambda x: x * tf.nn.relu6(x + 3.0) * (1.0 / 6.0),
    "hard_sigmoid": lambda x: tf.nn.relu6(x + 3.0) * (1.0 / 6.0),
    "gelu": lambda x: tf.nn.gelu(x, approximate=False),
}
#: Activation functions whose input is quantized (``--swish_bits`` applies to both).
QUANTIZED_ACTIVATIONS = ("swish", "sigmoid")
OPS = LINEAR_OPS + ("act", "gap", "maxpool", "pad", "mul", "add", "dropout", "concat",
                    "slice", "avgpool", "flatten", "layer_norm", "crop")
PADDINGS = ("SAME", "VALID")


@dataclasses.dataclass(frozen=True)
class Node:
    """One operation of a network (see the module docstring for ``op``)."""

    name: str
    op: str
    inputs: tuple[str, ...] = ()
    kernel: int = 1
    filters: int | None = None       # conv / fc output channels (dws keeps its input's)
    stride: int = 1
    batch_norm: bool = True          # linear ops: BatchNorm, else biases
    fn: str | None = None            # act: a key of ACTIVATIONS
    keepdims: bool = True            # gap
    drop_path: tuple[int, int] | None = None  # add: (index, total) of drop-connect
    padding: str = "SAME"            # conv, dws, maxpool: "SAME" or "VALID"
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # pad: (top, bottom, left, right)
    conv_weights: bool = False       # fc: weights stored as [1, 1, cin, filters]
    kernel_w: int = 0                # conv, dws: kernel columns when not square (0: kernel)
    groups: int = 1                  # conv: channel groups
    dilation: int = 1                # conv, dws: dilation rate
    start: int = 0                   # slice: the first channel
    epsilon: float = 0.0             # layer_norm

    @property
    def kernel_hw(self) -> tuple[int, int]:
        """``(rows, columns)`` of the kernel."""
        return self.kernel, self.kernel_w or self.kernel


@dataclasses.dataclass(frozen=True)
class Shape:
    """Spatial side and channels of a node's output (``hw`` is 1 after pooling / FC)."""

    hw: int
    channels: int


@dataclasses.dataclass(frozen=True)
class Network:
    """A declared network: its slim scope, nodes and construction parameters.

    ``params`` are the keyword arguments of the declaring function (``num_classes``
    included), as sorted ``(name, value)`` pairs, so that a saved model spec can rebuild
    the same network with ``adj_quant.nets.build(name, **dict(params))``.
    """

    name: str
    scope: str
    nodes: tuple[Node, ...]
    params: tuple[tuple[str, object], ...] = ()
    input_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    input_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    bn_epsilon: float = 1e-3

    def __post_init__(self):
        _check(self)

    # ------------------------------------------------------------------ structure

    @property
    def num_classes(self) -> int:
        return int(self.shapes(32)[self.nodes[-1].name].channels)

    @functools.cached_property
    def _inputs(self) -> dict[str, tuple[str, ...]]:
        previous = [IMAGE] + [n.name for n in self.nodes[:-1]]
        return {n.name: n.inputs or (prev,) for n, prev in zip(self.nodes, previous)}

    def inputs_of(self, node: Node) -> tuple[str, ...]:
        """The names of ``node``'s inputs (the previous node, or the image, by default)."""
        return self._inputs[node.name]

    @property
    def layers(self) -> list[Node]:
        """The weight layers (conv, depthwise, FC), in execution order."""
        return [n for n in self.nodes if n.op in LINEAR_OPS]

    @property
    def layer_names(self) -> list[str]:
        return [n.name for n in self.layers]

    def is_stem(self, node: Node) -> bool:
        """A layer that multiplies with the 8-bit image (it has no input quantizer); zero
        padding of the image in between still leaves the image."""
        if node.op not in LINEAR_OPS:
            return False
        source = self.inputs_of(node)[0]
        while source != IMAGE and self.node(source).op == "pad":
            source = self.inputs_of(self.node(source))[0]
        return source == IMAGE

    def node(self, name: str) -> Node:
        """The node called ``name``."""
        return self._by_name[name]

    @functools.cached_property
    def _by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def activation_sites(self, fn: str) -> list[str]:
        """Scopes whose output feeds an activation ``fn`` (the keys of its quantizers)."""
        return [self.inputs_of(n)[0] for n in self.nodes if n.op == "act" and n.fn == fn]

    # ------------------------------------------------------------------ shapes

    def shapes(self, img_size: int) -> dict[str, Shape]:
        """Output shape of every node for ``img_size`` x ``img_size`` RGB images."""
        return dict(self._shapes(img_size))

    @functools.lru_cache(maxsize=8)  # noqa: B019 (a frozen, hashable declaration)
    def _shapes(self, img_size: int) -> dict[str, Shape]:
        shapes = {IMAGE: Shape(img_size, 3)}
        for node in self.nodes:
            first = shapes[self.inputs_of(node)[0]]
            if node.op == "conv":
                shape = Shape(_out_side(first.hw, node), node.filters)
            elif node.op in ("dws", "maxpool"):
                shape = Shape(_out_side(first.hw, node), first.channels)
            elif node.op == "pad":
                shape = Shape(first.hw + node.pads[0] + node.pads[1], first.channels)
            elif node.op == "crop":
                shape = Shape(first.hw - node.pads[0] - node.pads[1], first.channels)
            elif node.op == "fc":
                shape = Shape(1, node.filters)
            elif node.op == "avgpool":
                shape = Shape(_out_side(first.hw, node), first.channels)
            elif node.op == "flatten":  # the features fixed by the declaration, if given
                shape = Shape(1, node.filters or first.hw * first.hw * first.channels)
            elif node.op == "concat":
                shape = Shape(first.hw, sum(shapes[i].channels for i in self.inputs_of(node)))
            elif node.op == "slice":
                shape = Shape(first.hw, node.filters)
            elif node.op == "gap":
                shape = Shape(1, first.channels)
            elif node.op in ("mul", "add"):  # the larger operand (SE scale broadcasts 1x1)
                shape = max((shapes[i] for i in self.inputs_of(node)), key=lambda s: s.hw)
            else:
                shape = first
            shapes[node.name] = shape
        return shapes

    def layer_shapes(self, img_size: int) -> dict[str, tuple[int, int, int, int]]:
        """``{layer: (in_hw, cin, out_hw, cout)}`` of every weight layer."""
        shapes = self.shapes(img_size)
        result = {}
        for node in self.layers:
            src = shapes[self.inputs_of(node)[0]]
            out = shapes[node.name]
            result[node.name] = (src.hw, src.channels, out.hw, out.channels)
        return result

    # ------------------------------------------------------------------ forward

    def forward(self, images: tf.Tensor, layer: Callable, *, training: bool = False,
                activation: Callable | None = None, dropout: Callable | None = None,
                dropout_rate: float = 0.0, drop_connect_rate: float = 0.0) -> tf.Tensor:
        """Run the network on NHWC images in ``[0, 1]``.

        ``layer(name, x, training)`` computes a weight layer's pre-activation;
        ``activation(name, fn, x)`` an activation (``name`` is the scope feeding it);
        ``dropout(x, rate, noise_shape)`` drops during training (needed only when a rate
        is positive).
        """
        activation = activation or (lambda name, fn, x: ACTIVATIONS[fn](x))
        last_use = {}
        for i, node in enumerate(self.nodes):
            for name in self.inputs_of(node):
                last_use[name] = i
        values = {IMAGE: (float_images(images) - self.input_mean) / self.input_std}
        for i, node in enumerate(self.nodes):
            names = self.inputs_of(node)
            x = values[names[0]]
            if node.op in LINEAR_OPS:
                y = layer(node.name, x, training)
            elif node.op == "act":
                y = activation(names[0], node.fn, x)
            elif node.op == "gap":
                y = tf.reduce_mean(x, axis=[1, 2], keepdims=node.keepdims)
            elif node.op == "maxpool":
                y = tf.nn.max_pool2d(x, node.kernel, node.stride, node.padding)
            elif node.op == "pad":
                top, bottom, left, right = node.pads
                y = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
            elif node.op == "mul":
                y = x * values[names[1]]
            elif node.op == "add":
                if training and node.drop_path and drop_connect_rate > 0:
                    index, total = node.drop_path
                    rate = drop_connect_rate * index / total
                    if rate > 0:
                        x = dropout(x, rate, [tf.shape(x)[0], 1, 1, 1])
                y = x + values[names[1]]
            elif node.op in EXTRA_OPS:
                y = EXTRA_OPS[node.op](node, [values[name] for name in names])
            elif training and dropout_rate > 0:  # dropout
                y = dropout(x, dropout_rate, None)
            else:
                y = x
            values[node.name] = y
            for name in names:
                if last_use[name] == i:
                    del values[name]
        return values[self.nodes[-1].name]


def float_images(images) -> tf.Tensor:
    """``images`` (a tensor or NumPy array of any float dtype) as a float32 tensor; a float32
    tensor is returned as it is."""
    if isinstance(images, (tf.Tensor, tf.Variable)) and images.dtype == tf.float32:
        return images
    dtype = tf.as_dtype(images.dtype) if hasattr(images, "dtype") else None
    if dtype is not None and not dtype.is_floating:
        raise UserError(f"images of dtype {dtype.name}: pass floats in [0, 1] (e.g. uint8 "
                        "pixels divided by 255)")
    return tf.cast(images, tf.float32)


def _flatten(node: Node, xs: list) -> tf.Tensor:
    x = xs[0]
    features = x.shape[1:].num_elements()
    return tf.reshape(x, [-1, features if features is not None else -1])


def _layer_norm(node: Node, xs: list) -> tf.Tensor:
    mean, variance = tf.nn.moments(xs[0], axes=[-1], keepdims=True)
    return (xs[0] - mean) * tf.math.rsqrt(variance + node.epsilon)


#: The operations that need nothing but their node and input values.
EXTRA_OPS = {
    "concat": lambda node, xs: tf.concat(xs, axis=-1),
    "slice": lambda node, xs: xs[0][..., node.start:node.start + node.filters],
    "avgpool": lambda node, xs: tf.nn.avg_pool2d(xs[0], node.kernel, node.stride, node.padding),
    "flatten": _flatten,
    "crop": lambda node, xs: xs[0][:, node.pads[0]:xs[0].shape[1] - node.pads[1],
                                   node.pads[2]:xs[0].shape[2] - node.pads[3]],
    "layer_norm": _layer_norm,
}


def _out_side(side: int, node: Node) -> int:
    """Output side of a strided window op: SAME ``ceil(side / stride)``, VALID
    ``floor((side - kernel) / stride) + 1`` (the kernel dilated by ``dilation``)."""
    if node.padding == "SAME":
        return -(-side // node.stride)
    kernel = node.dilation * (node.kernel - 1) + 1
    return (side - kernel) // node.stride + 1


def _check(net: Network) -> None:
    """A declaration error names the node and what is wrong with it."""
    seen = {IMAGE}
    if not net.scope.isidentifier():
        raise ValueError(f"network {net.name!r}: scope {net.scope!r} must be a Python "
                         "identifier (letters, digits, underscores), e.g. 'my_net'")
    if not net.nodes:
        raise ValueError(f"network {net.name!r} has no nodes")
    for node in net.nodes:
        where = f"network {net.name!r}, node {node.name!r}"
        if node.op not in OPS:
            raise ValueError(f"{where}: unknown op {node.op!r}; use one of {', '.join(OPS)}")
        if node.name in seen:
            raise ValueError(f"{where}: the name is used twice")
        for name in node.inputs:
            if name not in seen:
                raise ValueError(f"{where}: input {name!r} is not an earlier node")
        wanted = 2 if node.op in ("mul", "add") else 1
        if node.op == "concat":
            if len(node.inputs) < 2:
                raise ValueError(f"{where}: concat takes two or more inputs")
        elif node.inputs and len(node.inputs) != wanted or (not node.inputs and wanted == 2):
            raise ValueError(f"{where}: {node.op} takes {wanted} input(s)")
        _check_conv_options(node, where)
        if node.op in ("conv", "fc") and not node.filters:
            raise ValueError(f"{where}: {node.op} needs filters")
        if node.padding not in PADDINGS:
            raise ValueError(f"{where}: padding {node.padding!r}; use SAME or VALID")
        if node.op in ("pad", "crop") and (len(node.pads) != 4 or min(node.pads) < 0
                                 or node.pads[0] + node.pads[1] != node.pads[2] + node.pads[3]):
            raise ValueError(f"{where}: pads {node.pads!r} must be four non-negative "
                             "(top, bottom, left, right) with top + bottom == left + right")
        if node.conv_weights and node.op != "fc":
            raise ValueError(f"{where}: conv_weights applies to fc layers only")
        if node.op == "act" and node.fn not in ACTIVATIONS:
            raise ValueError(f"{where}: activation {node.fn!r}; use one of "
                             f"{', '.join(ACTIVATIONS)}")
        seen.add(node.name)
    if net.nodes[-1].op != "fc":
        raise ValueError(f"network {net.name!r}: the last node must be the fc logits layer")
    shapes = net.shapes(32)
    for node in net.nodes:
        where = f"network {net.name!r}, node {node.name!r}"
        cin = shapes[net.inputs_of(node)[0]].channels
        if node.op == "conv" and (cin % node.groups or node.filters % node.groups):
            raise ValueError(f"{where}: groups={node.groups} must divide the input channels "
                             f"({cin}) and the filters ({node.filters})")
        if node.op == "slice" and node.start + node.filters > cin:
            raise ValueError(f"{where}: channels {node.start}..{node.start + node.filters} "
                             f"exceed the input's {cin}")
        if node.op == "concat" and len({shapes[i].hw for i in node.inputs}) != 1:
            raise ValueError(f"{where}: the inputs of a concat need one spatial size")


def _check_conv_options(node: Node, where: str) -> None:
    """Non-square kernels, groups, dilation and slices, where they apply."""
    if node.kernel_w and node.op not in ("conv", "dws"):
        raise ValueError(f"{where}: kernel_w applies to conv and dws only")
    if node.kernel_w and node.kernel_w != node.kernel and node.padding != "SAME":
        raise ValueError(f"{where}: a non-square kernel needs SAME padding (square outputs)")
    if node.groups < 1 or node.groups != 1 and node.op != "conv":
        raise ValueError(f"{where}: groups={node.groups}; only conv layers have groups >= 1")
    if node.dilation < 1 or node.dilation != 1 and node.op not in ("conv", "dws"):
        raise ValueError(f"{where}: dilation={node.dilation}; conv and dws only, >= 1")
    if node.dilation != 1 and node.stride != 1:
        raise ValueError(f"{where}: dilation needs stride 1")
    if node.op == "slice" and (node.start < 0 or not node.filters):
        raise ValueError(f"{where}: slice needs start >= 0 and filters (the channel count)")
    if node.op == "flatten" and node.filters is not None and node.filters < 1:
        raise ValueError(f"{where}: flatten filters (the feature count) must be positive")
    if node.op == "layer_norm" and not node.epsilon > 0:
        raise ValueError(f"{where}: layer_norm needs epsilon > 0")


# --------------------------------------------------------------------------- the float module


def _truncated_normal(rng: tf.random.Generator, shape, stddev: float) -> tf.Tensor:
    # 0.8796... is the stddev of a unit normal truncated at two standard deviations.
    return rng.truncated_normal(shape, stddev=stddev / 0.87962566103423978)


class BatchNorm(tf.Module):
    """Slim ``BatchNorm`` scope: gamma, beta and moving statistics.

    Under a ``tf.distribute`` strategy each replica keeps its own moving statistics
    (``ON_READ``: a checkpoint or a cross-replica read sees their mean). With ``sync``
    (``--sync_bn``) a training batch is normalised with the statistics of the global
    batch, summed over all replicas, so every replica computes what one device would.
    """

    def __init__(self, scope: str, channels: int, epsilon: float, momentum: float = 0.99,
                 sync: bool = False):
        super().__init__(name=None)
        self.epsilon = epsilon
        self.momentum = momentum
        self.sync = sync
        self.gamma = tf.Variable(np.ones([channels], np.float32), name=f"{scope}/BatchNorm/gamma")
        self.beta = tf.Variable(np.zeros([channels], np.float32), name=f"{scope}/BatchNorm/beta")
        per_replica = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                           aggregation=tf.VariableAggregation.MEAN)
        self.moving_mean = tf.Variable(np.zeros([channels], np.float32),
                                       name=f"{scope}/BatchNorm/moving_mean", **per_replica)
        self.moving_variance = tf.Variable(np.ones([channels], np.float32),
                                           name=f"{scope}/BatchNorm/moving_variance",
                                           **per_replica)

    def _synced(self) -> bool:
        context = tf.distribute.get_replica_context()
        return self.sync and context is not None and context.num_replicas_in_sync > 1

    def _global_moments(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Mean and (biased) variance over the batch of every replica."""
        axes = list(range(len(x.shape) - 1))
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
        total, squares, count = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM,
            [tf.reduce_sum(x, axes), tf.reduce_sum(tf.square(x), axes), count])
        mean = total / count
        return mean, tf.maximum(squares / count - tf.square(mean), 0.0)

    def __call__(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        if training and self._synced():
            mean, variance = self._global_moments(x)
            self._update_moving(mean, variance)
            return tf.nn.batch_normalization(x, mean, variance, self.beta, self.gamma,
                                             self.epsilon)
        if len(x.shape) == 4:  # NHWC feature maps: TensorFlow's fused kernel, both ways
            if not training:
                return tf.compat.v1.nn.fused_batch_norm(
                    x, self.gamma, self.beta, self.moving_mean, self.moving_variance,
                    epsilon=self.epsilon, is_training=False)[0]
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, self.gamma, self.beta, epsilon=self.epsilon, is_training=True)
            # The kernel returns the Bessel-corrected variance; the moving average keeps
            # the batch variance that normalised the batch (as tf.nn.moments gives it).
            n = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
            self._update_moving(mean, variance * ((n - 1.0) / n))
            return y
        if training:
            mean, variance = tf.nn.moments(x, axes=list(range(len(x.shape) - 1)))
            self._update_moving(mean, variance)
        else:
            mean, variance = self.moving_mean, self.moving_variance
        return tf.nn.batch_normalization(x, mean, variance, self.beta, self.gamma, self.epsilon)

    def _update_moving(self, mean: tf.Tensor, variance: tf.Tensor) -> None:
        self.moving_mean.assign(self.momentum * self.moving_mean + (1 - self.momentum) * mean)
        self.moving_variance.assign(
            self.momentum * self.moving_variance + (1 - self.momentum) * variance)

    def folding_factors(self) -> tuple[tf.Tensor, tf.Tensor]:
        """``(scale, shift)`` such that ``BN(y) = y * scale + shift`` in inference mode."""
        scale = self.gamma * tf.math.rsqrt(self.moving_variance + self.epsilon)
        return scale, self.beta - self.moving_mean * scale


def weight_shape(kind: str, kernel: int, cin: int, cout: int,
                 conv_weights: bool = False, *, kernel_w: int = 0,
                 groups: int = 1) -> list[int]:
    if kind == "fc" and conv_weights:
        return [1, 1, cin, cout]
    kw = kernel_w or kernel
    return {"conv": [kernel, kw, cin // groups, cout], "dws": [kernel, kw, cin, 1],
            "fc": [cin, cout]}[kind]


def node_weight_shape(node: Node, cin: int, cout: int) -> list[int]:
    """The weight shape of a weight layer ``node`` reading ``cin`` channels."""
    return weight_shape(node.op, node.kernel, cin, cout, node.conv_weights,
                        kernel_w=node.kernel_w, groups=node.groups)


def linear_options(node: Node) -> dict:
    """The keyword arguments of :func:`apply_linear` beyond the defaults (groups follow
    from the weight shape)."""
    return {"dilation": node.dilation} if node.dilation != 1 else {}


def weight_name(kind: str) -> str:
    return "depthwise_weights" if kind == "dws" else "weights"


class ConvLayer(tf.Module):
    """A slim layer scope: ``weights`` plus either ``BatchNorm`` or ``biases``."""

    def __init__(self, scope: str, kind: str, kernel: int, cin: int, cout: int, stride: int,
                 batch_norm: bool, rng: tf.random.Generator, bn_epsilon: float = 1e-3,
                 padding: str = "SAME", conv_weights: bool = False, *, kernel_w: int = 0,
                 groups: int = 1, dilation: int = 1):
        super().__init__(name=None)
        self.scope, self.kind, self.kernel, self.stride = scope, kind, kernel, stride
        self.cin, self.cout, self.padding = cin, cout, padding
        self.options = {"dilation": dilation} if dilation != 1 else {}
        shape = weight_shape(kind, kernel, cin, cout, conv_weights, kernel_w=kernel_w,
                             groups=groups)
        taps = kernel * (kernel_w or kernel)
        if kind == "conv":
            init = _truncated_normal(rng, shape, math.sqrt(2.0 / (taps * cout)))
        elif kind == "dws":
            init = _truncated_normal(rng, shape, math.sqrt(2.0 / taps))
        else:
            limit = math.sqrt(1.0 / cin)  # independent of the class count
            init = rng.uniform(shape, -limit, limit)
        self.weights = tf.Variable(init, name=f"{scope}/{weight_name(kind)}")
        self.bn = BatchNorm(scope, cout, bn_epsilon) if batch_norm else None
        self.biases = (None if batch_norm else
                       tf.Variable(np.zeros([cout], np.float32), name=f"{scope}/biases"))

    def __call__(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        y = apply_linear(self.kind, x, self.weights, self.stride, self.padding, **self.options)
        if self.bn is not None:
            return self.bn(y, training)
        return y + self.biases


def apply_linear(kind: str, x: tf.Tensor, weights: tf.Tensor, stride: int = 1,
                 padding: str = "SAME", dilation: int = 1) -> tf.Tensor:
    """The linear part of a layer: conv, depthwise conv or matmul (of ``[N, cin]``
    features; 1x1-kernel-shaped FC weights are reshaped). A conv whose weights read fewer
    channels than ``x`` has is grouped; a 1x1 depthwise conv also scales ``[N, C]``
    features."""
    if kind == "conv":
        if dilation != 1:
            return tf.nn.conv2d(x, weights, strides=stride, padding=padding,
                                dilations=dilation)
        return tf.nn.conv2d(x, weights, strides=stride, padding=padding)
    if kind == "dws":
        if len(x.shape) == 2:  # per-channel affine map of features
            return x * tf.reshape(weights, [-1])
        if dilation != 1:
            return tf.nn.depthwise_conv2d(x, weights, strides=[1, 1, 1, 1], padding=padding,
                                          dilations=[dilation, dilation])
        return tf.nn.depthwise_conv2d(x, weights, strides=[1, stride, stride, 1], padding=padding)
    if len(weights.shape) == 4:
        weights = tf.reshape(weights, weights.shape[2:])
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
def _layer(node: Node, cin: int, cout: int, *, rng: tf.random.Generator, scope: str,
           bn_epsilon: float) -> ConvLayer:
    return ConvLayer(f"{scope}/{node.name}", node.op, node.kernel, cin, cout, node.stride,
                     node.batch_norm, rng, bn_epsilon, node.padding, node.conv_weights,
                     kernel_w=node.kernel_w, groups=node.groups, dilation=node.dilation)


def build_layers(net: Network, rng: tf.random.Generator) -> dict[str, ConvLayer]:
    """Every weight layer of ``net`` (keyed by scope), created in execution order."""
    shapes = net.layer_shapes(32)
    with arg_scope([_layer], rng=rng, scope=net.scope, bn_epsilon=net.bn_epsilon):
        return {node.name: _layer(node, shapes[node.name][1], shapes[node.name][3])
                for node in net.layers}


def stateless_dropout(rng: tf.random.Generator):
    """A ``dropout(x, rate, noise_shape)`` drawing its seeds from ``rng``."""
    def dropout(x, rate, noise_shape):
        return tf.nn.experimental.stateless_dropout(x, rate, seed=rng.make_seeds(1)[:, 0],
                                                    noise_shape=noise_shape)
    return dropout


class FloatNetwork(tf.Module):
    """The float network with batch norm; call it on NHWC images in ``[0, 1]``."""

    def __init__(self, net: Network, *, dropout_rate: float = 0.2,
                 drop_connect_rate: float = 0.2, seed: int = 0, bn_momentum: float = 0.99,
                 sync_bn: bool = False):
        super().__init__(name=net.scope)
        self.net = net
        self.dropout_rate, self.drop_connect_rate = dropout_rate, drop_connect_rate
        self.rng = tf.random.Generator.from_seed(seed)
        init_rng = tf.random.Generator.from_seed(seed + 1)
        self.layers = build_layers(net, init_rng)
        for layer in self.layers.values():
            if layer.bn is not None:
                layer.bn.momentum, layer.bn.sync = bn_momentum, sync_bn

    @property
    def arch(self) -> Network:
        return self.net

    def __call__(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.net.forward(
            images, lambda name, x, t: self.layers[name](x, t), training=training,
            dropout=stateless_dropout(self.rng), dropout_rate=self.dropout_rate,
            drop_connect_rate=self.drop_connect_rate)

    def slim_variables(self) -> dict[str, tf.Variable]:
        """All model variables by slim name (without ``:0``)."""
        prefix = self.net.scope + "/"
        return {v.name[:-2]: v for v in self.variables if v.name.startswith(prefix)}
