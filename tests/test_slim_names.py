"""Our slim-named ResNet-V1-50 has exactly the variables of tf-slim's own ``resnet_v1_50``.

The oracle is tf-slim 1.1.0's real network code: the installed ``tf_slim/nets/resnet_utils.py``
and ``tf_slim/nets/resnet_v1.py``, executed from their source. Their layer library cannot run
on TF >= 2.16 (``tf_slim.layers.conv2d`` needs ``tf_keras.legacy_tf_layers``), so while those two
files run, the modules they import from ``tf_slim.layers`` are replaced by small stand-ins
written here. The stand-ins follow slim's rules for naming and creating variables:

* ``conv2d`` opens ``variable_scope(scope, default_name="Conv")`` and creates
  ``<scope>/weights`` ``[k, k, c_in, c_out]``; with a ``normalizer_fn`` it calls the normalizer
  inside that scope and creates no biases, otherwise (and with a ``biases_initializer``) it
  creates ``<scope>/biases`` ``[c_out]``;
* ``batch_norm`` opens ``variable_scope(scope, default_name="BatchNorm")`` and creates
  ``beta`` (``center``), ``gamma`` (``scale``), ``moving_mean`` and ``moving_variance``, all
  ``[channels]``;
* pooling and softmax create nothing.

Instead of making TF variables they record ``(name, shape)``; tensors flow through real
``tf.nn`` ops in a throw-away graph, so every shape (and ``c_in`` of every layer) comes from TF
itself, and the scope names come from TF's own ``variable_scope`` (used by slim's code and by
the stand-ins alike). The real ``tf_slim.ops.arg_scope`` (which still works) decorates the
stand-ins, so ``resnet_arg_scope()`` supplies their defaults exactly as it does for slim's
layers (BN after every conv, ``scale=True``, ReLU). Everything patched into ``sys.modules`` is
put back afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types

import pytest
import tensorflow as tf

_MISSING = object()


@contextlib.contextmanager
def _patched_modules(modules: dict[str, types.ModuleType], attrs: list[tuple[object, str, object]]):
    """Put ``modules`` into ``sys.modules`` and set ``attrs``; restore exactly those afterwards."""
    saved_modules = {name: sys.modules.get(name, _MISSING) for name in modules}
    saved_attrs = [(obj, name, getattr(obj, name, _MISSING)) for obj, name, _ in attrs]
    try:
        sys.modules.update(modules)
        for obj, name, value in attrs:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, old in reversed(saved_attrs):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        for name, old in saved_modules.items():
            if old is _MISSING:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def _stand_in_layers(record) -> dict[str, types.ModuleType]:
    """Fresh stand-ins for the ``tf_slim.layers`` modules that resnet_utils / resnet_v1 import.

    ``record(name, shape)`` receives every variable slim would create.
    """
    from tf_slim.ops.arg_scope import add_arg_scope

    def variable(name: str, shape) -> None:
        scope = tf.compat.v1.get_variable_scope().name
        record(f"{scope}/{name}", tuple(int(d) for d in shape))

    def zeros_initializer():  # stands for slim's default biases_initializer (a truthy object)
        return "zeros_initializer"

    @add_arg_scope
    def batch_norm(inputs, decay=0.999, center=True, scale=False, epsilon=0.001,
                   activation_fn=None, param_initializers=None, param_regularizers=None,
                   updates_collections=tf.compat.v1.GraphKeys.UPDATE_OPS, is_training=True,
                   reuse=None, variables_collections=None, outputs_collections=None,
                   trainable=True, batch_weights=None, fused=None, data_format="NHWC",
                   zero_debias_moving_mean=False, scope=None, renorm=False,
                   renorm_clipping=None, renorm_decay=0.99, adjustment=None):
        # Options that would add variables beyond the four below are not modelled.
        assert not (zero_debias_moving_mean or renorm or batch_weights is not None)
        assert data_format == "NHWC"
        with tf.compat.v1.variable_scope(scope, "BatchNorm", [inputs], reuse=reuse) as sc:
            channels = (int(inputs.shape[-1]),)
            if center:
                variable("beta", channels)
            if scale:
                variable("gamma", channels)
            variable("moving_mean", channels)
            variable("moving_variance", channels)
            outputs = tf.nn.batch_normalization(inputs, 0.0, 1.0, None, None, epsilon)
            if activation_fn is not None:
                outputs = activation_fn(outputs)
            return collect_named_outputs(outputs_collections, sc.name, outputs)

    @add_arg_scope
    def conv2d(inputs, num_outputs, kernel_size, stride=1, padding="SAME", data_format=None,
               rate=1, activation_fn=tf.nn.relu, normalizer_fn=None, normalizer_params=None,
               weights_initializer=None, weights_regularizer=None,
               biases_initializer=zeros_initializer(), biases_regularizer=None, reuse=None,
               variables_collections=None, outputs_collections=None, trainable=True,
               scope=None):
        assert data_format in (None, "NHWC")
        with tf.compat.v1.variable_scope(scope, "Conv", [inputs], reuse=reuse) as sc:
            kernel = _pair(kernel_size) + (int(inputs.shape[-1]), int(num_outputs))
            variable("weights", kernel)
            outputs = tf.nn.conv2d(inputs, tf.zeros(kernel), strides=_pair(stride),
                                   padding=padding, dilations=_pair(rate))
            if not normalizer_fn and biases_initializer:
                variable("biases", (num_outputs,))
            if normalizer_fn is not None:
                outputs = normalizer_fn(outputs, **(normalizer_params or {}))
            if activation_fn is not None:
                outputs = activation_fn(outputs)
            return collect_named_outputs(outputs_collections, sc.name, outputs)

    @add_arg_scope
    def max_pool2d(inputs, kernel_size, stride=2, padding="VALID", data_format="NHWC",
                   outputs_collections=None, scope=None):
        assert data_format == "NHWC"
        with tf.name_scope(scope or "MaxPool2D") as sc:
            outputs = tf.nn.max_pool2d(inputs, _pair(kernel_size), _pair(stride), padding)
            return collect_named_outputs(outputs_collections, sc, outputs)

    @add_arg_scope
    def softmax(logits, scope=None):
        with tf.name_scope(scope or "softmax"):
            return tf.nn.softmax(logits)

    def last_dimension(shape, min_rank=1):
        shape = tf.TensorShape(shape)
        assert shape.rank is not None and shape.rank >= min_rank
        return int(shape[-1])

    def collect_named_outputs(collections, alias, outputs):
        if collections:
            tf.compat.v1.add_to_collections(collections, (alias, outputs))
        return outputs

    def convert_collection_to_dict(collection):
        return dict(tf.compat.v1.get_collection(collection))

    def variance_scaling_initializer(*args, **kwargs):
        return "variance_scaling_initializer"

    def l2_regularizer(scale, scope=None):
        return f"l2_regularizer({scale})"

    def module(name, **members):
        mod = types.ModuleType(name)
        mod.__dict__.update(members)
        return mod

    layer_fns = dict(conv2d=conv2d, convolution2d=conv2d, batch_norm=batch_norm,
                     max_pool2d=max_pool2d, softmax=softmax)
    utils = module("tf_slim.layers.utils", last_dimension=last_dimension,
                   collect_named_outputs=collect_named_outputs,
                   convert_collection_to_dict=convert_collection_to_dict)
    initializers = module("tf_slim.layers.initializers",
                          variance_scaling_initializer=variance_scaling_initializer)
    regularizers = module("tf_slim.layers.regularizers", l2_regularizer=l2_regularizer)
    layers = module("tf_slim.layers.layers", **layer_fns)
    package = module("tf_slim.layers", layers=layers, utils=utils, initializers=initializers,
                     regularizers=regularizers, **layer_fns,
                     variance_scaling_initializer=variance_scaling_initializer,
                     l2_regularizer=l2_regularizer)
    package.__path__ = []
    return {module.__name__: module for module in (package, layers, utils, initializers,
                                                   regularizers)}


def _load_source(name: str, path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # restored by _patched_modules
    spec.loader.exec_module(mod)
    return mod


def slim_resnet_v1_50_variables(num_classes: int | None = 1000,
                                img_size: int = 64) -> dict[str, tuple[int, ...]]:
    """{variable name (no ``:0``): shape} of tf-slim's ``resnet_v1_50`` under its
    ``resnet_arg_scope()``, built by slim's own source over the stand-in layers."""
    import tf_slim
    from tf_slim.ops.arg_scope import arg_scope

    nets_dir = os.path.join(os.path.dirname(importlib.util.find_spec("tf_slim").origin), "nets")
    variables: dict[str, tuple[int, ...]] = {}

    def record(name, shape):
        assert name not in variables, f"variable {name} created twice"
        variables[name] = shape

    stand_ins = _stand_in_layers(record)
    nets = types.ModuleType("tf_slim.nets")
    nets.__path__ = [nets_dir]
    modules = {**stand_ins, "tf_slim.nets": nets, "tf_slim.nets.resnet_utils": None,
               "tf_slim.nets.resnet_v1": None}
    attrs = [(tf_slim, "layers", stand_ins["tf_slim.layers"]), (tf_slim, "nets", nets)]
    with _patched_modules(modules, attrs):
        nets.resnet_utils = _load_source("tf_slim.nets.resnet_utils",
                                         os.path.join(nets_dir, "resnet_utils.py"))
        resnet_v1 = _load_source("tf_slim.nets.resnet_v1", os.path.join(nets_dir, "resnet_v1.py"))
        with tf.Graph().as_default():
            images = tf.zeros([1, img_size, img_size, 3])
            with arg_scope(resnet_v1.resnet_arg_scope()):
                logits, end_points = resnet_v1.resnet_v1_50(images, num_classes=num_classes,
                                                            is_training=False)
    if num_classes is not None:
        assert logits.shape.as_list() == [1, 1, 1, num_classes]
    assert "resnet_v1_50/block4" in end_points
    return variables


