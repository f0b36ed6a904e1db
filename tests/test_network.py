"""One declaration, everything derived: a made-up network (no EfficientNet code involved).

conv -> swish -> depthwise -> swish -> SE (pool, reduce, swish, expand, sigmoid, scale)
-> project -> residual add -> pool -> FC, declared here. From it: the float forward
(against a plain-TF composition written out by hand), the quantized forward at 8 bits
(against the float one), the MicroNet counts (against hand-computed numbers) and a
quant_info.json round trip.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import adj_quant as aq
from adj_quant import cost as M
from adj_quant.network import Node

ROOT = Path(__file__).resolve().parents[1]

TOY = aq.Network("toy", "toy", (
    Node("stem", "conv", kernel=3, filters=8, stride=2),
    Node("stem/swish", "act", fn="swish"),
    Node("block/dws", "dws", kernel=3),
    Node("block/dws/swish", "act", fn="swish"),
    Node("block/se", "gap"),
    Node("block/se_1", "conv", filters=2, batch_norm=False),
    Node("block/se_1/swish", "act", fn="swish"),
    Node("block/se_2", "conv", filters=8, batch_norm=False),
    Node("block/se_2/sigmoid", "act", fn="sigmoid"),
    Node("block/se_scale", "mul", inputs=("block/dws/swish", "block/se_2/sigmoid")),
    Node("block/project", "conv", filters=8),
    Node("block/residual", "add", inputs=("block/project", "stem/swish"), drop_path=(1, 1)),
    Node("pool", "gap", keepdims=False),
    Node("logits", "fc", filters=5, batch_norm=False),
))


@pytest.fixture(scope="module")
def toy():
    model = aq.FloatNetwork(TOY, seed=1)
    rng = np.random.default_rng(0)
    for layer in model.layers.values():
        if layer.bn is not None:
            layer.bn.gamma.assign(rng.uniform(0.5, 1.5, layer.cout))
            layer.bn.beta.assign(rng.normal(0, 0.2, layer.cout))
            layer.bn.moving_mean.assign(rng.normal(0, 0.2, layer.cout))
            layer.bn.moving_variance.assign(rng.uniform(0.5, 2.0, layer.cout))
        else:
            layer.biases.assign(rng.normal(0, 0.2, layer.cout))
    images = tf.constant(rng.uniform(0, 1, (6, 8, 8, 3)), tf.float32)
    return model, images


def _by_hand(model, x):
    """The toy network written out in plain TF ops from the module's variables."""
    def bn(name, y):
        b = model.layers[name].bn
        return (y - b.moving_mean) / tf.sqrt(b.moving_variance + 1e-3) * b.gamma + b.beta

    def swish(y):
        return y * tf.sigmoid(y)

    w = {name: layer.weights for name, layer in model.layers.items()}
    b = {name: layer.biases for name, layer in model.layers.items()}
    stem = swish(bn("stem", tf.nn.conv2d(x, w["stem"], 2, "SAME")))
    d = swish(bn("block/dws", tf.nn.depthwise_conv2d(stem, w["block/dws"], [1, 1, 1, 1], "SAME")))
    s = tf.reduce_mean(d, [1, 2], keepdims=True)
    s = swish(tf.nn.conv2d(s, w["block/se_1"], 1, "SAME") + b["block/se_1"])
    s = tf.sigmoid(tf.nn.conv2d(s, w["block/se_2"], 1, "SAME") + b["block/se_2"])
    y = bn("block/project", tf.nn.conv2d(d * s, w["block/project"], 1, "SAME")) + stem
    return tf.reduce_mean(y, [1, 2]) @ w["logits"] + b["logits"]


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_float_forward_equals_the_network_written_by_hand(toy):
    model, images = toy
    np.testing.assert_allclose(model(images).numpy(), _by_hand(model, images).numpy(),
                               rtol=1e-5, atol=1e-5)
    assert set(model.slim_variables()) >= {"toy/stem/weights", "toy/stem/BatchNorm/gamma",
                                           "toy/block/dws/depthwise_weights",
                                           "toy/block/se_1/biases", "toy/logits/weights"}


def test_quantized_forward_at_8_bits_is_close_to_float(toy):
    model, images = toy
    qnet = aq.quantize(model, aq.QuantConfig())
    aq.calibrate(qnet, images)
    assert set(qnet.swish_quant) == {"stem", "block/dws", "block/se_1"}
    assert set(qnet.gate_quant) == {"block/se_2"}
    assert qnet.layers["stem"].act_quant is None  # the stem multiplies with the image
    assert qnet.layers["logits"].act_quant.channels == 8
    float_logits = model(images).numpy()
    assert _rel(qnet(images), float_logits) < 0.03
    q2 = aq.quantize(model, aq.QuantConfig(weight_bits=2, act_bits=2))
    aq.calibrate(q2, images)
    assert _rel(q2(images), float_logits) > _rel(qnet(images), float_logits)


