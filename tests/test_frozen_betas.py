"""Batch-norm betas with a structurally zero gradient are found by the graph rule and
checked against autodiff: their gradient is round-off, every other beta's is not."""

import numpy as np
import pytest
import tensorflow as tf

from adj_quant import nets
from adj_quant.network import FloatNetwork, Network, Node
from adj_quant.training_rules import untrainable_betas

TOY = Network("toy", "toy", (
    Node("Conv", "conv", kernel=3, filters=8, stride=2), Node("Conv/relu", "act", fn="relu"),
    Node("a/project", "conv", filters=8),                       # -> add -> 1x1 BN: absorbed
    Node("a/add", "add", inputs=("a/project", "Conv/relu"), drop_path=(1, 2)),
    Node("b/expand", "conv", filters=8),                        # -> relu: trained
    Node("b/relu", "act", fn="relu"),
    Node("b/project", "conv", filters=8),                       # -> 3x3 conv: trained
    Node("c/conv3", "conv", kernel=3, filters=8, inputs=("b/project",)),
    Node("c/sum", "add", inputs=("c/conv3", "a/add")),
    Node("pool", "gap", keepdims=False), Node("Logits", "fc", filters=10, batch_norm=False)))


def test_the_rule_by_hand():
    # a/project reaches b/expand (1x1, BN) through the add, but the add also feeds c/sum,
    # which reaches the logits without a batch norm: nothing is absorbed.
    assert untrainable_betas(TOY) == []
    head = Network("toy2", "toy2", TOY.nodes[:5] + (Node("b/relu", "act", fn="relu"),
                                                   Node("pool", "gap", keepdims=False),
                                                   Node("Logits", "fc", filters=10,
                                                        batch_norm=False)))
    assert untrainable_betas(head) == ["a/project"]
    # Drop-connect on the add's first input scales the constant per image: not absorbed.
    assert untrainable_betas(head, drop_connect_rate=0.2) == []


def _beta_gradients(model, images, labels):
    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    betas = {s: layer.bn.beta for s, layer in model.layers.items() if layer.bn is not None}
    grads = tape.gradient(loss, list(betas.values()))
    return {s: float(tf.reduce_max(tf.abs(g))) for s, g in zip(betas, grads)}


@pytest.mark.parametrize("drop_connect", [0.0, 0.2])
def test_the_rule_finds_the_betas_autodiff_gives_no_gradient(drop_connect):
    net = nets.build("efficientnet_b0", num_classes=10, width_multiplier=0.25,
                     depth_multiplier=0.25)
    model = FloatNetwork(net, dropout_rate=0.0, drop_connect_rate=drop_connect, seed=3)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 1, (8, 32, 32, 3)).astype(np.float32))
    labels = tf.constant(rng.integers(0, 10, 8))
    grads = _beta_gradients(model, images, labels)
    frozen = set(untrainable_betas(net, drop_connect_rate=drop_connect))
    assert frozen  # the project convolutions
    scale = np.median([g for s, g in grads.items() if s not in frozen])
    for scope, g in grads.items():
        if scope in frozen:
            assert g < 1e-4 * scale, (scope, g, scale)   # round-off
        else:
            assert g > 1e-3 * scale, (scope, g, scale)   # a real gradient