# --- the oracle against the paper's architecture (He et al. 2015, Table 1) ---------------

def _paper_resnet50(num_classes: int) -> dict[str, tuple[int, ...]]:
    """Hand-written from the paper: stem 7x7/64, stages of (3, 4, 6, 3) bottlenecks with
    widths 64..512 (x4 out), projection shortcut in the first unit of each stage, BN (with
    gamma) after every conv, biased 1x1 logits."""
    names: dict[str, tuple[int, ...]] = {}

    def conv_bn(scope, k, cin, cout):
        names[f"{scope}/weights"] = (k, k, cin, cout)
        for p in ("beta", "gamma", "moving_mean", "moving_variance"):
            names[f"{scope}/BatchNorm/{p}"] = (cout,)

    conv_bn("resnet_v1_50/conv1", 7, 3, 64)
    cin = 64
    for b, (units, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for u in range(1, units + 1):
            unit = f"resnet_v1_50/block{b}/unit_{u}/bottleneck_v1"
            if u == 1:
                conv_bn(f"{unit}/shortcut", 1, cin, 4 * width)
            conv_bn(f"{unit}/conv1", 1, cin, width)
            conv_bn(f"{unit}/conv2", 3, width, width)
            conv_bn(f"{unit}/conv3", 1, width, 4 * width)
            cin = 4 * width
    names["resnet_v1_50/logits/weights"] = (1, 1, 2048, num_classes)
    names["resnet_v1_50/logits/biases"] = (num_classes,)
    return names


@pytest.fixture(scope="module")
def slim_1000():
    return slim_resnet_v1_50_variables(1000)


def test_oracle_is_sane(slim_1000):
    v = slim_1000
    assert len(v) == 53 * 5 + 2 == 267  # 53 convs x (weights + 4 BN) + logits w, b
    assert v["resnet_v1_50/conv1/weights"] == (7, 7, 3, 64)
    assert v["resnet_v1_50/conv1/BatchNorm/gamma"] == (64,)
    assert v["resnet_v1_50/block1/unit_1/bottleneck_v1/shortcut/weights"] == (1, 1, 64, 256)
    assert v["resnet_v1_50/block1/unit_1/bottleneck_v1/shortcut/BatchNorm/gamma"] == (256,)
    assert v["resnet_v1_50/block2/unit_1/bottleneck_v1/conv1/weights"] == (1, 1, 256, 128)
    assert v["resnet_v1_50/block3/unit_6/bottleneck_v1/conv2/weights"] == (3, 3, 256, 256)
    assert v["resnet_v1_50/block4/unit_3/bottleneck_v1/conv3/BatchNorm/moving_variance"] == (2048,)
    assert v["resnet_v1_50/logits/weights"] == (1, 1, 2048, 1000)
    assert v["resnet_v1_50/logits/biases"] == (1000,)
    assert "resnet_v1_50/conv1/biases" not in v  # BN convs have no biases
    assert "resnet_v1_50/block1/unit_2/bottleneck_v1/shortcut/weights" not in v  # identity
    assert v == _paper_resnet50(1000)


def test_oracle_leaves_no_trace():
    before = {name: sys.modules.get(name) for name in
              ("tf_slim.layers", "tf_slim.layers.layers", "tf_slim.layers.utils", "tf_slim.nets",
               "tf_slim.nets.resnet_utils", "tf_slim.nets.resnet_v1")}
    import tf_slim

    layers_attr = getattr(tf_slim, "layers", None)
    ten = slim_resnet_v1_50_variables(10)
    assert ten["resnet_v1_50/logits/weights"] == (1, 1, 2048, 10)
    assert ten["resnet_v1_50/logits/biases"] == (10,)
    assert {name: sys.modules.get(name) for name in before} == before
    assert getattr(tf_slim, "layers", None) is layers_attr


def _ours(num_classes: int) -> dict[str, tuple[int, ...]]:
    from adj_quant import nets
    from adj_quant.network import FloatNetwork

    net = nets.build("resnet_v1_50", num_classes=num_classes)
    return {name: tuple(v.shape) for name, v in FloatNetwork(net).slim_variables().items()}


def _diff(ours: dict, slim: dict) -> str:
    lines = [f"only ours: {n} {ours[n]}" for n in sorted(ours.keys() - slim.keys())]
    lines += [f"only slim: {n} {slim[n]}" for n in sorted(slim.keys() - ours.keys())]
    lines += [f"shape: {n} ours {ours[n]} slim {slim[n]}"
              for n in sorted(ours.keys() & slim.keys()) if ours[n] != slim[n]]
    return "\n".join(lines[:40])


def test_resnet_v1_50_matches_slim(slim_1000):
    ours = _ours(1000)
    assert ours == slim_1000, _diff(ours, slim_1000)


def test_resnet_v1_50_matches_slim_10_classes():
    ours = _ours(10)
    slim = slim_resnet_v1_50_variables(10)
    assert ours == slim, _diff(ours, slim)
