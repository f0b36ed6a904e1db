"""adj_quant.graph_options: inside ``lean_grappler()`` grappler runs one round without its
function optimizer, inside ``training_grappler()`` only constant folding and remapping of
that round, both with the same results as TensorFlow's defaults on a training step."""

import threading

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context

from adj_quant import graph_options, nets
from adj_quant.network import FloatNetwork
from adj_quant.qnetwork import QuantConfig, QuantizedNetwork

ONE = rewriter_config_pb2.RewriterConfig.ONE
OFF = rewriter_config_pb2.RewriterConfig.OFF


def _rewrite_options():
    """The grappler options that a function called now on this thread is optimized with."""
    config = config_pb2.ConfigProto()
    config.ParseFromString(context.context().function_call_options.config_proto_serialized)
    return config.graph_options.rewrite_options


def _rounds() -> int:
    return _rewrite_options().meta_optimizer_iterations


def test_lean_grappler_applies_inside_the_block_only_and_is_restored_after_an_error():
    before = context.context().function_call_options.config_proto_serialized
    assert _rounds() != ONE  # TensorFlow's default (two rounds)
    assert _rewrite_options().function_optimization != OFF
    with graph_options.lean_grappler():
        assert _rounds() == ONE
        assert _rewrite_options().function_optimization == OFF
        with graph_options.lean_grappler():  # nesting keeps it
            assert _rounds() == ONE
        assert _rounds() == ONE
    assert context.context().function_call_options.config_proto_serialized == before
    with pytest.raises(RuntimeError):
        with graph_options.lean_grappler():
            raise RuntimeError("boom")
    assert context.context().function_call_options.config_proto_serialized == before


def test_training_grappler_keeps_constant_folding_and_remapping_only():
    defaults = rewriter_config_pb2.RewriterConfig()
    with graph_options.lean_grappler():
        assert _rewrite_options().arithmetic_optimization != OFF
        with graph_options.training_grappler():
            options = _rewrite_options()
            assert options.meta_optimizer_iterations == ONE
            assert options.function_optimization == OFF
            assert options.constant_folding == defaults.constant_folding != OFF
            assert options.remapping == defaults.remapping != OFF
            for name in ("arithmetic_optimization", "layout_optimizer",
                         "dependency_optimization", "common_subgraph_elimination",
                         "loop_optimization", "shape_optimization"):
                assert getattr(options, name) == OFF, name
            assert options.disable_model_pruning
            assert options.memory_optimization == rewriter_config_pb2.RewriterConfig.NO_MEM_OPT
        assert _rewrite_options().arithmetic_optimization != OFF  # the lean setting again
        assert _rounds() == ONE


def test_lean_grappler_keeps_the_rest_of_the_config_and_other_threads():
    ctx = context.context()
    previous = ctx.function_call_options
    config = config_pb2.ConfigProto()
    config.ParseFromString(previous.config_proto_serialized)
    config.graph_options.rewrite_options.debug_stripper = OFF  # a setting of the caller's
    ctx.function_call_options = context.FunctionCallOptions(config_proto=config)
    try:
        with graph_options.lean_grappler():
            assert _rewrite_options().debug_stripper == OFF
            assert _rounds() == ONE
            seen = []
            thread = threading.Thread(target=lambda: seen.append(_rounds()))
            thread.start()
            thread.join()
            assert seen and seen[0] != ONE  # per thread: another thread keeps the default
        assert _rewrite_options().debug_stripper == OFF
        assert _rounds() != ONE
    finally:
        ctx.function_call_options = previous


#: EfficientNet-B0 at a quarter of its width and depth: every kind of layer, traced fast.
SMALL_B0 = nets.build("efficientnet_b0", num_classes=10, width_multiplier=0.25,
                      depth_multiplier=0.25)


def _teacher():
    """A float B0 in inference mode whose batch norms are not the identity (trained-like
    moving statistics and betas): remapping fuses such layers into other kernels."""
    teacher = FloatNetwork(SMALL_B0, seed=1)
    rng = np.random.default_rng(1)
    for layer in teacher.layers.values():
        if layer.bn is not None:
            layer.bn.moving_mean.assign(rng.normal(0, 0.3, layer.cout))
            layer.bn.moving_variance.assign(rng.uniform(0.5, 2.0, layer.cout))
            layer.bn.beta.assign(rng.normal(0, 0.1, layer.cout))
    return teacher


@pytest.mark.parametrize("kind", ["float", "quantized"])
def test_a_training_step_gives_the_same_bits_with_a_leaner_grappler(kind):
    """Loss and gradients of a step with a distillation term (the teacher in inference mode,
    as in the recipe's quantized stages), optimized with TensorFlow's default grappler (the
    oracle), the lean one and the training one: equal bit for bit."""
    # No dropout: the step must be deterministic (the float model trains batch norms).
    model = FloatNetwork(SMALL_B0, seed=0, dropout_rate=0.0, drop_connect_rate=0.0)
    images = tf.random.stateless_uniform([16, 32, 32, 3], seed=[0, 1])
    labels = tf.constant(np.arange(16) % 10, tf.int32)
    if kind == "quantized":
        model = QuantizedNetwork.from_float(
            model, QuantConfig(weight_bits=4, act_bits=4, swish_bits=0, bits_trainable=True))
        model.calibrate_activations([images], progress=False)
    teacher = _teacher()
    variables = list(model.trainable_variables)

    @tf.function(autograph=False)
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=labels, logits=logits))
            loss += tf.reduce_mean(tf.square(logits - teacher(images, training=False)))
        return [loss] + tape.gradient(loss, variables)

    def run():
        return [t.numpy() for t in step(images, labels)]

    default = run()
    with graph_options.lean_grappler():
        one = run()
    with graph_options.training_grappler():
        folded = run()
    again = run()
    assert len(one) == len(variables) + 1
    for a, b, c, d in zip(default, one, again, folded):
        np.testing.assert_array_equal(a, c)  # the step is deterministic here
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, d)
