"""The float EfficientNet-B0 against keras.applications, and BN folding."""

import numpy as np
import pytest
import tensorflow as tf

from adj_quant import nets
from adj_quant import network as nw
from slim_nets import efficientnet_b0 as eb0


def _b0(num_classes=10, seed=0, **params):
    return nw.FloatNetwork(nets.build("efficientnet_b0", num_classes=num_classes, **params),
                           seed=seed)


def _keras_b0(num_classes, img_size):
    import keras

    return keras.applications.EfficientNetB0(
        weights=None, classes=num_classes, input_shape=(img_size, img_size, 3),
        classifier_activation=None)


def _copy_keras_weights(keras_model, model):
    """Copy Keras weights into our slim-named model; returns the number of copied arrays."""
    names = {}
    block_names = []
    for stage, repeats in enumerate((1, 2, 2, 3, 3, 4, 1)):
        block_names += [f"block{stage + 1}{chr(97 + j)}_" for j in range(repeats)]
    names["Conv"] = ("stem_conv", "stem_bn")
    for i, cfg in enumerate(eb0.blocks()):
        k = block_names[i]
        if cfg.has_expand:
            names[f"{cfg.scope}/expand"] = (f"{k}expand_conv", f"{k}expand_bn")
        names[f"{cfg.scope}/dws"] = (f"{k}dwconv", f"{k}bn")
        names[f"{cfg.scope}/se_1"] = (f"{k}se_reduce", None)
        names[f"{cfg.scope}/se_2"] = (f"{k}se_expand", None)
        names[f"{cfg.scope}/project"] = (f"{k}project_conv", f"{k}project_bn")
    names["Conv_1"] = ("top_conv", "top_bn")
    names["Logits"] = ("predictions", None)
    copied = 0
    for scope, (conv_name, bn_name) in names.items():
        layer = model.layers[scope]
        conv_weights = keras_model.get_layer(conv_name).get_weights()
        layer.weights.assign(conv_weights[0])
        copied += 1
        if layer.biases is not None:
            layer.biases.assign(conv_weights[1])
            copied += 1
        if bn_name:
            gamma, beta, mean, var = keras_model.get_layer(bn_name).get_weights()
            for var_, value in zip((layer.bn.gamma, layer.bn.beta, layer.bn.moving_mean,
                                    layer.bn.moving_variance), (gamma, beta, mean, var)):
                var_.assign(value)
                copied += 1
    return copied


@pytest.fixture(scope="module")
def keras_and_ours():
    img_size, classes = 64, 1000
    keras_model = _keras_b0(classes, img_size)
    rng = np.random.default_rng(0)
    for layer in keras_model.layers:
        if layer.__class__.__name__ == "Normalization":
            layer.set_weights([np.array(eb0.IMAGENET_MEAN, np.float32),
                               np.array(eb0.IMAGENET_STD, np.float32) ** 2, np.array(0)])
            layer.finalize_state()  # Keras 3 reads mean/variance from the adapt state
        if layer.__class__.__name__ == "BatchNormalization":
            layer.momentum = 0.0
            g, b, _, _ = layer.get_weights()
            layer.gamma.assign(rng.uniform(0.8, 1.2, g.shape))
            layer.beta.assign(rng.normal(0, 0.1, b.shape))
    # Data-dependent moving statistics, so that the signal survives all 16 blocks.
    calib = rng.uniform(0, 255, (8, img_size, img_size, 3)).astype(np.float32)
    keras_model(calib, training=True)
    logits = keras_model.get_layer("predictions")
    kernel, _ = logits.get_weights()
    logits.set_weights([kernel, rng.normal(0, 0.01, classes).astype(np.float32)])
    model = _b0(classes)
    _copy_keras_weights(keras_model, model)
    return keras_model, model


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_logits_match_keras_applications(keras_and_ours):
    import keras

    keras_model, model = keras_and_ours
    images = np.random.default_rng(1).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    probes = keras.Model(keras_model.input, [keras_model.get_layer(n).output for n in
                                             ("stem_activation", "top_activation", "predictions")])
    stem, head, logits = probes(images * 255.0, training=False)
    seen = {}

    def activation(scope, fn, x):
        seen[scope] = nw.ACTIVATIONS[fn](x)
        return seen[scope]

    got = model.net.forward(tf.constant(images), lambda name, x, t: model.layers[name](x, t),
                            activation=activation)
    np.testing.assert_allclose(model(tf.constant(images)).numpy(), got.numpy(), rtol=1e-6)
    assert _rel(seen["Conv"], stem) <= 1e-5
    assert _rel(seen["Conv_1"], head) <= 1e-4
    assert _rel(got, logits) <= 1e-4
    # The comparison is meaningful: the features really depend on the input image.
    _, other_head, _ = probes(images[::-1] * 255.0, training=False)
    assert _rel(other_head, head) > 1e-2


