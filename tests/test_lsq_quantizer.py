"""The LSQ+ baseline quantizer (adj_quant/quantizers/lsq.py, docs/baselines.md): its forward
against numpy, its gradients against hand-derived numbers and against TensorFlow's autodiff
of the same formula, its initialisation, and ``--quantizer lsq`` in the network, the cost,
the checkpoints and the recipe."""

import json
import math

import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY, small_run

from adj_quant import cost as cost_lib
from adj_quant import nets
from adj_quant.checkpoints import ModelSpec, restore_model
from adj_quant.cli import train as train_cli
from adj_quant.errors import UserError
from adj_quant.network import FloatNetwork
from adj_quant.qnetwork import QuantConfig, QuantizedNetwork
from adj_quant.quantizers.lsq import LsqQuantizer, code_range, lsq_quantize, weight_init_step
from adj_quant.recipe import validation

# --------------------------------------------------------------------------- oracles


def numpy_lsq(x, step, offset, bits, signed, axis):
    """The forward formula in numpy (float64): clip(round((x - beta)/s), Q_N, Q_P) s + beta."""
    q_n, q_p = (-2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1) if signed else (0.0, 2.0 ** bits - 1)
    shape = [1] * x.ndim
    shape[axis] = -1
    s = np.asarray(step, np.float64).reshape(shape)
    b = np.zeros_like(s) if offset is None else np.asarray(offset, np.float64).reshape(shape)
    return np.clip(np.round((x - b) / s), q_n, q_p) * s + b


def autodiff_lsq(x, step, offset, bits, signed, axis):
    """The same quantizer in plain TF ops with stop_gradient tricks, differentiated by TF:
    LSQ's gradient scale as ``s g + stop_gradient(s - s g)`` and round straight-through
    after the clip (whose gradient is 1 inside [Q_N, Q_P], 0 outside)."""
    q_n, q_p = code_range(bits, signed)
    shape = [1] * len(x.shape)
    shape[axis] = -1
    s = tf.reshape(step, shape)
    b = tf.zeros_like(s) if offset is None else tf.reshape(offset, shape)
    n = float(np.prod(x.shape)) / float(np.prod(s.shape))
    g = 1.0 / math.sqrt(n * q_p)
    s = s * g + tf.stop_gradient(s - s * g)
    v = tf.clip_by_value((x - b) / s, q_n, q_p)
    v = v + tf.stop_gradient(tf.round(v) - v)
    return v * s + b


def _spread(rng, shape, scale=3.0):
    """Random values (a tie of round() or a code bound has probability zero)."""
    return rng.uniform(-scale, scale, shape)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_activation_forward_equals_numpy_per_channel(bits):
    rng = np.random.default_rng(bits)
    x = _spread(rng, [8, 4, 4, 4])
    # channel ranges [beta, beta + (2^b - 1) s]: [-1, 0.5], [-0.5, 1.9], [-2, 1], [0.5, 1.4]
    step = np.array([0.5, 0.8, 1.0, 0.3]) * 3.0 / (2 ** bits - 1)
    offset = np.array([-1.0, -0.5, -2.0, 0.5])
    got = lsq_quantize(tf.constant(x, tf.float32), step, offset, bits=bits, signed=False)
    want = numpy_lsq(x.astype(np.float32).astype(np.float64), step, offset, bits, False, -1)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    # values below, inside and above the range all occur in every channel
    v = (x - offset) / step
    assert ((v < 0).any(axis=(0, 1, 2)) & (v > 2 ** bits - 1).any(axis=(0, 1, 2))).all()
    # every output of channel c is on its grid beta_c + k s_c, k = 0 .. 2^b - 1
    k = (got.numpy() - offset) / step
    assert np.allclose(k, np.round(k), atol=1e-3) and k.min() > -1e-3 and k.max() < 2 ** bits


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_forward_equals_numpy_on_the_depthwise_axis(bits):
    rng = np.random.default_rng(10 + bits)
    w = _spread(rng, [3, 3, 5, 1], 0.5)
    step = np.array([0.01, 0.05, 0.1, 0.2, 0.4])
    got = lsq_quantize(tf.constant(w, tf.float32), step, bits=bits, signed=True, axis=2)
    want = numpy_lsq(w.astype(np.float32).astype(np.float64), step, None, bits, True, 2)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    codes = np.round(got.numpy() / step.reshape([1, 1, -1, 1]))
    assert codes.min() >= -2 ** (bits - 1) and codes.max() <= 2 ** (bits - 1) - 1


