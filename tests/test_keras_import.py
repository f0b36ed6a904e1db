"""adj_quant.keras_import against its oracle: the Keras model itself.

Each keras.applications model gets random BN scales and data-dependent moving statistics
(so that batch norm is far from the identity and the signal survives the depth), is
imported, loaded into a FloatNetwork, and must give Keras' logits on the same images.
"""

import json

import numpy as np
import pytest
import tensorflow as tf

from adj_quant import nets
from adj_quant.errors import UserError
from adj_quant.keras_import import from_keras, load_weights
from adj_quant.network import FloatNetwork

keras = pytest.importorskip("keras")

IMG = 64
CLASSES = 7
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _randomize_and_calibrate(model, lo, hi, seed=0):
    """Random BN gamma/beta, moving statistics of one real-ish batch, random logits bias."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0  # the moving statistics become this batch's
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.8, 1.2, layer.gamma.shape))
            if layer.beta is not None:
                layer.beta.assign(rng.normal(0, 0.1, layer.beta.shape))
        if isinstance(layer, keras.layers.Dense) and layer.use_bias:
            layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape))
    # the compared images come from the same distribution, so that the activations stay
    # normalised through the whole depth
    calib = rng.uniform(0, 1, (8, IMG, IMG, 3)).astype(np.float32)
    model(lo + (hi - lo) * calib, training=True)


def _imported(model, lo, hi, **options):
    net, weights = from_keras(model, input_range=(lo, hi), **options)
    float_model = FloatNetwork(net)
    load_weights(float_model, weights)
    return net, weights, float_model


def _compare(model, float_model, lo, hi, seed=1):
    images = np.random.default_rng(seed).uniform(0, 1, (3, IMG, IMG, 3)).astype(np.float32)
    ours = float_model(tf.constant(images)).numpy()
    theirs = model(lo + (hi - lo) * images, training=False).numpy()
    scale = float(np.abs(theirs).max())
    assert scale > 1e-2  # the logits are not vanishing ...
    assert np.abs(theirs - theirs.mean(axis=0)).max() > 1e-3 * scale  # ... and see the image
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale)
    diff = float(np.abs(ours - theirs).max())
    print(f"{model.name}: max |logit| {scale:.3g}, max abs difference {diff:.3g} "
          f"({diff / scale:.2g} of the max)")  # shown with pytest -s


def _count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


# ----------------------------------------------------------------------- MobileNetV2


@pytest.fixture(scope="module")
def mobilenet_v2():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        alpha=1.4, weights=None, input_shape=(IMG, IMG, 3), classes=CLASSES,
        classifier_activation=None)
    _randomize_and_calibrate(model, -1.0, 1.0)
    return model, *_imported(model, -1.0, 1.0, name="mobilenet_v2_keras")


def test_mobilenet_v2_logits_match_keras(mobilenet_v2):
    model, net, _, float_model = mobilenet_v2
    _compare(model, float_model, -1.0, 1.0)
    assert net.scope == "mobilenet_v2_keras" and net.num_classes == CLASSES
    np.testing.assert_allclose(net.input_mean, [0.5] * 3)
    np.testing.assert_allclose(net.input_std, [0.5] * 3)
    assert net.bn_epsilon == pytest.approx(1e-3)
    assert {n.fn for n in net.nodes if n.op == "act"} == {"relu6"}


def test_mobilenet_v2_parameter_count_equals_keras(mobilenet_v2):
    model, _, weights, float_model = mobilenet_v2
    assert _count(float_model.trainable_variables) == _count(model.trainable_weights)
    assert _count(float_model.variables) == _count(model.weights)
    assert set(weights) == set(float_model.slim_variables())


def test_mobilenet_v2_slim_names(mobilenet_v2):
    _, net, weights, _ = mobilenet_v2
    for name in ("mobilenet_v2_keras/Conv1/weights",
                 "mobilenet_v2_keras/Conv1/BatchNorm/moving_variance",
                 "mobilenet_v2_keras/expanded_conv_depthwise/depthwise_weights",
                 "mobilenet_v2_keras/predictions/weights",
                 "mobilenet_v2_keras/predictions/biases"):
        assert name in weights
    assert net.nodes[-1].name == "predictions" and net.nodes[-1].op == "fc"
    adds = [n for n in net.nodes if n.op == "add"]
    assert len(adds) == 10 and all(n.drop_path is None for n in adds)


def test_imported_mobilenet_v2_quantizes_and_runs(mobilenet_v2):
    from adj_quant import api

    _, net, _, float_model = mobilenet_v2
    qnet = api.quantize(float_model)
    images = tf.random.stateless_uniform([2, IMG, IMG, 3], seed=[3, 4])
    api.calibrate(qnet, images)
    out = qnet(images, training=False).numpy()
    assert out.shape == (2, CLASSES) and np.isfinite(out).all()


# ----------------------------------------------------------------------- EfficientNetB0


@pytest.fixture(scope="module")
def efficientnet_b0():
    keras.utils.set_random_seed(1)
    model = keras.applications.EfficientNetB0(
        weights=None, input_shape=(IMG, IMG, 3), classes=CLASSES, classifier_activation=None)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization):
            layer.set_weights([np.array(IMAGENET_MEAN, np.float32),
                               np.array(IMAGENET_STD, np.float32) ** 2, np.array(0)])
            layer.finalize_state()  # Keras 3 reads mean/variance from the adapt state
    _randomize_and_calibrate(model, 0.0, 255.0, seed=2)
    return model, *_imported(model, 0.0, 255.0, name="efficientnet_b0_keras")


def test_efficientnet_b0_logits_match_keras(efficientnet_b0):
    model, net, _, float_model = efficientnet_b0
    _compare(model, float_model, 0.0, 255.0)
    # Rescaling(1/255) and Normalization fold into the ImageNet statistics
    np.testing.assert_allclose(net.input_mean, IMAGENET_MEAN, rtol=1e-6)
    np.testing.assert_allclose(net.input_std, IMAGENET_STD, rtol=1e-6)
    assert net.nodes[0].op == "pad" and net.is_stem(net.node("stem_conv"))


def test_efficientnet_b0_structure(efficientnet_b0):
    model, net, _, float_model = efficientnet_b0
    assert _count(float_model.trainable_variables) == _count(model.trainable_weights)
    # squeeze-excitation: the pool keeps its dims (the Reshape is gone), features first
    assert net.node("block2a_se_squeeze").keepdims
    scale = net.node("block2a_se_excite")
    assert scale.op == "mul" and scale.inputs == ("block2a_activation", "block2a_se_expand/sigmoid")
    assert net.node("block2a_se_reduce/swish").fn == "swish"
    # drop-connect: Keras' rate 0.2 * b / 16, kept relative to the default 0.2
    assert net.node("block2b_add").drop_path == (1, 8)       # b = 2
    assert net.node("block6d_add").drop_path == (7, 8)       # b = 14
    assert net.node("block2b_add").inputs == ("block2b_project_conv", "block2a_project_conv")
    assert [n.op for n in net.nodes[-3:]] == ["gap", "dropout", "fc"]
    assert not net.node("avg_pool").keepdims


def test_efficientnet_b0_takes_numpy_batches_of_any_float_dtype(efficientnet_b0):
    """The README feeds NumPy batches: float32 and float64 give the tf.constant logits."""
    from adj_quant import api

    _, _, _, float_model = efficientnet_b0
    images = np.random.default_rng(8).uniform(0, 1, (2, IMG, IMG, 3)).astype(np.float32)
    expected = float_model(tf.constant(images)).numpy()
    np.testing.assert_array_equal(float_model(images).numpy(), expected)
    np.testing.assert_allclose(float_model(images.astype(np.float64)).numpy(), expected,
                               rtol=1e-6, atol=1e-6)
    qnet = api.quantize(float_model)
    api.calibrate(qnet, images.astype(np.float64))
    quantized = qnet(tf.constant(images)).numpy()
    np.testing.assert_array_equal(qnet(images.astype(np.float64)).numpy(), quantized)
    with pytest.raises(UserError, match="dtype uint8"):
        float_model((images * 255).astype(np.uint8))


def test_imported_network_json_round_trip(efficientnet_b0):
    _, net, _, _ = efficientnet_b0
    data = json.loads(json.dumps(nets.to_json(net)))
    assert data["name"] == "efficientnet_b0_keras" and "nodes" in data
    assert nets.from_json(data) == net


def test_nets_from_keras_delegates(efficientnet_b0):
    model, net, weights, _ = efficientnet_b0
    net2, weights2 = nets.from_keras(model, name="efficientnet_b0_keras",
                                     input_range=(0, 255))
    assert net2 == net and set(weights2) == set(weights)


# ----------------------------------------------------------------------- ResNet50


@pytest.fixture(scope="module")
def resnet50():
    keras.utils.set_random_seed(2)
    model = keras.applications.ResNet50(
        weights=None, input_shape=(IMG, IMG, 3), classes=CLASSES, classifier_activation=None)
    # caffe preprocessing lives outside the model; any affine input range will do
    _randomize_and_calibrate(model, -120.0, 135.0, seed=3)
    return model, *_imported(model, -120.0, 135.0, name="resnet50", scope="resnet_v1_50")


def test_resnet50_logits_match_keras(resnet50):
    model, net, _, float_model = resnet50
    _compare(model, float_model, -120.0, 135.0)
    assert net.bn_epsilon == pytest.approx(1.001e-5)
    assert [n.op for n in net.nodes[:5]] == ["pad", "conv", "act", "pad", "maxpool"]


def test_resnet50_parameter_count_without_folded_biases(resnet50):
    model, _, weights, float_model = resnet50
    folded = sum(int(np.prod(layer.bias.shape)) for layer in model.layers
                 if isinstance(layer, keras.layers.Conv2D) and layer.use_bias)
    ours = _count(float_model.trainable_variables)
    assert ours == _count(model.trainable_weights) - folded
    assert all(k.startswith("resnet_v1_50/") for k in weights)


# ----------------------------------------------------------------------- small hand-made models


def _small_model():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="scale")(inputs)
    x = keras.layers.Rescaling([1.0, 0.5, 2.0], name="per_channel")(x)
    x = keras.layers.ZeroPadding2D(((1, 1), (1, 1)), name="pad")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="valid", name="stem")(x)
    x = keras.layers.BatchNormalization(center=False, epsilon=1e-3, name="stem_bn")(x)
    x = keras.layers.Activation("hard_swish", name="stem_act")(x)
    x = keras.layers.MaxPooling2D(3, strides=1, padding="same", name="pool")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", activation="hard_silu", name="dw")(x)
    y = keras.layers.Conv2D(8, 1, use_bias=False, name="pw")(y)
    y = keras.layers.BatchNormalization(scale=False, name="pw_bn")(y)
    gate = keras.layers.GlobalAveragePooling2D(keepdims=True, name="se_pool")(y)
    gate = keras.layers.Conv2D(4, 1, activation="relu", name="se_1")(gate)
    gate = keras.layers.Conv2D(8, 1, activation="sigmoid", name="se_2")(gate)
    y = keras.layers.Multiply(name="se")([gate, y])  # gate first: reordered
    y = keras.layers.Dropout(0.1, noise_shape=(None, 1, 1, 1), name="drop_connect")(y)
    x = keras.layers.Add(name="residual")([x, y])  # dropped operand second: reordered
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(0.3, name="dropout")(x)
    x = keras.layers.Dense(5, name="logits")(x)
    outputs = keras.layers.Activation("softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="small")


def test_small_model_round_trips():
    keras.utils.set_random_seed(3)
    model = _small_model()
    rng = np.random.default_rng(4)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, c))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))
            if layer.beta is not None:
                layer.beta.assign(rng.normal(0, 0.5, c))
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.5, 1.5, c))
        elif getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0, 0.5, layer.bias.shape))
    net, weights = from_keras(model, input_range=(0, 1))
    assert net.name == net.scope == "keras_model"
    by_name = {n.name: n for n in net.nodes}
    assert by_name["pad"].pads == (1, 1, 1, 1)
    assert by_name["stem"].padding == "VALID" and by_name["stem"].batch_norm
    assert by_name["stem_act"].fn == "hard_swish" and by_name["dw/hard_swish"].fn == "hard_swish"
    assert by_name["pool"].op == "maxpool" and by_name["pool"].kernel == 3
    assert by_name["se"].inputs == ("pw", "se_2/sigmoid")
    assert by_name["residual"].inputs == ("se", "pool") and by_name["residual"].drop_path == (1, 2)
    assert by_name["dropout"].op == "dropout" and net.nodes[-1].name == "logits"
    assert "probs" not in by_name and "drop_connect" not in by_name
    # conv bias before BN folds into the mean; center=False -> beta 0, scale=False -> gamma 1
    stem, stem_bn = model.get_layer("stem"), model.get_layer("stem_bn")
    np.testing.assert_allclose(weights["keras_model/stem/BatchNorm/moving_mean"],
                               stem_bn.moving_mean.numpy() - stem.bias.numpy())
    assert not weights["keras_model/stem/BatchNorm/beta"].any()
    np.testing.assert_array_equal(weights["keras_model/pw/BatchNorm/gamma"], 1.0)
    # the Keras image is 2 x - 1, then scaled per channel
    np.testing.assert_allclose(net.input_mean, [0.5] * 3)
    np.testing.assert_allclose(net.input_std, [0.5, 1.0, 0.25])

    float_model = FloatNetwork(net)
    load_weights(float_model, weights)
    images = rng.uniform(0, 1, (4, 16, 16, 3)).astype(np.float32)
    logits = keras.Model(model.input, model.get_layer("logits").output)(images).numpy()
    ours = float_model(tf.constant(images)).numpy()
    np.testing.assert_allclose(ours, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    np.testing.assert_allclose(tf.nn.softmax(ours).numpy(), model(images).numpy(), atol=1e-6)
    assert nets.from_json(json.loads(json.dumps(nets.to_json(net)))) == net
    float_model(tf.constant(images), training=True)  # drop-connect and dropout run


def test_dense_softmax_is_dropped_and_reshape_se():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="swish", name="image")(inputs)  # a reserved name
    se = keras.layers.GlobalAveragePooling2D(name="squeeze")(x)
    se = keras.layers.Reshape((1, 1, 4), name="reshape")(se)
    se = keras.layers.Conv2D(4, 1, activation="sigmoid", name="excite")(se)
    x = keras.layers.Multiply(name="scale")([x, se])
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(6, name="hidden")(x)
    x = keras.layers.BatchNormalization(name="hidden_bn")(x)  # folds into an fc
    x = keras.layers.ReLU(name="hidden_relu")(x)
    x = keras.layers.Dense(3, activation="softmax", name="out")(x)
    model = keras.Model(inputs, x)
    bn = model.get_layer("hidden_bn")
    bn.moving_mean.assign(np.linspace(-1, 1, 6))
    bn.moving_variance.assign(np.linspace(0.5, 2, 6))
    with pytest.raises(UserError, match="scope 'my/scope'"):
        from_keras(model, scope="my/scope")
    assert from_keras(model, name="tiny-2")[0].scope == "tiny_2"
    net, weights = from_keras(model, name="tiny", scope="my_scope")
    assert net.nodes[0].name == "image_1"  # "image" is the network input
    assert net.node("squeeze").keepdims and "reshape" not in {n.name for n in net.nodes}
    assert net.node("scale").inputs == ("image_1/swish", "excite/sigmoid")
    assert net.nodes[-1].op == "fc" and "my_scope/out/biases" in weights
    assert net.node("hidden").op == "fc" and net.node("hidden").batch_norm
    float_model = FloatNetwork(net)
    load_weights(float_model, weights)
    images = np.random.default_rng(5).uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(tf.nn.softmax(float_model(tf.constant(images))).numpy(),
                               model(images).numpy(), atol=1e-6)


def _wide_model():
    """One of each operation the keras.applications families brought."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, (1, 3), padding="same", name="row")(inputs)
    x = keras.layers.BatchNormalization(name="row_bn")(x)
    pre = keras.layers.BatchNormalization(name="pre_bn")(x)  # reads a BN: an affine layer
    x = keras.layers.Activation("gelu", name="gelu")(pre)
    a = keras.layers.Conv2D(8, 3, groups=4, padding="same", name="grouped")(x)
    b = keras.layers.Conv2D(4, 3, dilation_rate=2, padding="same", name="dilated")(x)
    c = keras.layers.SeparableConv2D(4, 3, padding="same", name="sep")(x)
    c = keras.layers.BatchNormalization(name="sep_bn")(c)
    x = keras.layers.Concatenate(name="cat")([a, b, c])
    x = keras.layers.AveragePooling2D(3, strides=2, padding="same", name="avg")(x)
    x = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name="pad")(x)
    x = keras.layers.Cropping2D(((1, 0), (1, 0)), name="crop")(x)
    nested = keras.Sequential([keras.layers.LayerNormalization(epsilon=1e-6, name="ln"),
                               keras.layers.Dense(16, name="pointwise")], name="nested")
    x = nested(x)
    x = keras.layers.Activation("hard_sigmoid", name="hsig")(x)
    y = keras.layers.Conv2D(16, 1, name="gated")(x)
    y = keras.layers.ReLU(6.0, name="relu6")(y + 3.0) * (1.0 / 6.0)
    x = x + y
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(12, activation="relu", name="fc1")(x)
    x = keras.layers.Dense(5, name="logits")(x)
    return keras.Model(inputs, x, name="wide")