def test_trainable_parameter_count_equals_keras(keras_and_ours):
    keras_model, model = keras_and_ours
    ours = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    theirs = sum(int(np.prod(w.shape)) for w in keras_model.trainable_weights)
    assert ours == theirs == 5_288_548


def test_slim_variable_names():
    model = _b0()
    names = set(model.slim_variables())
    for expected in [
        "efficientnet_b0/Conv/weights",
        "efficientnet_b0/Conv/BatchNorm/gamma",
        "efficientnet_b0/Conv/BatchNorm/moving_variance",
        "efficientnet_b0/expanded_conv/dws/depthwise_weights",
        "efficientnet_b0/expanded_conv_3/expand/weights",
        "efficientnet_b0/expanded_conv_3/se_1/biases",
        "efficientnet_b0/expanded_conv_15/project/BatchNorm/beta",
        "efficientnet_b0/Conv_1/weights",
        "efficientnet_b0/Logits/weights",
        "efficientnet_b0/Logits/biases",
    ]:
        assert expected in names
    assert "efficientnet_b0/expanded_conv/expand/weights" not in names  # block 0 has no expand
    assert not any("expanded_conv_16" in n for n in names)


def test_se_reduce_width_uses_block_input_filters():
    blocks = eb0.blocks()
    assert [b.se_filters for b in blocks[:3]] == [8, 4, 6]  # 32*0.25, 16*0.25, 24*0.25
    assert blocks[1].expanded == 96


@pytest.mark.parametrize("scope", ["Conv", "expanded_conv_1/dws", "expanded_conv_5/project"])
def test_fold_batch_norm_equals_conv_plus_bn(scope):
    model = _b0()
    layer = model.layers[scope]
    rng = np.random.default_rng(2)
    c = layer.cout
    layer.bn.gamma.assign(rng.uniform(0.5, 1.5, c))
    layer.bn.beta.assign(rng.normal(0, 0.5, c))
    layer.bn.moving_mean.assign(rng.normal(0, 0.5, c))
    layer.bn.moving_variance.assign(rng.uniform(0.1, 3.0, c))
    x = tf.constant(rng.normal(0, 1, (2, 9, 9, layer.cin)).astype(np.float32))
    expected = layer(x, training=False)
    w, b = nw.fold_batch_norm(layer)
    got = nw.apply_linear(layer.kind, x, w, layer.stride) + b
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_width_and_depth_multipliers_change_shapes():
    blocks = eb0.blocks(width_multiplier=0.5, depth_multiplier=0.5)
    assert len(blocks) == 1 + 1 + 1 + 2 + 2 + 2 + 1
    model = _b0(width_multiplier=0.5, depth_multiplier=0.5)
    assert model.layers["Conv"].cout == 16 and model.layers["Conv_1"].cout == 640
    out = model(tf.zeros([1, 32, 32, 3]), training=False)
    assert out.shape == (1, 10)


def test_training_mode_is_stochastic_but_seeded():
    model = _b0(seed=3)
    x = tf.random.stateless_uniform([4, 32, 32, 3], seed=[1, 2])
    a = model(x, training=True)
    b = model(x, training=True)
    assert not np.allclose(a.numpy(), b.numpy())  # dropout differs between steps
    fresh = _b0(seed=3)
    np.testing.assert_allclose(fresh(x, training=True).numpy(), a.numpy(), rtol=1e-5)