def test_hand_computed_forward_values():
    x = tf.constant([[-1.0, 0.3], [0.26, 5.0], [0.7, -0.2]])  # [N=3, C=2], axis -1
    out = lsq_quantize(x, [0.25, 0.5], [0.0, -0.5], bits=2, signed=False)
    # channel 0 (s 0.25, beta 0): v = -4, 1.04, 2.8 -> codes 0, 1, 3 -> 0, 0.25, 0.75
    # channel 1 (s 0.5, beta -0.5): v = 1.6, 11, 0.6 -> codes 2, 3, 1 -> 0.5, 1.0, 0.0
    np.testing.assert_allclose(out.numpy(), [[0.0, 0.5], [0.25, 1.0], [0.75, 0.0]], atol=1e-6)


def test_other_dtypes_compute_in_float32():
    x = np.array([[0.1, -0.7, 2.0]], np.float32)
    want = lsq_quantize(tf.constant(x), 0.25, bits=3, signed=True).numpy()
    got = lsq_quantize(tf.constant(x, tf.float16), 0.25, bits=3, signed=True)
    assert got.dtype == tf.float16
    np.testing.assert_allclose(got.numpy(), want, atol=1e-3)


# --------------------------------------------------------------------------- gradients


def _grads(fn, x, step, offset, dy=None):
    x, step = tf.constant(x, tf.float32), tf.constant(step, tf.float32)
    offset = None if offset is None else tf.constant(offset, tf.float32)
    watched = [x, step] + ([] if offset is None else [offset])
    with tf.GradientTape() as tape:
        tape.watch(watched)
        out = fn(x, step, offset)
    return [g.numpy() for g in tape.gradient(out, watched, output_gradients=dy)]


def test_activation_gradients_equal_hand_derived_values():
    """Two channels, 3 elements each (N = 3), 2 bits unsigned (Q_N = 0, Q_P = 3), so the
    gradient scale is g = 1/sqrt(N Q_P) = 1/sqrt(9) = 1/3.

    channel 0, s = 0.25, beta = 0:
        x = -1.0: v = -4    below:  dx 0, ds Q_N = 0,               dbeta 1
        x = 0.26: v = 1.04  inside: dx 1, ds round(v) - v = -0.04,   dbeta 0
        x = 0.7:  v = 2.8   inside: dx 1, ds 3 - 2.8 = 0.2,          dbeta 0
        ds = g (0 - 0.04 + 0.2) = 0.16/3 = 0.053333,  dbeta = 1
    channel 1, s = 0.5, beta = -0.5:
        x = 0.3:  v = 1.6   inside: dx 1, ds 2 - 1.6 = 0.4,          dbeta 0
        x = 5.0:  v = 11    above:  dx 0, ds Q_P = 3,                dbeta 1
        x = -0.2: v = 0.6   inside: dx 1, ds 1 - 0.6 = 0.4,          dbeta 0
        ds = g (0.4 + 3 + 0.4) = 3.8/3 = 1.266667,  dbeta = 1
    """
    x = [[-1.0, 0.3], [0.26, 5.0], [0.7, -0.2]]
    dx, ds, dbeta = _grads(lambda x, s, b: lsq_quantize(x, s, b, bits=2, signed=False),
                           x, [0.25, 0.5], [0.0, -0.5])
    np.testing.assert_allclose(dx, [[0, 1], [1, 0], [1, 1]])
    np.testing.assert_allclose(ds, [0.16 / 3, 3.8 / 3], rtol=1e-5)
    np.testing.assert_allclose(dbeta, [1.0, 1.0])


