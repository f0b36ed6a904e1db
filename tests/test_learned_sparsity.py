"""Learned sparsity: the threshold mask's forward and straight-through gradient against
plain-TF autodiff of its sigmoid, the cost's gradient by the chain rule, the frozen masks of
the checkpoint, a stage that learns them and the one after it that keeps them."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import TOY_NET, train_stage

from adj_quant import cost as M
from adj_quant.errors import UserError
from adj_quant.network import FloatNetwork
from adj_quant.qnetwork import QuantConfig, QuantizedNetwork
from adj_quant.recipe.config import resolve
from adj_quant.sparsity import MASK_TEMPERATURE, learned_mask

NET = TOY_NET
IMAGES = np.random.default_rng(0).uniform(0, 1, (4, 16, 16, 3)).astype(np.float32)


def _model(learned=True, seed=0):
    qcfg = QuantConfig(pruned=True, learned_sparsity=learned)
    qnet = QuantizedNetwork.from_float(FloatNetwork(NET), qcfg, seed=seed)
    qnet.calibrate_activations([IMAGES], 4, progress=False)
    return qnet


def test_the_mask_is_the_step_of_the_threshold_by_hand():
    w = np.array([[-0.4, 0.05], [0.2, -0.1]], np.float32)     # mean |w| = 0.1875
    got = learned_mask(w, 1.0).numpy()                          # keeps |w| > 0.1875
    np.testing.assert_array_equal(got, [[1, 0], [1, 0]])
    np.testing.assert_array_equal(learned_mask(w, 0.0).numpy(), np.ones((2, 2)))
    np.testing.assert_array_equal(learned_mask(w, 3.0).numpy(), np.zeros((2, 2)))
    assert set(np.unique(learned_mask(w, 0.6).numpy())) <= {0.0, 1.0}


@pytest.mark.parametrize("t", [0.0, 0.7, 1.5])
def test_the_gradient_is_plain_autodiff_of_the_sigmoid(t):
    rng = np.random.default_rng(1)
    w = tf.constant(rng.normal(size=(3, 3, 4, 5)).astype(np.float32))
    dy = tf.constant(rng.normal(size=w.shape).astype(np.float32))
    threshold = tf.Variable(t)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(w)
        got = tf.reduce_sum(dy * learned_mask(w, threshold))
        scale = tf.stop_gradient(tf.reduce_mean(tf.abs(w)))
        soft = tf.sigmoid((tf.abs(w) / scale - threshold) / MASK_TEMPERATURE)
        want = tf.reduce_sum(dy * soft)
    np.testing.assert_allclose(tape.gradient(got, threshold).numpy(),
                               tape.gradient(want, threshold).numpy(), rtol=1e-5)
    np.testing.assert_allclose(tape.gradient(got, w).numpy(), tape.gradient(want, w).numpy(),
                               rtol=1e-5, atol=1e-7)


def test_only_pointwise_and_fc_layers_get_a_threshold_and_pruned_weights_are_zero():
    model = _model()
    assert {s for s, layer in model.layers.items() if layer.prune_threshold is not None} == {
        "block/project", "Logits"}
    layer = model.layers["block/project"]
    layer.prune_threshold.assign(1.2)
    weights, _ = layer.quantized_weights()
    mask = (np.abs(layer.weights.numpy()) > 1.2 * np.mean(np.abs(layer.weights.numpy())))
    assert 0 < mask.mean() < 1
    np.testing.assert_array_equal(weights.numpy(),
                                  layer.weight_quant(layer.weights).numpy() * mask)


def test_the_cost_gradient_is_the_chain_rule_through_the_densities():
    model = _model()
    for scope in ("block/project", "Logits"):
        model.layers[scope].prune_threshold.assign(0.8)
    t = model.layers["block/project"].prune_threshold
    with tf.GradientTape() as tape:
        score = M.micronet_cost(model, 224).score
    got = tape.gradient(score, t).numpy()
    assert got < 0  # a higher threshold prunes more and lowers the score
    # The oracle: d score / d density with the densities as plain tensors, times
    # d density / d t of the sigmoid by autodiff.
    bits = model.bit_assignment()
    density = {k: tf.constant(v.numpy()) for k, v in bits.density.items()}
    with tf.GradientTape() as tape:
        tape.watch(density["block/project"])
        by_hand = M.BitAssignment(bits.weight, bits.act, bits.swish, bits.bias_bits,
                                  image_inputs=frozenset({"Conv"}), density=density)
        score_d = M.micronet_cost(by_hand, 224, arch=NET).score
    d_score = tape.gradient(score_d, density["block/project"])
    layer = model.layers["block/project"]
    with tf.GradientTape() as tape:
        scale = tf.reduce_mean(tf.abs(layer.weights))
        soft = tf.sigmoid((tf.abs(layer.weights) / scale - t) / MASK_TEMPERATURE)
        soft_density = tf.reduce_mean(tf.cast(soft, tf.float64), axis=[0, 1])
        chained = tf.reduce_sum(tf.stop_gradient(d_score) * soft_density)
    np.testing.assert_allclose(got, tape.gradient(chained, t).numpy(), rtol=1e-6)


def test_frozen_masks_are_the_thresholds_masks_in_the_checkpoint(tmp_path):
    model = _model()
    for layer in model.layers.values():
        if layer.prune_threshold is not None:
            layer.prune_threshold.assign(1.0)
    model.freeze_masks()
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    kept = _model(learned=False, seed=1)  # the next stage: masks only, no thresholds
    tf.train.Checkpoint(model=kept).read(path).expect_partial()
    for name, layer in model.layers.items():
        np.testing.assert_array_equal(kept.layers[name].mask.numpy(),
                                      layer.current_mask().numpy())
    np.testing.assert_array_equal(kept(IMAGES).numpy(), model(IMAGES).numpy())


@pytest.mark.parametrize("flags, stage, message", [
    ({"learned_sparsity": True, "sparsity": 0.5}, "adjustable", "drop one of them"),
    ({"learned_sparsity": True}, "pretrain", "pruning runs in the quantized stages"),
    ({"learned_sparsity": True}, "finetune", "its masks are frozen"),
])
def test_bad_learned_sparsity_options_are_one_line(flags, stage, message):
    with pytest.raises(UserError) as err:
        resolve({"dataset": "synthetic", **flags}, stage)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_a_stage_learns_sparsity_and_finetune_keeps_its_masks(digits_run, tmp_path):
    import json

    run = tmp_path / "run"
    train_stage(run, "adjustable", "--ckpt_path", str(digits_run / "qat8"),
                "--learned_sparsity", "--max_epoch", "0.3", "--lr_bits", "0.1",
                "--metric", "0.05", "--warm_up_epoch", "0", "--iter_train_freq", "1")
    state = json.load(open(run / "adjustable" / "checkpoints.json"))
    sparsity = [e["sparsity"] for e in state["checkpoints"] if "sparsity" in e]
    # At a threshold of 0 no weight is pruned: the metric term raised the thresholds.
    assert sparsity[-1] > 0
    for name in (state["latest"], state["best"]):  # each checkpoint's masks: its thresholds'
        reader = tf.train.load_checkpoint(str(run / "adjustable" / name))
        thresholds = [n for n in reader.get_variable_to_shape_map()
                      if "prune_threshold" in n and "OPTIMIZER" not in n]
        assert thresholds
        for key in thresholds:
            mask = reader.get_tensor(key.replace("prune_threshold", "mask"))
            weights = reader.get_tensor(key.replace("prune_threshold", "weights"))
            t = reader.get_tensor(key)
            want = tf.abs(weights) > t * tf.reduce_mean(tf.abs(weights))
            np.testing.assert_array_equal(mask, want.numpy())
    adjustable = tf.train.load_checkpoint(str(run / "adjustable" / state["best"]))
    train_stage(run, "finetune", "--max_epoch", "0.2", "--teacher_ckpt",
                str(digits_run / "pretrain"))
    final = json.load(open(run / "finetune" / "checkpoints.json"))
    finetune = tf.train.load_checkpoint(str(run / "finetune" / final["best"]))
    assert not any("prune_threshold" in n for n in finetune.get_variable_to_shape_map())
    zeros = 0
    for name in thresholds:
        mask = name.replace("prune_threshold", "mask")
        np.testing.assert_array_equal(finetune.get_tensor(mask), adjustable.get_tensor(mask))
        zeros += int((finetune.get_tensor(mask) == 0).sum())
    assert zeros > 0
