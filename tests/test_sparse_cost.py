"""Sparse weights and removed channels in the MicroNet counts (docs/metric.md, "Sparsity"),
against hand-computed numbers, the dense counts, and plain-TF autodiff of the formula."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT

from adj_quant import cost as M
from adj_quant import nets
from adj_quant import quant_info as QI
from adj_quant.errors import UserError
from adj_quant.network import Network, Node

# One 3x3 conv, 4 -> 8 channels, 5x5 output positions, with bias: N = 9 * 4 * 8 = 288 weights.
CONV = M.LayerSpec("c", "conv", 3, 4, 8, 1, 5, 5, True)


def _counts(**kw):
    out = M.sparse_layer_counts(CONV, 4, 6, 8, **kw)
    return {k: float(out[k]) for k in ("params", "multiplies", "adds")}


def test_a_sparse_conv_by_hand():
    # s = 0.5 at 4 bits: 144 kept weights, a 288-bit mask.
    assert _counts(density=0.5) == {
        "params": 288 * 4 * 0.5 / 32 + 288 / 32 + 2 * 8 + 2 * 4 + 8 * 8 / 32 + 2,  # 55
        "multiplies": 25 * 144 * max(4, 6) / 32,  # 675 (each multiply at max(w, a) bits)
        "adds": 25 * 8 * (18 - 1 + 1),  # 3600: 18 products per output, the bias add
    }


def test_dense_is_the_ordinary_count():
    dense = M.micronet_layer_counts(CONV, 4, 6, 8)
    assert _counts(density=1.0) == {k: float(dense[k]) for k in ("params", "multiplies", "adds")}
    assert _counts(density=1.0)["params"] == 288 * 4 / 32 + 16 + 8 + 2 + 2


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_mask_breaks_even_at_one_over_b(bits):
    """``N b (1 - s) + N = N b`` at ``s = 1/b``: pruning pays only beyond it."""
    def params(density):
        return float(M.sparse_layer_counts(CONV, bits, 6, 8, density=density)["params"])

    assert params(1 - 1 / bits) == pytest.approx(params(1.0), rel=1e-12)
    assert params(1 - 0.5 / bits) > params(1.0) > params(1 - 2 / bits)


def _chain(second_act="swish", extra=()):
    """stem conv A (3x3, 3 -> 4) -> act -> conv B (1x1, 4 -> 6) -> ..."""
    nodes = (Node("A", "conv", kernel=3, filters=4, batch_norm=False),
             Node("A/act", "act", fn=second_act),
             Node("B", "conv", kernel=1, filters=6, batch_norm=False), *extra,
             Node("pool", "gap", keepdims=False),
             Node("Logits", "fc", filters=3, batch_norm=False))
    return Network("chain", "chain", nodes)


def test_a_removed_channel_and_its_consumer_by_hand():
    net = _chain()
    bits = M.BitAssignment.uniform(net, 4, 8, bias_bits=8)
    bits.density = {"A": np.array([1.0, 0.0, 1.0, 1.0])}  # A's output channel 1 is removed
    alive = M.input_liveness(net, bits, 8)
    np.testing.assert_array_equal(alive["B"].numpy(), [1, 0, 1, 1])
    rows = {r["scope"]: r for r in M.count_micronet(net, 8, bits, per_layer=True).per_layer
            if r["kind"] == "conv"}
    # A: 3 output channels of 3*3*3 weights, all kept: no mask; 2 params per kept channel's
    # weight quantizer; the stem has no input quantizer; 3 biases.
    assert rows["A"]["params"] == 3 * 27 * 4 / 32 + 2 * 3 + 3 * 8 / 32 + 2
    assert rows["A"]["multiplies"] == 64 * 3 * 27 * 8 / 32  # the stem multiplies at 8 bits
    assert rows["A"]["adds"] == 64 * 3 * (27 - 1 + 1)
    # B: input channel 1 is gone: 3 * 6 weights, no mask, 3 input quantizers.
    assert rows["B"]["params"] == 18 * 4 / 32 + 2 * 6 + 2 * 3 + 6 * 8 / 32 + 2
    assert rows["B"]["multiplies"] == 64 * 18 * 8 / 32
    assert rows["B"]["adds"] == 64 * 6 * (3 - 1 + 1)
    # The element ops do not change: the swish still runs on 4 channels.
    assert rows["A"]["params"] < float(M.micronet_layer_counts(
        M.network_layers(net, 8)[0], 4, 8, 8)["params"])


def test_what_a_removed_channel_does_not_pass():
    # A sigmoid of 0 is 0.5: the consumer keeps the channel.
    bits = M.BitAssignment.uniform(_chain("sigmoid"), 4, 8)
    bits.density = {"A": np.array([1.0, 0.0, 1.0, 1.0])}
    np.testing.assert_array_equal(M.input_liveness(_chain("sigmoid"), bits, 8)["B"], [1] * 4)
    # A residual sum keeps a channel that either term has.
    extra = (Node("C", "conv", kernel=1, filters=6, batch_norm=False),
             Node("sum", "add", inputs=("B", "C")), Node("D", "conv", kernel=1, filters=5,
                                                          batch_norm=False))
    net = _chain(extra=extra)
    bits = M.BitAssignment.uniform(net, 4, 8)
    bits.density = {"B": np.array([0.0, 0.0, 1, 1, 1, 1]), "C": np.array([0.0, 1, 1, 1, 1, 1])}
    np.testing.assert_array_equal(M.input_liveness(net, bits, 8)["D"], [0, 1, 1, 1, 1, 1])


def test_uniform_sparsity_on_efficientnet_b0():
    """``adjq-score --sparsity`` charges every weight tensor: adds shrink, the rest not."""
    arch = nets.build("efficientnet_b0", num_classes=1000)
    dense = M.count_micronet(arch, 224, M.BitAssignment.uniform(arch, 2, 2))
    sparse = M.count_micronet(arch, 224, M.BitAssignment.uniform(arch, 2, 2, sparsity=0.5))
    layers = M.network_layers(arch, 224)
    macs = sum(spec.macs for spec in layers)
    # Dot-product adds: k*k*cin*(1 - s) - 1 (+1 bias) per output: half the MACs fewer.
    assert float(dense.adds - sparse.adds) == pytest.approx(0.5 * macs, rel=1e-12)
    # Half the multiplies, each at max(w, a): 2 bits, the stem's at the image's 8.
    assert float(dense.multiplies - sparse.multiplies) == pytest.approx(
        sum(0.5 * spec.macs * (8 if spec.stem else 2) / 32 for spec in layers), rel=1e-12)
    assert float(sparse.params) == pytest.approx(float(dense.params), rel=1e-12)  # s = 1/b
    with pytest.raises(UserError, match="outside"):
        M.BitAssignment.uniform(arch, 2, 2, sparsity=1.0)


def test_the_sparse_path_gives_the_dense_counts_when_nothing_is_pruned():
    arch = nets.build("efficientnet_b0", num_classes=10)
    rng = np.random.default_rng(0)
    layers = M.network_layers(arch, 224)
    weight = {s.scope: rng.integers(2, 9, s.weight_channels) for s in layers}
    act = {s.scope: rng.integers(2, 9, s.cin) for s in layers}
    stems = frozenset(s.scope for s in layers if s.stem)
    act.update({s: 8 for s in stems})
    swish = {op.scope: 5 for op in M.element_ops(arch, 224) if op.kind in ("swish", "sigmoid")}
    bits = M.BitAssignment(weight, act, swish, 6, stems)
    ones = M.BitAssignment(weight, act, swish, 6, stems,
                           density={s.scope: 1.0 for s in layers})
    for style in M.STYLES:
        a = M.micronet_cost(bits, 224, arch=arch, style=style).as_floats()
        b = M.micronet_cost(ones, 224, arch=arch, style=style).as_floats()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-12), (style, key)


def _plain_formula(w, a, d, gamma=0.7):
    """The sparse conv's official score written again in plain TF: the max of weight and
    activation bits as forward max, backward (1 - gamma) w + gamma a."""
    linear = (1 - gamma) * w[None, :] + gamma * a[:, None]
    pair = linear + tf.stop_gradient(tf.maximum(w[None, :], a[:, None]) - linear)
    kept = 9.0 * d
    multiplies = 25.0 * tf.reduce_sum(kept * pair) / 32
    taps = tf.reduce_sum(kept, axis=0)
    adds = 25.0 * tf.reduce_sum(taps)  # (taps - 1 + 1) per output channel
    params = (tf.reduce_sum(w * taps) + 288.0) / 32 + 2 * 8 + 2 * 4 + 8 * 8 / 32 + 2
    return params / M.P_REF + (multiplies + adds) / M.O_REF


def test_gradient_equals_plain_tf_autodiff():
    rng = np.random.default_rng(3)
    w = tf.Variable(rng.uniform(2, 8, 8), dtype=tf.float64)
    a = tf.Variable(rng.uniform(2, 8, 4), dtype=tf.float64)
    d = tf.Variable(rng.uniform(0.2, 0.9, (4, 8)), dtype=tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        c = M.sparse_layer_counts(CONV, w, a, 8, density=d)
        ours = c["params"] / M.P_REF + (c["multiplies"] + c["adds"]) / M.O_REF
        plain = _plain_formula(w, a, d)
    assert float(ours) == pytest.approx(float(plain), rel=1e-12)
    for var in (w, a, d):
        np.testing.assert_allclose(tape.gradient(ours, var), tape.gradient(plain, var),
                                   rtol=1e-10, atol=1e-18)
    assert np.all(tape.gradient(ours, d).numpy() > 0)  # fewer kept weights, a lower score


def test_quant_info_keeps_per_layer_sparsity_and_removed_channels(tmp_path):
    net = _chain()
    bits = M.BitAssignment.uniform(net, 4, 8)
    bits.density = {"A": np.array([1.0, 0.0, 0.5, 0.75]), "B": 0.25}
    data = QI.to_quant_info(bits, net, {})
    assert data["A"]["sparsity"] == [0.0, 1.0, 0.5, 0.25]
    assert data["A"]["removed_channels"] == [1]
    assert data["B"]["sparsity"] == 0.75 and data["B"]["removed_channels"] == []
    assert "sparsity" not in data["Logits"]
    back = QI.from_quant_info(json.loads(json.dumps(data)), net)
    np.testing.assert_array_equal(back.density["A"], [1.0, 0.0, 0.5, 0.75])
    assert back.density["B"] == 0.25 and "Logits" not in back.density
    assert M.count_micronet(net, 8, back).as_floats() == M.count_micronet(net, 8, bits).as_floats()


@pytest.mark.parametrize("entry, message", [
    ({"sparsity": 1.5}, "sparsity must be a fraction"),
    ({"sparsity": [0.5] * 3}, "list of 4"),
    ({"removed_channels": [4]}, "removed_channels must list output channels 0..3"),
])
def test_quant_info_sparsity_that_does_not_fit(entry, message):
    net = _chain()
    data = QI.to_quant_info(M.BitAssignment.uniform(net, 4, 8), net, {})
    data["A"].update(entry)
    with pytest.raises(UserError, match=message) as err:
        QI.from_quant_info(data, net)
    assert "\n" not in str(err.value)


def test_score_command_takes_a_sparsity(capsys):
    from adj_quant.cli import score

    score.main(["--weight_bits", "4", "--act_bits", "4", "--sparsity", "0.5", "--json"])
    sparse = json.loads(capsys.readouterr().out)
    arch = nets.build("efficientnet_b0", num_classes=1000)
    want = M.count_micronet(arch, 224, M.BitAssignment.uniform(arch, 4, 4, sparsity=0.5))
    assert sparse["score_micronet"] == pytest.approx(float(want.score), rel=1e-12)
    dense = M.count_micronet(arch, 224, M.BitAssignment.uniform(arch, 4, 4))
    assert sparse["score_micronet"] < float(dense.score)


def test_score_command_refuses_a_sparsity_outside_the_unit_interval(capsys):
    from adj_quant.cli import score

    for bad in ("-0.1", "nan"):
        with pytest.raises(SystemExit) as exit_info:
            score.main(["--sparsity", bad])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and "--sparsity" in err
    # The real entry point too: exit 2, one line, no traceback.
    run = subprocess.run([sys.executable, "-m", "adj_quant.cli.score", "--sparsity", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--sparsity" in run.stderr