def test_weight_gradients_equal_hand_derived_values():
    """One output channel of 3 weights (N = 3), 2 bits signed (Q_N = -2, Q_P = 1), s = 0.5,
    so g = 1/sqrt(3 * 1):

        w = -1.3: v = -2.6 below:  dw 0, ds Q_N = -2
        w = 0.2:  v = 0.4  inside: dw 1, ds round(0.4) - 0.4 = -0.4
        w = 0.9:  v = 1.8  above:  dw 0, ds Q_P = 1
        ds = (-2 - 0.4 + 1)/sqrt(3) = -1.4/sqrt(3) = -0.808290

    with an upstream gradient of 1; with dy = (2, -1, 3) every term is weighted:
        dw = (0, -1, 0), ds = (2 (-2) + (-1)(-0.4) + 3 (1))/sqrt(3) = -0.6/sqrt(3)
    """
    w = [[-1.3], [0.2], [0.9]]  # [cin = 3, cout = 1]
    fn = lambda w, s, b: lsq_quantize(w, s, bits=2, signed=True)  # noqa: E731
    dw, ds = _grads(fn, w, [0.5], None)
    np.testing.assert_allclose(dw, [[0], [1], [0]])
    np.testing.assert_allclose(ds, [-1.4 / math.sqrt(3)], rtol=1e-5)
    dw, ds = _grads(fn, w, [0.5], None, dy=tf.constant([[2.0], [-1.0], [3.0]]))
    np.testing.assert_allclose(dw, [[0], [-1], [0]])
    np.testing.assert_allclose(ds, [-0.6 / math.sqrt(3)], rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_gradients_equal_autodiff_of_the_formula(bits, signed):
    """Per channel on a batch of activations (N = B H W) or a conv weight (N = k k cin),
    with a random upstream gradient."""
    rng = np.random.default_rng(bits + 20 * signed)
    shape = [3, 3, 6, 4] if signed else [5, 4, 4, 4]
    x = _spread(rng, shape, 2.0).astype(np.float32)
    step = rng.uniform(0.02, 0.6, [4]).astype(np.float32)
    offset = None if signed else rng.uniform(-1.0, 0.5, [4]).astype(np.float32)
    dy = tf.constant(rng.normal(size=shape), tf.float32)
    ours = _grads(lambda x, s, b: lsq_quantize(x, s, b, bits=bits, signed=signed),
                  x, step, offset, dy)
    oracle = _grads(lambda x, s, b: autodiff_lsq(x, s, b, bits, signed, -1), x, step, offset,
                    dy)
    for got, want in zip(ours, oracle):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(ours[1]).max() > 0  # the step does learn


def test_gradient_scale_follows_the_elements_per_channel():
    """The same channel values repeated k times: N grows k-fold, the summed step gradient
    k-fold, so the scaled gradient grows by k / sqrt(k) = sqrt(k)."""
    x = np.array([[0.26], [0.7], [5.0]], np.float32)
    fn = lambda x, s, b: lsq_quantize(x, s, b, bits=2, signed=False)  # noqa: E731
    one = _grads(fn, x, [0.25], [0.0])[1]
    four = _grads(fn, np.tile(x, [4, 1]), [0.25], [0.0])[1]
    np.testing.assert_allclose(four, 2.0 * one, rtol=1e-5)


def test_a_step_below_the_bound_still_quantizes_and_learns():
    x = tf.constant([[0.0, 1e-9, 3e-8]])
    step = tf.constant(-0.5)
    with tf.GradientTape() as tape:
        tape.watch(step)
        out = lsq_quantize(tf.transpose(x), step, bits=4, signed=True)
    assert np.all(np.isfinite(out.numpy()))
    assert np.isfinite(tape.gradient(out, step).numpy())


# --------------------------------------------------------------------------- the module


def test_activation_init_from_the_calibrated_range():
    q = LsqQuantizer("t/act", 3, init_bits=4)
    q.set_range([-1.0, 0.0, 2.0], [2.0, 1.5, 2.0])
    np.testing.assert_allclose(q.step.numpy(), [3 / 15, 1.5 / 15, 1e-6], rtol=1e-6)
    np.testing.assert_allclose(q.offset.numpy(), [-1.0, 0.0, 2.0])
    np.testing.assert_allclose(q.init_min.numpy(), [-1.0, 0.0, 2.0])
    low, width = q.adjusted_range()
    np.testing.assert_allclose(low.numpy(), [-1.0, 0.0, 2.0])
    np.testing.assert_allclose((low + width).numpy()[:2], [2.0, 1.5], rtol=1e-6)
    np.testing.assert_array_equal(q.bits().numpy(), [4, 4, 4])
    # the calibrated range is represented exactly: its ends are grid points
    x = tf.constant([[-1.0, 0.0, 2.0], [2.0, 1.5, 2.0]])
    np.testing.assert_allclose(q(x).numpy(), x.numpy(), atol=1e-6)


def test_weight_init_is_lsq_plus_three_sigma():
    rng = np.random.default_rng(3)
    w = rng.normal(0.1, 0.2, [3, 3, 8, 5]).astype(np.float32)
    q = LsqQuantizer("t/w", 5, init_bits=4, signed=True)
    q.init_from_weights(w)
    flat = w.reshape(-1, 5).astype(np.float64)
    mean, std = flat.mean(0), flat.std(0)
    want = np.maximum(np.abs(mean - 3 * std), np.abs(mean + 3 * std)) / 8
    np.testing.assert_allclose(q.step.numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(weight_init_step(w, 4, -1), want, rtol=1e-5)
    assert q.offset is None and q.bits_variables() == []
    # depthwise: channels on axis 2
    dws = rng.normal(0, 0.3, [3, 3, 5, 1])
    d = dws[:, :, :, 0].reshape(9, 5)
    want = np.maximum(np.abs(d.mean(0) - 3 * d.std(0)), np.abs(d.mean(0) + 3 * d.std(0))) / 8
    np.testing.assert_allclose(weight_init_step(dws, 4, 2), want, rtol=1e-5)


def test_signed_range_init_represents_the_range():
    q = LsqQuantizer("t/b", 1, init_bits=8, signed=True)
    q.set_range([-0.3], [1.27])
    np.testing.assert_allclose(q.step.numpy(), [0.01], rtol=1e-6)
    np.testing.assert_allclose(q(tf.constant([-0.3, 1.27, 0.5])).numpy(), [-0.3, 1.27, 0.5],
                               atol=1e-6)


def test_what_does_not_apply_to_lsq_is_one_line():
    for kwargs, words in [(dict(bits_trainable=True), "fixed bits"),
                          (dict(live_range=True), "live range")]:
        with pytest.raises(UserError, match=words) as info:
            LsqQuantizer("t/q", 2, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="signed"):
        LsqQuantizer("t/a", 2).init_from_weights(np.zeros([3, 2]))
    with pytest.raises(UserError, match="2 to 8"):
        lsq_quantize(tf.ones([2]), 1.0, bits=9, signed=True)
    with pytest.raises(UserError, match="fixed bits"):
        QuantConfig(quantizer="lsq", bits_trainable=True)
    with pytest.raises(UserError, match="adjq, lsq"):
        QuantConfig(quantizer="lsq+")


def test_lsq_with_bits_trainable_is_one_line_naming_both_flags(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        train_cli.main(["--stage", "qat8", "--quantizer", "lsq", "--bits_trainable",
                        "--run_dir", str(tmp_path / "run")])
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "--quantizer lsq" in lines[0] and "--bits_trainable" in lines[0]
    assert "--quantizer adjq" in lines[0]  # the fix
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- in the network


@pytest.fixture(scope="module")
def tiny():
    net = nets.build("efficientnet_b0", num_classes=10, width_multiplier=0.25,
                     depth_multiplier=0.25)
    float_model = FloatNetwork(net, seed=0)
    images = tf.random.stateless_uniform([8, 32, 32, 3], seed=[0, 1])
    labels = tf.constant(np.arange(8) % 10, tf.int64)
    # Batch-norm statistics of real batches (as tests/test_qnetwork.py), so that the folded
    # network has activations of a trained network's scale and nonzero biases.
    for layer in float_model.layers.values():
        if layer.bn is not None:
            layer.bn.momentum = 0.0
    float_model(images, training=True)
    return float_model, images, labels


def _lsq_model(float_model, images, **kwargs):
    qcfg = QuantConfig(weight_bits=4, act_bits=4, swish_bits=0, quantizer="lsq", **kwargs)
    model = QuantizedNetwork.from_float(float_model, qcfg)
    model.calibrate_activations([images], progress=False)
    return model


def test_the_network_gets_lsq_quantizers_initialised_from_calibration(tiny):
    float_model, images, _ = tiny
    model = _lsq_model(float_model, images)
    quants = model.quantizers()
    assert quants and all(isinstance(q, LsqQuantizer) for q in quants.values())
    assert model.bits_variables() == []
    for name, q in quants.items():
        signed = name.endswith(("/weights", "/biases"))
        assert q.signed == signed and (q.offset is None) == signed
    layer = model.layers["expanded_conv/dws"]
    np.testing.assert_allclose(layer.weight_quant.step.numpy(),
                               weight_init_step(layer.weights.numpy(), 4, 2), rtol=1e-6)
    act = layer.act_quant
    np.testing.assert_allclose(act.offset.numpy(), act.init_min.numpy())
    np.testing.assert_allclose(act.step.numpy(), np.maximum(
        (act.init_max.numpy() - act.init_min.numpy()) / 15, 1e-6), rtol=1e-5)
    # a thresholds file round trip keeps the LSQ+ weight init
    other = QuantizedNetwork(float_model.arch, model.qcfg)
    for scope, layer in other.layers.items():
        layer.load_float(float_model.layers[scope])
    other.set_thresholds(model.thresholds())
    for name, q in other.quantizers().items():
        np.testing.assert_allclose(q.step.numpy(), quants[name].step.numpy(), rtol=1e-6)
    logits = model(images)
    assert logits.shape == (8, 10) and np.all(np.isfinite(logits.numpy()))


def test_one_training_step_moves_the_lsq_variables(tiny):
    """A step of the recipe's optimizer on other images than the calibration batch moves
    every step (each has elements inside its range) and offsets (elements outside)."""
    from adj_quant import training_rules as rules

    float_model, images, labels = tiny
    model = _lsq_model(float_model, images[:4])
    steps = [q.step for q in model.quantizers().values()]
    offsets = [q.offset for q in model.quantizers().values() if q.offset is not None]
    ids = {id(v) for v in model.trainable_variables}
    assert all(id(v) in ids for v in steps + offsets)  # the trainer's weight_vars hold them
    before = [v.numpy().copy() for v in steps + offsets]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels[4:], model(images[4:], training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
    rules.Adam(model.trainable_variables, "adam").apply(grads, model.trainable_variables, 1e-5)
    moved = [not np.array_equal(b, v.numpy()) for b, v in zip(before, steps + offsets)]
    # every step moves but those of the all-zero biases (SE, logits: code 0, no gradient)
    zero = [bool(np.all(q.init_min.numpy() == q.init_max.numpy()))
            for q in model.quantizers().values()]
    assert [m for m, z in zip(moved, zero) if not z] == [True] * (len(steps) - sum(zero))
    assert 0 < sum(zero) < len(steps) // 4
    assert sum(moved[len(steps):]) >= len(offsets) // 2
    assert np.all(np.isfinite(model(images).numpy()))


def test_the_cost_counts_the_fixed_bits_like_the_adjq_model(tiny):
    float_model, images, _ = tiny
    lsq = _lsq_model(float_model, images)
    adjq = QuantizedNetwork.from_float(float_model, QuantConfig(4, 4, 0))
    bits = lsq.bit_assignment()
    assert all(np.all(np.asarray(b) == 4) for b in bits.weight.values())
    assert all(np.all(np.asarray(b) == 4) for s, b in bits.act.items()
               if not float_model.arch.is_stem(float_model.arch.node(s)))
    assert all(np.all(np.asarray(b) == 4) for b in bits.swish.values())
    ours = validation.scores(bits, lsq.arch, 224)
    assert ours == validation.scores(adjq.bit_assignment(), adjq.arch, 224)
    assert ours["avg_weight_bits"] == 4.0 and ours["avg_act_bits"] == 4.0
    counts = cost_lib.count_micronet(lsq.arch, 224, bits)
    assert float(counts.score) == pytest.approx(ours["score_micronet"])


def test_checkpoint_and_spec_round_trip(tiny, tmp_path):
    float_model, images, _ = tiny
    model = _lsq_model(float_model, images)
    for q in model.quantizers().values():
        q.step.assign(q.step * 1.5)
    spec = ModelSpec("quant", model.arch, model.qcfg)
    data = json.loads(json.dumps(spec.to_json()))
    assert data["quant"]["quantizer"] == "lsq"
    prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    rebuilt = ModelSpec.from_json(data).build()
    restore_model(rebuilt, prefix)
    np.testing.assert_allclose(rebuilt(images).numpy(), model(images).numpy(), atol=1e-5)
    # a spec written before --quantizer existed is the adjustable quantizer
    old = {**data, "quant": {k: v for k, v in data["quant"].items() if k != "quantizer"}}
    assert ModelSpec.from_json(old).quant.quantizer == "adjq"
    # an LSQ checkpoint is not an adjq model's
    adjq = ModelSpec.from_json(old).build()
    with pytest.raises(UserError, match="does not match the model"):
        restore_model(adjq, prefix)


# --------------------------------------------------------------------------- the recipe


@pytest.mark.slow
def test_qat8_finetune_and_eval_with_lsq(tmp_path, capsys):
    """pretrain (briefly) -> calibrate -> qat8 --quantizer lsq at 4/4 bits -> finetune ->
    eval: the checkpoints hold LSQ models at the fixed bits, and the training moved them."""
    from adj_quant.checkpoints import resolve_checkpoint
    from adj_quant.cli import evaluate as eval_cli

    run, train, small = small_run(tmp_path)
    lsq = ["--quantizer", "lsq", "--weight_bits", "4", "--act_bits", "4", "--swish_bits", "0"]
    train("qat8", *lsq, "--max_epoch", "0.2", "--lr", "1e-3", "--lr_fixed")
    qat8 = json.load(open(f"{run}/qat8/result.json"))
    assert qat8["avg_weight_bits"] == 4.0 and qat8["avg_act_bits"] == 4.0
    spec = json.load(open(f"{run}/qat8/model_spec.json"))
    assert spec["quant"]["quantizer"] == "lsq" and not spec["quant"]["bits_trainable"]
    # the trained steps differ from their initialisation
    model = ModelSpec.from_json(spec).build()
    restore_model(model, resolve_checkpoint(f"{run}/qat8", "qat8"))
    start = QuantizedNetwork.from_float(restore_float(run), model.qcfg)
    start.load_thresholds(f"{run}/calibrate/initial_thresholds.json")
    trained, init = model.quantizers(), start.quantizers()
    assert any(not np.allclose(trained[n].step.numpy(), init[n].step.numpy()) for n in trained)
    # finetune from the LSQ checkpoint keeps the quantizer (the digits config's adjustable
    # table would ask for trainable bits, so the recipe's adjustable stage is skipped)
    train("finetune", "--ckpt_path", f"{run}/qat8", "--max_epoch", "0.1")
    assert json.load(open(f"{run}/finetune/model_spec.json"))["quant"]["quantizer"] == "lsq"
    capsys.readouterr()
    eval_cli.main(["--ckpt_path", f"{run}/finetune", *TINY, *small, "--json", "--output",
                   str(tmp_path / "eval")])
    result = json.loads(capsys.readouterr().out)
    assert result["avg_weight_bits"] == 4.0 and result["avg_act_bits"] == 4.0
    # an adjq qat8 refuses the LSQ checkpoint with one line naming the fix
    with pytest.raises(SystemExit):
        train("qat8", "--ckpt_path", f"{run}/qat8", "--run_dir", str(tmp_path / "other"))
    err = capsys.readouterr().err
    assert "--quantizer lsq" in err and err.count("error:") == 1


def restore_float(run: str) -> FloatNetwork:
    from adj_quant.checkpoints import load_spec, resolve_checkpoint

    path = resolve_checkpoint(f"{run}/pretrain", "pretrain")
    model = load_spec(path).build()
    restore_model(model, path, allow_missing=())
    return model