def test_wide_model_matches_keras():
    keras.utils.set_random_seed(6)
    model = _wide_model()
    rng = np.random.default_rng(6)
    for layer in model.layers + model.get_layer("nested").layers:
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization)):
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
            layer.beta.assign(rng.normal(0, 0.3, layer.beta.shape))
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(rng.uniform(0, 1, (8, 16, 16, 3)).astype(np.float32), training=True)
    net, weights = from_keras(model)
    ops = {n.op for n in net.nodes}
    assert {"concat", "avgpool", "flatten", "layer_norm", "crop", "pad"} <= ops
    assert net.node("grouped").groups == 4 and net.node("dilated").dilation == 2
    assert net.node("row").kernel_hw == (1, 3)
    assert net.node("row").batch_norm  # folded
    assert net.node("pre_bn").op == "dws" and net.node("pre_bn").batch_norm
    assert [net.node(f"sep/{part}").op for part in ("depthwise", "pointwise")] == ["dws", "conv"]
    assert net.node("ln/affine").op == "dws" and net.node("pointwise").op == "conv"
    assert net.node("gated/hard_sigmoid").fn == "hard_sigmoid"
    float_model = FloatNetwork(net)
    load_weights(float_model, weights)
    images = rng.uniform(0, 1, (3, 16, 16, 3)).astype(np.float32)
    theirs = model(images).numpy()
    np.testing.assert_allclose(float_model(images).numpy(), theirs, rtol=1e-4,
                               atol=1e-4 * np.abs(theirs).max())
    from adj_quant import api

    qnet = api.quantize(float_model)
    api.calibrate(qnet, images)
    assert np.isfinite(qnet(images).numpy()).all()
    # the BN-folded float path of the quantized network is the float network
    np.testing.assert_allclose(qnet.float_forward(tf.constant(images)).numpy(), theirs,
                               rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_sequential_model_and_subclassed_model():
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="c"),
                              keras.layers.Flatten(name="f"), keras.layers.Dense(2, name="d")])
    net, weights = from_keras(model)
    assert [n.op for n in net.nodes] == ["conv", "flatten", "fc"]
    float_model = FloatNetwork(net)
    load_weights(float_model, weights)
    images = np.random.default_rng(7).uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(float_model(images).numpy(), model(images).numpy(), atol=1e-5)

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(UserError, match="subclassed") as err:
        from_keras(Subclassed())
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------- errors