def test_counts_by_hand():
    bits = M.BitAssignment.uniform(TOY, 32, 32)
    got = M.count_micronet(TOY, 8, bits, freebie=False).as_floats()
    # 8x8 input; the stride-2 stem gives 4x4x8 everywhere after it.
    # params: stem 9*3*8 + 8 = 224, dws 9*8 + 8 = 80, se_1 8*2 + 2 = 18, se_2 2*8 + 8 = 24,
    #         project 8*8 + 8 = 72, logits 8*5 + 5 = 45                         -> 463
    assert got["params"] == 463
    # multiplies: stem 16*27*8 = 3456, swish 3*128 = 384, dws 16*9*8 = 1152, swish 384,
    #   SE pool 8, se_1 16, swish 3*2 = 6, se_2 16, sigmoid 2*8 = 16, scale 128,
    #   project 16*64 = 1024, head pool 8, logits 40                            -> 6638
    assert got["multiplies"] == 6638
    # adds: stem 16*8*27 = 3456, swish 128, dws 16*8*9 = 1152, swish 128, SE pool 15*8 = 120,
    #   se_1 2*8 = 16, swish 2, se_2 8*2 = 16, sigmoid 8, project 16*8*8 = 1024,
    #   residual 128, head pool 120, logits 5*8 = 40                            -> 6338
    assert got["adds"] == 6338
    adjq = M.count_adjq(TOY, 8, M.BitAssignment.uniform(TOY, 4, 4)).as_floats()
    # adjq: 2 * MACs * max(w, a)/32, the stem at 8 bits; swish 3 per element at 8 bits:
    # MACs stem 3456, dws 1152, se_1 16, se_2 16, project 1024, logits 40;
    # 2*3456*8/32 + 2*(1152+16+16+1024+40)*4/32 + 3*(128+128+2)*8/32 = 1728 + 562 + 193.5
    assert adjq["ops"] == pytest.approx(2483.5)


def test_quant_info_round_trip(toy, tmp_path):
    model, images = toy
    qnet = aq.quantize(model, aq.QuantConfig(bits_trainable=True))
    rng = np.random.default_rng(3)
    for quant in qnet.quantizers().values():
        if quant.bits_scale is not None:
            quant.bits_scale.assign(rng.uniform(0.25, 1.0, quant.channels))
    data = aq.save_quant_info(qnet, tmp_path / "quant_info.json", {"top1": 0.5})
    assert set(data) == {"stem", "block", "logits", "swish_inputs", "bias_bits", "summary"}
    assert set(data["block"]) == {"dws", "se_1", "se_2", "project"}
    assert data["stem"]["act"] == 8 and len(data["block"]["project"]["act"]) == 8
    assert set(data["swish_inputs"]) == {"stem", "block/dws", "block/se_1", "block/se_2"}
    back = aq.load_quant_info(tmp_path / "quant_info.json", TOY)
    now = qnet.bit_assignment()
    for scope in TOY.layer_names:
        np.testing.assert_array_equal(np.asarray(back.weight[scope]), now.weight[scope].numpy())
    assert M.count_micronet(TOY, 8, back).as_floats() == M.count_micronet(TOY, 8, now).as_floats()


def test_declaration_errors_name_the_node():
    with pytest.raises(ValueError, match="node 'b'.*input 'nope' is not an earlier node"):
        aq.Network("bad", "bad", (Node("a", "conv", filters=2),
                                  Node("b", "add", inputs=("a", "nope")),
                                  Node("c", "fc", filters=2)))
    with pytest.raises(ValueError, match="unknown op 'pool'"):
        aq.Network("bad", "bad", (Node("a", "pool"), Node("c", "fc", filters=2)))


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = ("import os, sys, adj_quant; "
            "print('tensorflow' in sys.modules, 'TF_CPP_MIN_LOG_LEVEL' in os.environ)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=True).stdout.split()
    assert out == ["False", "False"]


def test_readme_example_runs_on_a_network_of_its_own(tmp_path, monkeypatch):
    """The README's "Use it on your own network" block, run as it is."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it on your own network", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "efficientnet" not in code.lower()
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    info = json.loads((tmp_path / "quant_info.json").read_text())
    assert info["bias_bits"] == 8 and "block" in info
    assert float(namespace["cost"].score) > 0
    assert all(g is not None for g in namespace["grads"])


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_matches_the_formula_with_tf_moments(training):
    """The fused kernel against plain TF: ``(x - mean) / sqrt(var + eps) * gamma + beta`` with
    ``tf.nn.moments`` (biased variance) in training, the moving statistics otherwise; the
    moving averages follow the momentum rule with the biased batch variance; gradients equal
    plain-TF autodiff of the same formula."""
    from adj_quant.network import BatchNorm

    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(1.0, 3.0, (4, 5, 5, 6)).astype(np.float32))
    bn = BatchNorm("s", 6, epsilon=1e-3, momentum=0.9)
    bn.gamma.assign(rng.uniform(0.5, 1.5, 6).astype(np.float32))
    bn.beta.assign(rng.normal(0, 0.3, 6).astype(np.float32))
    bn.moving_mean.assign(rng.normal(0, 0.5, 6).astype(np.float32))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, 6).astype(np.float32))
    mean0, var0 = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    g = tf.constant(rng.normal(size=(4, 5, 5, 6)).astype(np.float32))

    with tf.GradientTape() as tape:
        tape.watch(x)
        y = bn(x, training)
    got = tape.gradient(y, [x, bn.gamma, bn.beta], output_gradients=g)

    with tf.GradientTape() as tape:
        tape.watch(x)
        mean, var = tf.nn.moments(x, [0, 1, 2]) if training else (mean0, var0)
        want = (x - mean) * tf.math.rsqrt(var + 1e-3) * bn.gamma + bn.beta
    expected = tape.gradient(want, [x, bn.gamma, bn.beta], output_gradients=g)

    np.testing.assert_allclose(y.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)
    if training:
        m, v = tf.nn.moments(x, [0, 1, 2])
        np.testing.assert_allclose(bn.moving_mean.numpy(), 0.9 * mean0 + 0.1 * m.numpy(), rtol=1e-5)
        np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 * var0 + 0.1 * v.numpy(),
                                   rtol=1e-5)
    else:
        np.testing.assert_array_equal(bn.moving_mean.numpy(), mean0)
