"""MicroNet / adjq counting, quant_info.json and the score CLI.

Expected numbers are worked out by hand in the comments, never recomputed with the code
under test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from adj_quant import cost as M
from adj_quant import nets
from adj_quant import quant_info as QI
from adj_quant.errors import UserError

REPO = Path(__file__).resolve().parents[1]
B0 = nets.build("efficientnet_b0", num_classes=1000)


def _floats(counts: dict) -> dict:
    return {k: float(v) for k, v in counts.items()}


def _bits(weight=None, act=None, swish=None, bias=8):
    return M.BitAssignment(weight=weight or {}, act=act or {}, swish=swish or {}, bias_bits=bias)


# --------------------------------------------------------------------------- single layers

CONV = M.LayerSpec("c", "conv", kernel=3, cin=2, cout=3, stride=1, in_hw=4, out_hw=4, has_bias=True)


def test_conv_micronet_by_hand():
    got = _floats(M.micronet_layer_counts(CONV, [2, 4, 8], [4, 6], 8))
    # max(w_co, a_ci): a=4 -> 4,4,8 (16); a=6 -> 6,6,8 (20); sum 36.
    # multiplies = 4*4 positions * 9 * 36 / 32 = 162
    assert got["multiplies"] == pytest.approx(162.0)
    # adds at 32 bits: (9*2 - 1) + 1 bias = 18 per output element, 16*3 elements = 864
    assert got["adds"] == pytest.approx(864.0)
    # params: 9*2*(2+4+8)/32 = 7.875; bias 3*8/32 = 0.75;
    # scale+offset: weights 2*3, input act 2*2, bias tensor 2 -> 12. Total 20.625
    assert got["params"] == pytest.approx(20.625)


def test_conv_adjq_by_hand():
    got = _floats(M.adjq_layer_counts(CONV, [2, 4, 8], [4, 6], 8))
    # MACs = 16*9*2*3 = 864. The original's max: tile(w, 2) = 2 4 8 2 4 8 and
    # tile(a, 3) = 4 6 4 6 4 6 -> maxima 4 6 8 6 4 8, mean 36/6 = 6 (not max(14/3, 5) = 5);
    # ops = 2*864*6/32 = 324
    assert got["multiplies"] == pytest.approx(162.0)
    assert got["adds"] == pytest.approx(162.0)
    # params: 54 weights * (14/3)/32 = 7.875, + 3*8/32 = 0.75, no quantizer overhead
    assert got["params"] == pytest.approx(8.625)


@pytest.mark.parametrize("n, m", [(3, 2), (4, 6), (6, 6), (1, 5), (8, 12)])
def test_tiled_max_mean_equals_the_originals_tile_formula(n, m):
    """Forward: numpy's literal ``mean(maximum(tile(w, m), tile(a, n)))``. Backward: plain-TF
    autodiff of ``(1 - gamma) * tile(w) + gamma * tile(a)`` (the surrogate's definition)."""
    rng = np.random.default_rng(n * 10 + m)
    w = rng.integers(2, 9, n).astype(np.float64)
    a = rng.integers(2, 9, m).astype(np.float64)
    oracle = np.mean(np.maximum(np.tile(w, m), np.tile(a, n)))
    wt, at = tf.Variable(w), tf.Variable(a)
    with tf.GradientTape() as tape:
        got = M.tiled_max_mean(wt, at, 0.7)
    assert float(got) == pytest.approx(oracle)
    g_w, g_a = tape.gradient(got, [wt, at])
    with tf.GradientTape() as tape:
        surrogate = tf.reduce_mean(0.3 * tf.tile(wt, [m]) + 0.7 * tf.tile(at, [n]))
    o_w, o_a = tape.gradient(surrogate, [wt, at])
    np.testing.assert_allclose(g_w.numpy(), o_w.numpy(), rtol=1e-12)
    np.testing.assert_allclose(g_a.numpy(), o_a.numpy(), rtol=1e-12)


def test_tiled_max_is_not_the_max_of_means():
    # n = m = 2: pairs (2, 8) and (8, 2) -> maxima 8, 8; the max of the means would be 5.
    assert float(M.tiled_max_mean([2.0, 8.0], [8.0, 2.0], 0.7)) == 8.0


def test_depthwise_by_hand():
    dws = M.LayerSpec("d", "dws", kernel=3, cin=4, cout=4, stride=2, in_hw=8, out_hw=4,
                      has_bias=True)
    w, a = [2, 3, 4, 5], [8, 2, 2, 6]
    got = _floats(M.micronet_layer_counts(dws, w, a, 8))
    # per-channel max 8,3,4,6 = 21; multiplies = 16*9*21/32 = 94.5
    assert got["multiplies"] == pytest.approx(94.5)
    # adds: (9 - 1 + 1) per output element, 16*4 elements = 576
    assert got["adds"] == pytest.approx(576.0)
    # params: 9*14/32 = 3.9375 + 4*8/32 = 1 + overhead 2*4 + 2*4 + 2 = 18 -> 22.9375
    assert got["params"] == pytest.approx(22.9375)
    adjq = _floats(M.adjq_layer_counts(dws, w, a, 8))
    # MACs 16*9*4 = 576; n = m: channel i with channel i, maxima 8 3 4 6, mean 21/4 = 5.25
    # (not max(3.5, 4.5) = 4.5); ops = 2*576*5.25/32 = 189
    assert adjq["multiplies"] + adjq["adds"] == pytest.approx(189.0)
    assert adjq["params"] == pytest.approx(4.9375)  # 36*3.5/32 + 1


def test_fc_by_hand_with_float_bias():
    fc = M.LayerSpec("f", "fc", kernel=1, cin=4, cout=2, stride=1, in_hw=1, out_hw=1, has_bias=True)
    got = _floats(M.micronet_layer_counts(fc, [4, 8], 6, 32))
    # every input: max(4,6)+max(8,6) = 14, times 4 inputs = 56 -> 56/32 = 1.75
    assert got["multiplies"] == pytest.approx(1.75)
    assert got["adds"] == pytest.approx(8.0)  # (4 - 1 + 1) * 2
    # 4*(4+8)/32 = 1.5; float bias 2*32/32 = 2; overhead: weights 2*2 + act 2*4 (bias float: 0)
    assert got["params"] == pytest.approx(15.5)
    adjq = _floats(M.adjq_layer_counts(fc, [4, 8], 6, 32))
    # a scalar is a vector of one: maxima max(4,6), max(8,6) -> mean 7; ops = 2*8*7/32
    assert adjq["multiplies"] + adjq["adds"] == pytest.approx(3.5)
    assert adjq["params"] == pytest.approx(3.5)  # 8*6/32 + 2


def test_stem_has_no_image_quantizer_and_adjq_counts_it_at_8_bits():
    stem = M.LayerSpec("Conv", "conv", kernel=3, cin=3, cout=2, stride=2, in_hw=4, out_hw=2,
                       has_bias=True, stem=True)
    got = _floats(M.micronet_layer_counts(stem, 4, 8, 8))
    # multiplies = 4 positions * 9 * (3*2*max(4,8)) / 32 = 54; adds = 4*2*27 = 216
    assert got["multiplies"] == pytest.approx(54.0)
    assert got["adds"] == pytest.approx(216.0)
    # 27*2*4/32 = 6.75 + 2*8/32 = 0.5 + weights 2*2 + bias 2 (no image quantizer) = 13.25
    assert got["params"] == pytest.approx(13.25)
    adjq = _floats(M.adjq_layer_counts(stem, 2, 8, 8))
    # flat 8 bits: 2 * (4*9*3*2 = 216) * 8/32 = 108; params 54*2/32 + 0.5
    assert adjq["multiplies"] + adjq["adds"] == pytest.approx(108.0)
    assert adjq["params"] == pytest.approx(3.875)
    # flat means flat: even 32-bit weights are charged at 8 bits
    adjq32 = _floats(M.adjq_layer_counts(stem, 32, 8, 8))
    assert adjq32["multiplies"] + adjq32["adds"] == pytest.approx(108.0)


def test_se_block_by_hand():
    layers = [M.LayerSpec("b/se_1", "conv", 1, 4, 2, 1, 1, 1, True),
              M.LayerSpec("b/se_2", "conv", 1, 2, 4, 1, 1, 1, True)]
    ops = [M.ElementOp("gap", "b/se", hw=2, channels=4),
           M.ElementOp("swish", "b/se_1", hw=1, channels=2),
           M.ElementOp("sigmoid", "b/se", hw=1, channels=4),
           M.ElementOp("se_scale", "b/se", hw=2, channels=4)]
    bits = _bits(weight={"b/se_1": 8, "b/se_2": 8}, act={"b/se_1": 8, "b/se_2": 8},
                 swish={"b/se_1": 4}, bias=8)
    got = M.count_specs(layers, ops, bits, "micronet", per_layer=True).as_floats()
    # gap: 4 mults, (4-1)*4 = 12 adds | se_1: 4*2*8/32 = 2 mults, 8 adds |
    # swish: 3*2*4/32 = 0.75 mults, 0.25 adds | se_2: 2 mults, 8 adds |
    # sigmoid: 2*4 = 8 mults, 4 adds | scale: 2*2*4 = 16 mults
    assert got["multiplies"] == pytest.approx(4 + 2 + 0.75 + 2 + 8 + 16)
    assert got["adds"] == pytest.approx(12 + 8 + 0.25 + 8 + 4)
    # se_1: 8*8/32 + 2*8/32 + overhead (2*2 + 2*4 + 2) = 16.5; swish overhead 2*2 = 4;
    # se_2: 2 + 1 + (2*4 + 2*2 + 2) = 17
    assert got["params"] == pytest.approx(37.5)
    assert got["ops"] == pytest.approx(32.75 + 32.25)
    assert got["score"] == pytest.approx(37.5 / 6.9e6 + 65.0 / 1170e6)
    adjq = M.count_specs(layers, ops, bits, "adjq").as_floats()
    # se_1 2*8*8/32 = 4, swish 3*2*4/32 = 0.75, se_2 4; pool/sigmoid/scale free
    assert adjq["ops"] == pytest.approx(8.75)
    assert adjq["params"] == pytest.approx(5.5)  # 2 + 0.5 + 2 + 1


def test_residual_add_by_hand():
    op = M.ElementOp("residual_add", "b/residual", hw=3, channels=5)
    got = M.count_specs([], [op], _bits(), "micronet").as_floats()
    assert (got["multiplies"], got["adds"], got["params"]) == (0.0, 45.0, 0.0)
    assert M.count_specs([], [op], _bits(), "adjq").as_floats()["ops"] == 0.0


def test_bad_per_channel_length_is_rejected():
    with pytest.raises(ValueError, match="c weight: 2 bits, expected 3"):
        M.micronet_layer_counts(CONV, [4, 4], 4, 8)


# --------------------------------------------------------------------------- whole network


@pytest.fixture(scope="module")
def float_counts():
    bits = M.BitAssignment.uniform(B0, 32, 32)
    return (M.count_micronet(B0, 224, bits, per_layer=True, freebie=False),
            M.count_micronet(B0, 224, bits))


def test_float_b0_counts(float_counts):
    full, freebie = float_counts
    # Keras' EfficientNetB0 has 5,288,548 trainable params; 21,008 of its BN channels carry
    # gamma+beta (2 each). Folding BN leaves one bias per channel: 5,288,548 - 21,008.
    assert float(full.params) == 5_267_540
    conv_macs = sum(r["multiplies"] for r in full.per_layer if r["kind"] in ("conv", "dws", "fc"))
    assert 385e6 <= conv_macs <= 395e6  # the known ~0.39 GFLOPs (MACs) of B0
    assert conv_macs == 385_814_752
    # + swish 3*6,157,916 + pools 10,240 + sigmoid 2*8,960 + SE scale 2,306,528
    assert float(full.multiplies) == 406_623_188
    # conv adds = MACs (bias included) + swish 6,157,916 + pools 2,359,008 + sigmoid 8,960
    # + residual 210,112
    assert float(full.adds) == 394_550_748
    rows = full.per_layer
    assert sum(r["params"] for r in rows) == pytest.approx(float(full.params))
    assert sum(r["adds"] for r in rows) == pytest.approx(float(full.adds))
    # the freebie halves params and multiplies, never adds
    assert float(freebie.params) == 2_633_770
    assert float(freebie.multiplies) == 203_311_594
    assert float(freebie.adds) == 394_550_748


def test_any_quantization_forfeits_the_freebie():
    bits = M.BitAssignment.uniform(B0, 32, 32)
    assert bits.is_float()
    bits.weight["Logits"] = 8
    assert not bits.is_float()
    with_flag = M.count_micronet(B0, 224, bits, freebie=True).as_floats()
    without = M.count_micronet(B0, 224, bits, freebie=False).as_floats()
    assert with_flag == without


def test_uniform_8bit_params_by_hand():
    counts = M.count_micronet(B0, 224, M.BitAssignment.uniform(B0, 8, 8)).as_floats()
    # (5,236,192 weights + 31,348 biases) * 8/32 = 1,316,885, plus scale+offset:
    # 2 * (31,348 weight channels + 30,348 input-act channels + 19,580 swish channels
    # + 8,960 SE-gate (sigmoid input) channels) + 2 * 82 bias tensors = 180,636
    # (SE-gate channels: the expanded widths 32+96+144+144+240+240+3*480+3*672+4*1152)
    assert counts["params"] == pytest.approx(1_497_521)
    no_gate = M.BitAssignment.uniform(B0, 8, 8, se_gate=False)
    assert M.count_micronet(B0, 224, no_gate).as_floats()["params"] == pytest.approx(1_479_601)
    adjq = M.count_adjq(B0, 224, M.BitAssignment.uniform(B0, 8, 8)).as_floats()
    assert adjq["params"] == pytest.approx(1_316_885)


def test_quantized_se_gate_sigmoid_by_hand():
    """The SE sigmoid is charged at the bits of its (quantized) input, like a swish."""
    op = M.ElementOp("sigmoid", "b/se_2", 1, 6)
    got = _floats(M.micronet_element_counts(op, [8, 8, 8, 4, 4, 4]))
    # 2 multiplies + 1 add per element at its input bits: (3*8 + 3*4)/32 = 1.125 per op kind
    assert got["multiplies"] == pytest.approx(2.25) and got["adds"] == pytest.approx(1.125)
    assert got["params"] == pytest.approx(12.0)  # scale + offset of 6 channels
    floating = _floats(M.micronet_element_counts(op, None))
    assert floating == {"params": 0.0, "multiplies": 12.0, "adds": 6.0}
    assert sum(_floats(M.adjq_element_counts(op, [8] * 6)).values()) == 0.0  # not counted


def test_uniform_flags():
    b = M.BitAssignment.uniform(B0, 4, 6, swish_bits=0, bias_bits=0)
    assert b.act["Conv"] == 8 and b.act["Conv_1"] == 6
    assert set(b.swish.values()) == {6} and b.bias_bits == 32
    assert set(M.BitAssignment.uniform(B0, 4, 4, swish_bits=-1).swish.values()) == {32}
    with pytest.raises(UserError, match="weight_bits=9"):
        M.BitAssignment.uniform(B0, 9, 4)


# --------------------------------------------------------------------------- gradients


def test_surrogate_max_forward_and_gradient_split():
    w = tf.constant([[2.0, 5.0, 8.0]])  # [1, cout]
    a = tf.constant([[4.0], [6.0]])  # [cin, 1]
    upstream = tf.constant([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    with tf.GradientTape() as tape:
        tape.watch([w, a])
        out = M.surrogate_max(w, a, 0.7)
        loss = tf.reduce_sum(out * upstream)
    np.testing.assert_allclose(out.numpy(), [[4, 5, 8], [6, 6, 8]])
    dw, da = tape.gradient(loss, [w, a])
    assert dw.shape == (1, 3) and da.shape == (2, 1)
    np.testing.assert_allclose(dw.numpy(), [[0.3 * 5, 0.3 * 7, 0.3 * 9]], rtol=1e-6)  # column sums
    np.testing.assert_allclose(da.numpy(), [[0.7 * 6], [0.7 * 15]], rtol=1e-6)  # row sums
    # scalars: the split does not depend on which one is larger
    x, y = tf.constant(3.0), tf.constant(7.0)
    with tf.GradientTape() as tape:
        tape.watch([x, y])
        z = M.surrogate_max(x, y, 0.25)
    assert float(z) == 7.0
    assert [float(g) for g in tape.gradient(z, [x, y])] == pytest.approx([0.75, 0.25])


@pytest.mark.parametrize("style", ["adjq", "micronet"])
def test_micronet_cost_gradient_reaches_per_channel_bits(style):
    bits = M.BitAssignment.uniform(B0, 4, 4)
    scope = "expanded_conv_3/project"  # 1x1 conv 144 -> 40 at 28x28
    w = tf.Variable(tf.fill([40], 4.0))
    a = tf.Variable(tf.fill([144], 4.0))
    s = tf.Variable(tf.fill([144], 6.0))
    bits.weight[scope], bits.act[scope], bits.swish["expanded_conv_3/dws"] = w, a, s
    with tf.GradientTape() as tape:
        value = M.micronet_cost(bits, 224, arch=B0, style=style, gamma=0.7).score
    gw, ga, gs = tape.gradient(value, [w, a, s])
    assert value.dtype == tf.float64
    if style == "adjq":
        # params 144/32 per weight channel; ops 2*784*144*40 * 0.3 / 40 / 32
        expected_w = 4.5 / 6.9e6 + 2116.8 / 1170e6
        expected_a = 2 * 784 * 144 * 40 * 0.7 / 144 / 32 / 1170e6
        expected_s = 3 * 784 / 32 / 1170e6  # swish at 28x28: mean over 144 channels
    else:
        # params 144/32; multiplies 784*144*0.3/32 per weight channel
        expected_w = 4.5 / 6.9e6 + 1058.4 / 1170e6
        expected_a = 784 * 40 * 0.7 / 32 / 1170e6
        expected_s = 4 * 784 / 32 / 1170e6  # 3 multiplies + 1 add per element
    np.testing.assert_allclose(gw.numpy(), expected_w, rtol=1e-4)
    np.testing.assert_allclose(ga.numpy(), expected_a, rtol=1e-4)
    np.testing.assert_allclose(gs.numpy(), expected_s, rtol=1e-4)


# --------------------------------------------------------------------------- quant_info


def _random_bits(arch, seed=0):
    rng = np.random.default_rng(seed)
    layers = M.network_layers(arch, 224)
    weight = {spec.scope: rng.integers(2, 9, spec.weight_channels) for spec in layers}
    act = {spec.scope: rng.integers(2, 9, spec.cin) for spec in layers}
    act["Conv"] = 8
    swish = {op.scope: (rng.integers(2, 9, op.channels) if i % 2 else 6)
             for i, op in enumerate(o for o in M.element_ops(arch, 224) if o.kind == "swish")}
    return M.BitAssignment(weight, act, swish, bias_bits=5, image_inputs=frozenset({"Conv"}))


def test_quant_info_round_trip():
    bits = _random_bits(B0)
    data = json.loads(json.dumps(QI.to_quant_info(bits, B0, {"top1": 0.75})))
    assert data["Conv"]["act"] == 8 and len(data["Conv"]["weight"]) == 32
    assert data["expanded_conv"]["expand"] is None
    assert len(data["expanded_conv_3"]["dws"]["weight"]) == 144
    assert len(data["Logits"]["weight"]) == 1000 and len(data["Logits"]["act"]) == 1280
    assert data["bias_bits"] == 5 and data["swish_inputs"]["Conv"] == 6
    assert set(data["summary"]) >= {"avg_weight_bits", "avg_act_bits", "params", "ops",
                                    "score_adjq", "score_micronet", "top1", "top5"}
    assert data["summary"]["top1"] == 0.75
    back = QI.from_quant_info(data, B0)
    for scope in B0.layer_names:
        np.testing.assert_array_equal(np.asarray(back.weight[scope]), bits.weight[scope])
        np.testing.assert_array_equal(np.asarray(back.act[scope]), bits.act[scope])
    for scope in B0.activation_sites("swish"):
        np.testing.assert_array_equal(np.asarray(back.swish[scope]), bits.swish[scope])
    assert back.bias_bits == 5
    assert M.count_micronet(B0, 224, back).as_floats() == \
        M.count_micronet(B0, 224, bits).as_floats()
    float_info = QI.to_quant_info(M.BitAssignment.uniform(B0, 32, 32), B0, {})
    assert float_info["bias_bits"] is None
    assert QI.from_quant_info(float_info, B0).is_float()


def test_average_bits():
    assert QI.average_bits(M.BitAssignment.uniform(B0, 4, 6), B0) == (4.0, 6.0)
    bits = M.BitAssignment.uniform(B0, 8, 8)
    bits.weight["Logits"] = 2  # 1,280,000 of the 5,236,192 weights
    bits.act["Conv_1"] = 2  # 320 of the 30,348 input-activation channels
    w_avg, a_avg = QI.average_bits(bits, B0)
    assert w_avg == pytest.approx((8 * 3_956_192 + 2 * 1_280_000) / 5_236_192)
    assert a_avg == pytest.approx((8 * 30_028 + 2 * 320) / 30_348)


def _mutate(path, value):
    def apply(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return apply


@pytest.mark.parametrize("mutation, message", [
    (_mutate(["expanded_conv_3", "dws", "weight"], [4] * 240),
     "expanded_conv_3/dws weight has 240 bits, the model needs 144 — was it written for another"),
    (_mutate(["expanded_conv_5", "project", "act"], [4] * 239 + [9]),
     "expanded_conv_5/project act has bits 9 at channel 239"),
    (_mutate(["Conv_1", "weight"], [1] * 1280), "Conv_1 weight has bits 1 at channel 0"),
    (_mutate(["Logits", "act"], [32] + [4] * 1279), "Logits act mixes 32"),
    (_mutate(["expanded_conv_7"], KeyError), "missing key 'expanded_conv_7'"),
    (_mutate(["expanded_conv_2", "se_2"], KeyError), "missing key 'se_2' in 'expanded_conv_2'"),
    (_mutate(["expanded_conv", "expand"], {"weight": [4] * 32, "act": [4] * 32}),
     "expanded_conv/expand is given but the model has no such layer"),
    (_mutate(["expanded_conv_1", "expand"], None), "expanded_conv_1/expand is null"),
    (_mutate(["Conv", "act"], 4), "Conv act is 4"),
    (_mutate(["swish_inputs", "expanded_conv_4/dws"], KeyError),
     "missing key 'expanded_conv_4/dws' in 'swish_inputs'"),
    (_mutate(["swish_inputs", "Conv"], [4] * 31),
     "Conv swish input has 31 bits, the model needs 32"),
    (_mutate(["bias_bits"], 12), "bias_bits is 12"),
    (_mutate(["expanded_conv_16"], {}), "unexpected key 'expanded_conv_16'"),
])
def test_quant_info_mismatch_errors(mutation, message):
    data = json.loads(json.dumps(QI.to_quant_info(M.BitAssignment.uniform(B0, 4, 4), B0, {})))
    mutation(data)
    with pytest.raises(UserError) as err:
        QI.from_quant_info(data, B0, source="qi.json")
    assert str(err.value).startswith("qi.json: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_quant_info_first_mismatch_and_num_classes():
    data = QI.to_quant_info(M.BitAssignment.uniform(B0, 4, 4), B0, {})
    data["expanded_conv_9"]["dws"]["weight"] = [4]
    data["expanded_conv_2"]["se_1"]["act"] = [4]
    with pytest.raises(UserError, match="expanded_conv_2/se_1 act has 1 bits"):
        QI.from_quant_info(data, B0)
    good = QI.to_quant_info(M.BitAssignment.uniform(B0, 4, 4), B0, {})
    with pytest.raises(UserError, match="Logits weight has 1000 bits, the model needs 10 .* "
                                        "another class count"):
        QI.from_quant_info(good, nets.build("efficientnet_b0", num_classes=10))


def test_load_quant_info_file_errors(tmp_path):
    with pytest.raises(UserError, match="nope.json: no such file"):
        QI.load_quant_info(tmp_path / "nope.json", B0)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json: not valid JSON"):
        QI.load_quant_info(bad, B0)
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(UserError, match="model.bin: not a text file"):
        QI.load_quant_info(binary, B0)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def score_cli(tmp_path, capsys, monkeypatch):
    """``score.main`` in this process (TensorFlow is already loaded), in an empty directory:
    returns ``(exit code, stdout, stderr)``. Any exception but ``SystemExit`` propagates,
    failing the test, as a traceback would."""
    from adj_quant.cli import score

    monkeypatch.delenv("ADJQ_TRACEBACK", raising=False)
    monkeypatch.chdir(tmp_path)

    def run(*args):
        capsys.readouterr()
        try:
            code = score.main(list(args))
        except SystemExit as exit_info:
            code = exit_info.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_cli_json_float_vs_8bit(score_cli):
    results = {}
    for name, bits in (("float", "32"), ("int8", "8")):
        rc, out, err = score_cli("--weight_bits", bits, "--act_bits", bits, "--json")
        assert rc == 0, err
        results[name] = json.loads(out)
        assert set(results[name]) == {"params", "multiplies", "adds", "ops", "score_micronet",
                                      "score_adjq"}
    fp, q8 = results["float"], results["int8"]
    assert fp["params"] == 2_633_770 and fp["multiplies"] == 203_311_594  # 16-bit freebie
    assert fp["adds"] == 394_550_748 and fp["ops"] == 597_862_342
    assert q8["params"] == pytest.approx(1_497_521)  # see test_uniform_8bit_params_by_hand
    assert q8["score_micronet"] < fp["score_micronet"]
    assert q8["score_adjq"] < fp["score_adjq"]
    assert q8["score_adjq"] < q8["score_micronet"]


def test_cli_runs_as_a_process():
    """The command as a process, which imports TensorFlow itself: a good run prints its JSON
    and exits 0; a bad input exits 2 with one line on stderr, TensorFlow's start-up chatter
    silenced. The two processes start together to share the wait."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("ADJQ_TRACEBACK", None)
    procs = {name: subprocess.Popen([sys.executable, "-m", "adj_quant.cli.score", *args],
                                    cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, args in (("good", ["--weight_bits", "8", "--act_bits", "8", "--json"]),
                                ("bad", ["--weight_bits", "9", "--act_bits", "4"]))}
    (out, err), rc = procs["good"].communicate(timeout=120), procs["good"].returncode
    assert rc == 0, err
    assert json.loads(out)["params"] == pytest.approx(1_497_521)  # as in-process, above
    (out, err), rc = procs["bad"].communicate(timeout=120), procs["bad"].returncode
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert "--weight_bits 9: bits must be in [2, 8]" in err


def test_cli_quant_info_in_process(tmp_path, score_cli):
    qi = tmp_path / "quant_info.json"
    QI.save_quant_info(qi, M.BitAssignment.uniform(B0, 4, 4), B0, {})
    rc, out, _ = score_cli("--quant_info", str(qi), "--json")
    assert rc == 0
    got = json.loads(out)
    # 4-bit weights, 8-bit biases: 5,236,192/8 + 31,348/4 = 654,524 + 7,837 = 662,361,
    # + scale/offset overhead 180,636 (see test_uniform_8bit_params_by_hand)
    assert got["params"] == pytest.approx(842_997)
    rc, _, err = score_cli("--quant_info", str(qi), "--num_classes", "10")
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "Logits weight has 1000 bits, the model needs 10" in err


@pytest.mark.parametrize("args, message", [
    (["--weight_bits", "9", "--act_bits", "4"], "--weight_bits 9: bits must be in [2, 8]"),
    (["--weight_bits", "4", "--act_bits", "1"], "--act_bits 1"),
    (["--weight_bits", "32", "--act_bits", "8"], "32 means float"),
    (["--quant_info", "qi.json", "--weight_bits", "4"], "--quant_info and --weight_bits"),
    (["--quant_info", "missing_qi.json"], "missing_qi.json: no such file"),
    (["--img_size", "0"], "--img_size 0"),
    (["--img_size", "99999"], "--img_size 99999"),
    (["--width_multiplier", "inf"], "--width_multiplier inf"),
    (["--depth_multiplier", "nan"], "--depth_multiplier nan"),
    (["--num_classes", "-3"], "--num_classes -3"),
    (["--json", "--per_layer"], "--json and --per_layer"),
])
def test_cli_bad_input(score_cli, args, message):
    rc, out, err = score_cli(*args)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert message in err


def test_cli_exit_code_and_help(score_cli):
    rc, _, _ = score_cli("--swish_bits", "9")
    assert rc == 2
    rc, out, _ = score_cli("--help")
    assert rc == 0
    for flag in ("--img_size", "--num_classes", "--weight_bits", "--act_bits", "--swish_bits",
                 "--bias_bits", "--quant_info", "--json", "--per_layer", "--no_freebie",
                 "--width_multiplier", "--depth_multiplier"):
        assert flag in out


# --------------------------------------------------------------------------- one entry point

TOY = nets.Network("toy", "toy", (
    nets.Node("stem", "conv", kernel=3, filters=8, stride=2),
    nets.Node("stem/swish", "act", fn="swish"),
    nets.Node("block/dws", "dws", kernel=3),
    nets.Node("block/dws/swish", "act", fn="swish"),
    nets.Node("block/project", "conv", filters=8),
    nets.Node("pool", "gap"),
    nets.Node("logits", "fc", filters=3),
))


def _toy_models(**qcfg):
    from adj_quant.network import FloatNetwork
    from adj_quant.qnetwork import QuantConfig, QuantizedNetwork

    float_model = FloatNetwork(TOY, seed=0)
    return float_model, QuantizedNetwork.from_float(float_model, QuantConfig(**qcfg))


def test_float_biases_count_at_32_bits_without_overhead_by_hand():
    # CONV: 3x3, 2 -> 3 channels. Weights 9*2*3 = 54 at 8 bits: 13.5; overhead 2*3 (weights)
    # + 2*2 (input). Biases: 3 at 8 bits = 0.75 + 2 overhead; float: 3 * 32/32 = 3, none.
    quantized = _floats(M.micronet_layer_counts(CONV, 8, 8, 8))["params"]
    float_bias = _floats(M.micronet_layer_counts(CONV, 8, 8, M.counted_bits(None)))["params"]
    assert (quantized, float_bias) == (13.5 + 6 + 4 + 0.75 + 2, 13.5 + 6 + 4 + 3)
    # adjq: weights 54 * 8/32 = 13.5, biases 3 * bits/32.
    assert _floats(M.adjq_layer_counts(CONV, 8, 8, M.counted_bits(None)))["params"] == 16.5


def test_float_biases_agree_in_config_model_counts_and_quant_info(tmp_path):
    from adj_quant.qnetwork import QuantConfig

    assert QuantConfig(bias_bits=0).quantized_bias_bits is None
    assert QuantConfig(bias_bits=6).quantized_bias_bits == 6
    _, qmodel = _toy_models(bias_bits=0)
    assert all(layer.bias_quant is None for layer in qmodel.layers.values())
    bits = qmodel.bit_assignment()
    assert bits.bias_bits == M.FLOAT_BITS
    for flag in (0, None):
        assert M.BitAssignment.uniform(TOY, 8, 8, bias_bits=flag).bias_bits == M.FLOAT_BITS
    path = str(tmp_path / "quant_info.json")
    QI.save_quant_info(path, bits, TOY, {})
    assert json.loads(Path(path).read_text())["bias_bits"] is None
    assert QI.load_quant_info(path, TOY).bias_bits == M.FLOAT_BITS
    # Against 8-bit biases, each layer's cout biases count 1 - 8/32 more, and 2 overhead less.
    eight = M.micronet_cost(M.BitAssignment.uniform(TOY, 8, 8), 32, arch=TOY)
    floats = M.micronet_cost(M.BitAssignment.uniform(TOY, 8, 8, bias_bits=None), 32, arch=TOY)
    layers = M.network_layers(TOY, 32)
    expected = sum(spec.cout * 0.75 - 2 for spec in layers)
    assert float(floats.params) - float(eight.params) == pytest.approx(expected)
    unset = M.BitAssignment.uniform(TOY, 8, 8)
    unset.bias_bits = None  # None is float wherever bits are counted
    assert M.micronet_cost(unset, 32, arch=TOY).as_floats() == floats.as_floats()


def test_micronet_cost_of_a_float_model_is_its_parameter_count_with_the_freebie():
    float_model, _ = _toy_models()
    layers = M.network_layers(TOY, 32)
    weights_and_biases = sum(spec.weights_per_out_channel * spec.cout + spec.cout
                             for spec in layers)
    counts = M.micronet_cost(float_model, 32)
    assert float(counts.params) == weights_and_biases / 2  # every value 32 bits, 16 with it
    assert float(M.micronet_cost(float_model, 32, freebie=False).params) == weights_and_biases


def test_every_cost_entry_point_gives_the_same_numbers():
    import adj_quant as aq
    from adj_quant.quant_info import average_bits
    from adj_quant.recipe import validation

    float_model, qmodel = _toy_models(weight_bits=4, act_bits=6, swish_bits=0)
    for model in (float_model, qmodel):
        bits = M.bits_of(model)
        official = M.count_micronet(TOY, 32, bits)  # the building blocks, counted directly
        own = M.count_adjq(TOY, 32, bits)
        report = M.cost_report(model, 32)
        assert report.as_dict() == validation.scores(bits, TOY, 32)
        assert (report.params, report.ops, report.score_micronet, report.score_adjq) == (
            float(official.params), float(official.ops), float(official.score),
            float(own.score))
        assert (report.avg_weight_bits, report.avg_act_bits) == average_bits(bits, TOY)
        for style, counts in (("micronet", official), ("adjq", own)):
            assert float(M.micronet_cost(model, 32, style=style).score) == float(counts.score)
            assert report.score(style) == float(counts.score)
    public = aq.micronet_cost(qmodel, img_size=32, style="adjq")
    assert public.score.dtype == tf.float32
    assert float(public.score) == float(tf.cast(M.count_adjq(TOY, 32, qmodel.bit_assignment())
                                                .score, tf.float32))


def test_is_quantized_tells_the_model_kinds_apart():
    from adj_quant.qnetwork import is_quantized

    float_model, qmodel = _toy_models()
    assert is_quantized(qmodel) and not is_quantized(float_model)
    assert M.bits_of(float_model).is_float() and not M.bits_of(qmodel).is_float()
    with pytest.raises(TypeError, match="needs arch="):
        M.micronet_cost(M.BitAssignment.uniform(TOY, 8, 8), 32)


# --------------------------------------------------------------------------- operations of
# imported networks (docs/metric.md, "Operations beyond the official table")


def test_grouped_conv_by_hand():
    spec = M.LayerSpec("g", "conv", kernel=3, cin=4, cout=4, stride=1, in_hw=2, out_hw=2,
                       has_bias=True, groups=2)
    got = _floats(M.micronet_layer_counts(spec, [2, 4, 6, 8], [4, 4, 8, 8], 8))
    # group 0: inputs 0,1 (a=4) x outputs 0,1 (w=2,4): max 4,4 per input -> 2*8 = 16
    # group 1: inputs 2,3 (a=8) x outputs 2,3 (w=6,8): max 8,8 per input -> 2*16 = 32
    # multiplies = 4 positions * 9 taps * 48 / 32 = 54
    assert got["multiplies"] == pytest.approx(54.0)
    # adds: 9*2 - 1 + 1 bias = 18 per output element, 4*4 elements = 288
    assert got["adds"] == pytest.approx(288.0)
    # params: 9*2 weights per output channel * (2+4+6+8)/32 = 11.25; bias 4*8/32 = 1;
    # overhead: weights 2*4, input 2*4, bias tensor 2 -> 18. Total 30.25
    assert got["params"] == pytest.approx(30.25)


def test_non_square_kernel_by_hand():
    spec = M.LayerSpec("r", "conv", kernel=1, cin=2, cout=1, stride=1, in_hw=3, out_hw=3,
                       has_bias=True, kernel_w=7)
    got = _floats(M.micronet_layer_counts(spec, 32, 32, 32, act_quantizer=False))
    # 1x7: 7 taps * 2 inputs = 14 MACs per output, 9 outputs: 126 multiplies at 32/32;
    # adds 14 - 1 + 1 = 14 per output: 126; params 14 weights + 1 bias
    assert got == pytest.approx({"multiplies": 126.0, "adds": 126.0, "params": 15.0})
    adjq = _floats(M.adjq_layer_counts(spec, 32, 32, 32))
    assert adjq["multiplies"] + adjq["adds"] == pytest.approx(2 * 126.0)


@pytest.mark.parametrize("kind, hw, channels, kernel, multiplies, adds", [
    # relu6(x + 3) / 6: 2 multiplies (relu6, / 6) and 1 add per element; 2*2*3 = 12 elements
    ("hard_sigmoid", 2, 3, 1, 24, 12),
    # gelu: 4 multiplies and 1 add per element
    ("gelu", 2, 3, 1, 48, 12),
    # 3x3 average pool, 2x2 outputs of 3 channels: 8 adds and 1 division per output element
    ("avgpool", 2, 3, 3, 12, 96),
    # layer norm over C = 3 at 4 positions: 2*3 + 3 = 9 multiplies and 3*3 - 1 = 8 adds each
    ("layer_norm", 2, 3, 1, 36, 32),
])
def test_new_element_ops_by_hand(kind, hw, channels, kernel, multiplies, adds):
    got = _floats(M.micronet_element_counts(M.ElementOp(kind, "x", hw, channels, kernel)))
    assert got == pytest.approx({"params": 0.0, "multiplies": multiplies, "adds": adds})
    assert _floats(M.adjq_element_counts(M.ElementOp(kind, "x", hw, channels, kernel))) == {
        "params": 0.0, "multiplies": 0.0, "adds": 0.0}


def test_concat_slice_flatten_cost_nothing_and_shapes():
    from adj_quant.network import Network, Node

    net = Network("tiny", "tiny", (
        Node("a", "conv", kernel=1, filters=4, batch_norm=False),
        Node("b", "conv", ("image",), kernel=3, filters=2, batch_norm=False),
        Node("cat", "concat", ("a", "b")),
        Node("half", "slice", ("cat",), start=2, filters=4),
        Node("pool", "avgpool", kernel=2, stride=2, padding="VALID"),
        Node("flat", "flatten"),
        Node("fc", "fc", filters=5, batch_norm=False)))
    shapes = net.shapes(4)
    assert shapes["cat"].channels == 6 and shapes["half"].channels == 4
    assert shapes["pool"].hw == 2 and shapes["flat"] == shapes["flat"].__class__(1, 16)
    ops = M.element_ops(net, 4)
    assert [op.kind for op in ops] == ["avgpool"]
    counts = M.micronet_cost(M.BitAssignment.uniform(net, 32, 32), 4, arch=net,
                             freebie=False).as_floats()
    # convs: a 16 positions * 3*4 = 192 MACs, b 16*27*2 = 864, fc 16*5 = 80 -> 1136 multiplies
    # avgpool: 4 outputs * 4 channels, 1 division each: 16 -> 1152 multiplies
    assert counts["multiplies"] == pytest.approx(1152.0)
    # adds: a 16*4*(3-1+1) = 192, b 16*2*27 = 864, fc 5*16 = 80, avgpool 16*3 = 48 -> 1184
    assert counts["adds"] == pytest.approx(1184.0)
    # params: 12 + 4 + 54 + 2 + 80 + 5 = 157
    assert counts["params"] == pytest.approx(157.0)


def test_sparsity_is_refused_for_grouped_convs():
    from adj_quant.network import Network, Node

    net = Network("g", "g", (Node("c", "conv", kernel=3, filters=6, groups=3),
                             Node("gap", "gap", keepdims=False),
                             Node("fc", "fc", filters=2, batch_norm=False)))
    bits = M.BitAssignment.uniform(net, 8, 8, sparsity=0.5)
    with pytest.raises(UserError, match="grouped or non-square"):
        M.micronet_cost(bits, 8, arch=net)


def test_fingerprint_is_equal_for_equal_assignments_only():
    """The trainer counts a model once per distinct fingerprint: equal values (numbers,
    arrays or tensors) give one fingerprint; any change of a bit-width or density another."""
    def make(w=(2, 3, 8), density=None, bias=8):
        return M.BitAssignment(weight={"a": np.array(w, np.float32), "b": 4},
                               act={"a": 8, "b": tf.constant([5.0, 6.0])}, swish={"a": 3},
                               bias_bits=bias, density=density or {})
    base = make().fingerprint()
    assert make().fingerprint() == base
    assert M.BitAssignment(weight={"a": tf.constant([2.0, 3.0, 8.0]), "b": 4.0},
                           act={"a": 8, "b": np.array([5, 6])}, swish={"a": 3},
                           bias_bits=8).fingerprint() == base
    assert make(w=(2, 3, 7)).fingerprint() != base
    assert make(bias=None).fingerprint() != base
    assert make(density={"a": np.array([1.0, 0.5, 1.0])}).fingerprint() != base
    assert make(density={"a": np.array([1.0, 0.5, 1.0])}).fingerprint() != make(
        density={"a": np.array([1.0, 0.25, 1.0])}).fingerprint()
    # the same numbers under another scope or in another table are another assignment
    moved = M.BitAssignment(weight={"a": np.array([2, 3, 8]), "b": 4}, act={"a": 8},
                            swish={"a": 3, "b": tf.constant([5.0, 6.0])}, bias_bits=8)
    assert moved.fingerprint() != base