def _one_layer_model(layer):
    inputs = keras.Input((8, 8, 3))
    x = layer(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2)(x))


@pytest.mark.parametrize("layer, cls", [
    (lambda: keras.layers.Conv2DTranspose(4, 3, name="up"), "Conv2DTranspose"),
    (lambda: keras.layers.UpSampling2D(name="up"), "UpSampling2D"),
])
def test_unsupported_layer_is_a_one_line_user_error(layer, cls):
    with pytest.raises(UserError) as err:
        from_keras(_one_layer_model(layer()))
    message = str(err.value)
    assert "\n" not in message
    assert "'up'" in message and f"({cls})" in message
    assert "supported layers: InputLayer, Conv2D" in message


@pytest.mark.parametrize("layer, words", [
    (lambda: keras.layers.Conv2D(6, 3, dilation_rate=(1, 2), name="bad"), "dilation_rate"),
    (lambda: keras.layers.Conv2D(6, (1, 3), padding="valid", name="bad"), "kernel_size"),
    (lambda: keras.layers.Conv2D(6, 3, strides=(1, 2), name="bad"), "strides"),
    (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="bad"),
     "depth_multiplier"),
    (lambda: keras.layers.ReLU(max_value=4.0, name="bad"), "max_value"),
    (lambda: keras.layers.Activation("elu", name="bad"), "elu"),
    (lambda: keras.layers.BatchNormalization(axis=1, name="bad"), "axis"),
    (lambda: keras.layers.ZeroPadding2D(((1, 0), (0, 0)), name="bad"), r"top \+ bottom"),
    (lambda: keras.layers.Cropping2D(((1, 0), (0, 0)), name="bad"), r"top \+ bottom"),
    (lambda: keras.layers.LayerNormalization(axis=1, name="bad"), "channel axis"),
])
def test_unsupported_configuration_names_the_layer(layer, words):
    with pytest.raises(UserError, match=words) as err:
        from_keras(_one_layer_model(layer()))
    assert "'bad'" in str(err.value) and "\n" not in str(err.value)


