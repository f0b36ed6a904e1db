"""The quantized network (EfficientNet-B0): folding, calibration, thresholds files, bits."""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from adj_quant import nets
from adj_quant.errors import UserError
from adj_quant.network import FloatNetwork
from adj_quant.qnetwork import QuantConfig, QuantizedNetwork

IMG = 32


def _float_model(num_classes=10, seed=0):
    model = FloatNetwork(nets.build("efficientnet_b0", num_classes=num_classes), seed=seed)
    images = tf.random.stateless_uniform([16, IMG, IMG, 3], seed=[seed, 1])
    # Realistic batch-norm statistics: moving averages of real batch statistics.
    for layer in model.layers.values():
        if layer.bn is not None:
            layer.bn.momentum = 0.0
    model(images, training=True)
    for scope, layer in model.layers.items():
        if layer.bn is not None:
            layer.bn.momentum = 0.99
        # A random EfficientNet with unit-gain residual branches is chaotic (0.1% input noise
        # moves its logits by ~20%), unlike a trained one. Damping the residual branches a
        # little gives a network whose logits depend smoothly, but clearly, on the input.
        if scope.endswith("/project"):
            layer.bn.gamma.assign(layer.bn.gamma * 0.75)
    return model, images


@pytest.fixture(scope="module")
def float_and_images():
    return _float_model()


@pytest.fixture(scope="module")
def calibrated(float_and_images, tmp_path_factory):
    """The default quantized model of :func:`float_and_images`, calibrated on its images, and
    its thresholds file (calibrating B0 takes seconds; tests that change a thresholds file
    change a copy, and none changes the model)."""
    model, images = float_and_images
    qmodel = QuantizedNetwork.from_float(model, QuantConfig())
    qmodel.calibrate_activations([images], progress=False)
    path = tmp_path_factory.mktemp("thresholds") / "initial_thresholds.json"
    qmodel.save_thresholds(str(path))
    return qmodel, path


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_folded_float_forward_equals_float_model(float_and_images):
    model, images = float_and_images
    qmodel = QuantizedNetwork.from_float(model, QuantConfig())
    assert _rel(qmodel.float_forward(images).numpy(), model(images).numpy()) < 1e-4


def test_8bit_model_stays_within_5_percent_of_float(float_and_images, calibrated):
    model, images = float_and_images
    qmodel, _ = calibrated
    assert qmodel.qcfg == QuantConfig(8, 8, 8, 8)
    f = model(images).numpy()
    qlogits = qmodel(images).numpy()
    assert _rel(qlogits, f) <= 0.05
    # The float logits do depend on the image: another batch moves them by far more than 5%.
    assert _rel(model(images[::-1]).numpy(), f) > 0.1
    # ... and the quantization is real: 3 bits everywhere is much further away.
    q3 = QuantizedNetwork.from_float(model, QuantConfig(3, 3, 8, 8))
    q3.calibrate_activations([images], progress=False)
    assert _rel(q3(images).numpy(), f) > 2 * _rel(qlogits, f)


def test_quantized_weights_have_at_most_2_pow_b_levels(float_and_images):
    model, _ = float_and_images
    qmodel = QuantizedNetwork.from_float(model, QuantConfig(weight_bits=3))
    layer = qmodel.layers["expanded_conv_2/expand"]
    w, _ = layer.quantized_weights()
    for c in range(layer.cout):
        assert len(np.unique(w.numpy()[..., c])) <= 8
    dws = qmodel.layers["expanded_conv_2/dws"]
    w, _ = dws.quantized_weights()
    for c in range(dws.cout):
        assert len(np.unique(w.numpy()[:, :, c, :])) <= 8


