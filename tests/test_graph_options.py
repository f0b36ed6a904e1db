"""adj_quant.graph_options: inside ``lean_grappler()`` grappler runs one round without its
function optimizer, with the same results as TensorFlow's defaults."""

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


def test_quantized_training_step_gives_the_same_bits_with_a_lean_grappler():
    """Oracle: the same step optimized with TensorFlow's default grappler."""
    float_model = FloatNetwork(nets.build("efficientnet_b0", num_classes=10), seed=0)
    qmodel = QuantizedNetwork.from_float(
        float_model, QuantConfig(weight_bits=4, act_bits=4, swish_bits=0, bits_trainable=True))
    images = tf.random.stateless_uniform([16, 32, 32, 3], seed=[0, 1])
    labels = tf.constant(np.arange(16) % 10, tf.int32)
    qmodel.calibrate_activations([images], progress=False)
    variables = list(qmodel.trainable_variables)

    @tf.function(autograph=False)
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = qmodel(images, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=labels, logits=logits))
        return [loss] + tape.gradient(loss, variables)

    def run():
        return [t.numpy() for t in step(images, labels)]

    default = run()
    with graph_options.lean_grappler():
        one = run()
    again = run()
    assert len(one) == len(variables) + 1
    for a, b, c in zip(default, one, again):
        np.testing.assert_array_equal(a, c)  # the step is deterministic here
        np.testing.assert_array_equal(a, b)