def test_unsupported_models():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    a, b = keras.layers.Dense(2)(pooled), keras.layers.Dense(3)(pooled)
    with pytest.raises(UserError, match="outputs"):
        from_keras(keras.Model(inputs, [a, b]))
    with pytest.raises(UserError, match="no input shape"):
        from_keras(keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(2)]))
    gray = keras.Input((8, 8, 1))
    with pytest.raises(UserError, match="3"):
        from_keras(keras.Model(gray, keras.layers.Dense(2)(
            keras.layers.GlobalAveragePooling2D()(gray))))
    with pytest.raises(UserError, match="last layer must be a Dense"):
        from_keras(keras.Model(inputs, keras.layers.Activation("relu")(a)))
    # an operation on KerasTensors is no layer: the message does not call it one
    with pytest.raises(UserError, match=r"\(operation keras\..*Multiply\): an operation") as err:
        from_keras(keras.Model(inputs, keras.layers.Dense(2)(
            keras.layers.GlobalAveragePooling2D()(x * 2.0))))
    assert "\n" not in str(err.value)
    shared = keras.layers.Conv2D(4, 3, padding="same", name="shared")
    twice = shared(shared(keras.layers.Conv2D(4, 1)(inputs)))
    with pytest.raises(UserError, match="'shared' \\(Conv2D\\).*more than once"):
        from_keras(keras.Model(inputs, keras.layers.Dense(2)(
            keras.layers.GlobalAveragePooling2D()(twice))))
    # a Rescaling that is not directly after the input
    late = keras.layers.Rescaling(2.0, name="late")(x)
    with pytest.raises(UserError, match="'late' \\(Rescaling\\).*directly after the input"):
        from_keras(keras.Model(inputs, keras.layers.Dense(2)(
            keras.layers.GlobalAveragePooling2D()(late))))


def test_load_weights_names_the_first_mismatch():
    net, weights = from_keras(_one_layer_model(keras.layers.Conv2D(4, 3, name="c")))
    float_model = FloatNetwork(net)
    bad = dict(weights)
    bad["keras_model/c/weights"] = np.zeros([3, 3, 3, 5], np.float32)
    with pytest.raises(UserError, match="'keras_model/c/weights' have shape"):
        load_weights(float_model, bad)
    missing = {k: v for k, v in weights.items() if not k.endswith("/c/biases")}
    with pytest.raises(UserError, match="no weights for variable 'keras_model/c/biases'"):
        load_weights(float_model, missing)
    with pytest.raises(UserError, match="'keras_model/x/weights' is not a variable"):
        load_weights(float_model, {**weights, "keras_model/x/weights": np.zeros(1)})