def test_calibration_records_per_channel_min_max(float_and_images):
    model, images = float_and_images
    qmodel = QuantizedNetwork.from_float(model, QuantConfig())
    seen = {}

    def record(name, x):
        seen[name] = x.numpy()

    qmodel.float_forward(images, record)
    qmodel.calibrate_activations([images[:7], images[7:]], progress=False)
    quant = qmodel.quantizers()["expanded_conv_3/project/input"]
    x = seen["expanded_conv_3/project/input"]
    np.testing.assert_allclose(quant.init_min.numpy(), x.min(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(quant.init_max.numpy(), x.max(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    w = qmodel.layers["expanded_conv_3/dws"].weights.numpy()
    wq = qmodel.quantizers()["expanded_conv_3/dws/weights"]
    np.testing.assert_allclose(wq.init_max.numpy(), w.max(axis=(0, 1, 3)))
    swish = qmodel.quantizers()["Conv_1/swish_input"]
    np.testing.assert_allclose(swish.init_min.numpy(),
                               seen["Conv_1/swish_input"].min(axis=(0, 1, 2)),
                               rtol=1e-5, atol=1e-6)
    assert "Conv/input" not in qmodel.quantizers()  # the stem's input is the 8-bit image


def _calibrated_thresholds(calibrated, path):
    """The calibrated model of the fixture and a copy of its thresholds file at ``path``."""
    qmodel, original = calibrated
    shutil.copyfile(original, path)
    return qmodel


def test_thresholds_round_trip_and_mismatch(tmp_path, float_and_images, calibrated):
    model, _ = float_and_images
    path = tmp_path / "initial_thresholds.json"
    qmodel = _calibrated_thresholds(calibrated, path)
    other = QuantizedNetwork(model.arch, QuantConfig())
    other.load_thresholds(str(path))
    for name, quant in other.quantizers().items():
        np.testing.assert_array_equal(quant.init_min.numpy(),
                                      qmodel.quantizers()[name].init_min.numpy())
    # A model with another class count is refused, naming the first mismatch.
    wrong = QuantizedNetwork(nets.build("efficientnet_b0", num_classes=7), QuantConfig())
    with pytest.raises(UserError, match="Logits/weights min has 10 values, the model needs 7"):
        wrong.load_thresholds(str(path))
    no_swish = QuantizedNetwork(model.arch, QuantConfig(swish_bits=-1))
    with pytest.raises(UserError, match="unknown tensor 'Conv/swish_input'"):
        no_swish.load_thresholds(str(path))
    data = json.loads(path.read_text())
    del data["expanded_conv_4/se_2/input"]
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="no entry for 'expanded_conv_4/se_2/input'"):
        other.load_thresholds(str(path))
    with pytest.raises(UserError, match="not found"):
        other.load_thresholds(str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match="is a directory"):
        other.load_thresholds(str(tmp_path))


def test_thresholds_with_strings_or_min_above_max_are_refused(tmp_path, float_and_images,
                                                              calibrated):
    path = tmp_path / "initial_thresholds.json"
    _calibrated_thresholds(calibrated, path)
    qmodel = QuantizedNetwork(float_and_images[0].arch, QuantConfig())  # not the shared one
    good = json.loads(path.read_text())
    strings = json.loads(path.read_text())
    strings["Conv/weights"]["max"][3] = "big"
    path.write_text(json.dumps(strings))
    with pytest.raises(UserError, match="Conv/weights max holds 'big', not a finite number"):
        qmodel.load_thresholds(str(path))
    swapped = good
    swapped["Logits/weights"]["min"][2] = swapped["Logits/weights"]["max"][2] + 1.0
    path.write_text(json.dumps(swapped))
    with pytest.raises(UserError, match="Logits/weights channel 2 has min .* > max"):
        qmodel.load_thresholds(str(path))


def test_bits_trainable_and_swish_modes(float_and_images):
    model, images = float_and_images
    qm = QuantizedNetwork.from_float(
        model, QuantConfig(weight_bits=4, act_bits=6, swish_bits=0, bits_trainable=True))
    bits = qm.bit_assignment()
    np.testing.assert_array_equal(bits.weight["expanded_conv_1/expand"].numpy(), [4] * 96)
    np.testing.assert_array_equal(bits.act["expanded_conv_1/expand"].numpy(), [6] * 16)
    np.testing.assert_array_equal(bits.swish["expanded_conv_1/dws"].numpy(), [6] * 96)
    assert bits.act["Conv"] == 8
    n_quant = len(qm.quantizers())
    n_bias = len(qm.layers)
    assert len(qm.bits_variables()) == n_quant - n_bias  # every quantizer but the biases'
    fixed_swish = QuantizedNetwork.from_float(model, QuantConfig(bits_trainable=True))
    assert fixed_swish.swish_quant["Conv"].bits_scale is None
    assert fixed_swish.bit_assignment().swish["Conv"].numpy()[0] == 8
    none = QuantizedNetwork.from_float(model, QuantConfig(swish_bits=-1, bias_bits=0))
    assert not none.swish_quant and none.bit_assignment().bias_bits == 32
    # gradients reach bits_scale
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(qm(images) ** 2)
    grads = tape.gradient(loss, qm.bits_variables())
    assert sum(float(tf.reduce_sum(tf.abs(g))) for g in grads if g is not None) > 0


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_the_bits_computed_together_equal_each_quantizers_own(float_and_images, traced):
    """``bit_assignment`` computes the trainable bits of all quantizers as one vector.
    Oracle: each quantizer's own ``bits()`` and, by a separate tape, its gradient, for bits
    scales spread over several widths (b0 4 for weights and 6 for inputs, rounding ties
    and the clip bounds included) and a loss that weighs every channel differently; the
    bits and their gradients must be equal bit for bit."""
    model, _ = float_and_images
    qm = QuantizedNetwork.from_float(
        model, QuantConfig(weight_bits=4, act_bits=6, swish_bits=0, bits_trainable=True))
    rng = np.random.default_rng(0)
    for var in qm.bits_variables():  # 0.2 .. 1.6 of b0: below 2 bits, ties, above 8
        values = rng.choice([0.2, 0.5, 0.75, 1.0, 1.0 + 1 / 12, 1.25, 1.6], var.shape)
        var.assign(values.astype(np.float32))
    quants = list(qm.quantizers().values())
    weights = [tf.constant(rng.uniform(0.5, 2.0, q.channels).astype(np.float32)) for q in quants]

    def both():
        got, want = {}, {}
        for name, getter in (("joint", None), ("own", lambda q: q.bits())):
            with tf.GradientTape() as tape:
                bits = qm.bit_assignment(getter)
                per_quant = _bits_by_quantizer(qm, bits)
                loss = tf.add_n([tf.reduce_sum(tf.cast(per_quant[id(q)], tf.float32) * w)
                                 for q, w in zip(quants, weights)])
            result = got if name == "joint" else want
            result["bits"] = [per_quant[id(q)] for q in quants]
            result["grads"] = tape.gradient(loss, qm.bits_variables())
        return got, want

    got, want = tf.function(both)() if traced else both()
    for a, b in zip(got["bits"], want["bits"]):
        np.testing.assert_array_equal(np.broadcast_to(a.numpy(), b.shape), b.numpy())
    for a, b in zip(got["grads"], want["grads"]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert len({float(v) for b in want["bits"] for v in np.ravel(b.numpy())}) >= 5


def _bits_by_quantizer(qm, bits):
    """``{id(quantizer): its bits}`` from a BitAssignment (weights, inputs, swish inputs)."""
    out = {}
    for scope, layer in qm.layers.items():
        out[id(layer.weight_quant)] = bits.weight[scope]
        if layer.act_quant is not None:
            out[id(layer.act_quant)] = bits.act[scope]
        if layer.bias_quant is not None:
            out[id(layer.bias_quant)] = tf.fill([1], float(bits.bias_bits))
    for scope, quant in {**qm.swish_quant, **qm.gate_quant}.items():
        out[id(quant)] = bits.swish[scope]
    return out


@pytest.mark.parametrize("kwargs, name", [
    (dict(weight_bits=9), "weight_bits 9"), (dict(act_bits=1), "act_bits 1"),
    (dict(swish_bits=4), "swish_bits 4"), (dict(range_preset=0), "range preset 0"),
    (dict(bits_grad="x"), "bits_grad 'x'"), (dict(bias_range="x"), "bias_range 'x'"),
])
def test_bad_config_is_one_clear_error_worded_for_a_library(kwargs, name):
    with pytest.raises(ValueError, match=name) as err:  # a UserError is a ValueError
        QuantConfig(**kwargs)
    assert "--" not in str(err.value)
