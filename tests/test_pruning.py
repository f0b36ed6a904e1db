"""Gradual magnitude pruning of a quantized network: exact zeros, removed channels, the
counts they give, the schedule, the checkpoint, and the options' bad values."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import TOY_NET

from adj_quant import cost as M
from adj_quant.errors import UserError
from adj_quant.network import FloatNetwork
from adj_quant.qnetwork import QuantConfig, QuantizedLayer, QuantizedNetwork
from adj_quant.recipe.config import resolve
from adj_quant.recipe.trainer import pruned_best_key
from adj_quant.sparsity import GradualPruner, magnitude_mask

NET = TOY_NET
IMAGES = np.random.default_rng(0).uniform(0, 1, (4, 16, 16, 3)).astype(np.float32)


def _model(pruned=True, seed=0):
    qnet = QuantizedNetwork.from_float(FloatNetwork(NET), QuantConfig(pruned=pruned), seed=seed)
    qnet.calibrate_activations([IMAGES], 4, progress=False)
    return qnet


def test_pruned_weights_are_exactly_zero_and_a_removed_channel_loses_its_bias():
    model = _model()
    layer = model.layers["block/project"]
    mask = magnitude_mask(layer.weights, 0.6).numpy()
    mask[..., 3] = 0  # output channel 3 removed
    layer.mask.assign(mask)
    weights, biases = layer.quantized_weights()
    assert np.all(weights.numpy()[mask == 0] == 0.0)
    plain_w, plain_b = (layer.weight_quant(layer.weights).numpy(),
                        layer.bias_quant(layer.biases).numpy())
    np.testing.assert_array_equal(weights.numpy(), plain_w * mask)
    want_b = plain_b.copy()
    want_b[3] = 0.0
    np.testing.assert_array_equal(biases.numpy(), want_b)
    # The forward pass uses them: the output channel 3 of the conv is exactly 0.
    x = tf.constant(np.random.default_rng(1).normal(size=(2, 8, 8, 8)).astype(np.float32))
    np.testing.assert_array_equal(layer(x).numpy()[..., 3], 0.0)


def test_a_depthwise_channel_whose_input_is_removed_is_removed_with_its_bias(monkeypatch):
    """The score removes a depthwise channel whose only input channel is removed (no kept
    tap reads a live channel), and its consumers' input channel with it; the network must
    compute it so: the channel loses its bias and is exactly 0."""
    model = _model()
    dws = model.layers["block/dws"]
    dws.biases.assign(np.linspace(-0.35, 0.35, 8).astype(np.float32))  # a folded BN's shift
    model.calibrate_weights()
    assert np.all(dws.quantized_weights()[1].numpy() != 0)  # the bias alone would survive
    conv = model.layers["Conv"]
    mask = conv.mask.numpy()
    mask[..., 3] = 0  # the stem's output channel 3, the depthwise's input channel 3
    conv.mask.assign(mask)
    counted = M.input_liveness(NET, model.bit_assignment(), 16)
    np.testing.assert_array_equal(counted["block/dws"], [1, 1, 1, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(counted["block/project"], [1, 1, 1, 0, 1, 1, 1, 1])
    outputs = {}
    original = QuantizedLayer.__call__

    def recording(self, x, training=False, alive_out=None):
        outputs[self.scope] = original(self, x, training, alive_out)
        return outputs[self.scope]

    monkeypatch.setattr(QuantizedLayer, "__call__", recording)
    model(IMAGES)
    dws_out = outputs["block/dws"].numpy()
    assert np.all(dws_out[..., 3] == 0.0)
    assert np.all(np.any(dws_out[..., [0, 1, 2, 4, 5, 6, 7]] != 0, axis=(0, 1, 2)))
    # A dense network keeps every channel.
    dense = _model(pruned=False)
    assert dense.output_liveness() is None


def test_the_counts_follow_the_masks():
    model = _model()
    rng = np.random.default_rng(2)
    for layer in model.layers.values():
        layer.mask.assign((rng.uniform(size=layer.mask.shape) > 0.5).astype(np.float32))
    bits = model.bit_assignment()
    dws = model.layers["block/dws"].mask.numpy()  # [3, 3, C, 1]
    np.testing.assert_allclose(bits.density["block/dws"].numpy(), dws.mean(axis=(0, 1, 3)))
    conv = model.layers["Conv"].mask.numpy()
    np.testing.assert_allclose(bits.density["Conv"].numpy(), conv.mean(axis=(0, 1)))
    # The model's cost is the sparse count of its bits and densities.
    by_hand = M.BitAssignment(bits.weight, bits.act, bits.swish, bits.bias_bits,
                              image_inputs=frozenset({"Conv"}),
                              density={k: v.numpy() for k, v in bits.density.items()})
    got = M.micronet_cost(model, 224).as_floats()
    want = M.micronet_cost(by_hand, 224, arch=NET).as_floats()
    for key in got:
        assert got[key] == pytest.approx(want[key], rel=1e-12)
    dense = M.micronet_cost(_model(pruned=False), 224).as_floats()
    assert got["adds"] < dense["adds"]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_the_pruner_follows_the_schedule(scope):
    model = _model()
    pruner = GradualPruner(model.layers, final=0.6, begin=2, every=2, count=3, scope=scope)
    assert [s for s in range(12) if pruner.due(s)] == [2, 4, 6, 8]
    targets = [pruner.update(s) for s in (2, 4, 6, 8)]
    # From the masks' own sparsity (0) to 0.6: s_f + (s_i - s_f)(1 - k/3)^3.
    np.testing.assert_allclose(targets, [0.6 - 0.6 * (1 - k / 3) ** 3 for k in range(4)])
    masks = {name: layer.mask.numpy() for name, layer in model.layers.items()}
    total = sum(m.size for m in masks.values())
    zeros = sum(int((m == 0).sum()) for m in masks.values())
    if scope == "layer":
        for name, m in masks.items():
            assert int((m == 0).sum()) == int(np.round(0.6 * m.size)), name
    else:
        assert zeros == int(np.round(0.6 * total))
    assert pruner.current_sparsity() == pytest.approx(zeros / total)
    # A pruner that starts later (the next stage) keeps the sparsity the masks have.
    again = GradualPruner(model.layers, final=0.6, begin=0, every=5, count=1, scope=scope)
    assert again.update(0) == pytest.approx(zeros / total)  # where the masks are
    assert float(again.initial) == pytest.approx(zeros / total)
    assert again.update(5) == pytest.approx(0.6)


def test_masks_and_the_schedule_start_are_in_the_checkpoint(tmp_path):
    model = _model()
    pruner = GradualPruner(model.layers, final=0.5, begin=0, every=1, count=1)
    pruner.update(1)
    path = tf.train.Checkpoint(model=model, prune_initial=pruner.initial).write(
        str(tmp_path / "ckpt"))
    other = _model(seed=1)
    other_pruner = GradualPruner(other.layers, final=0.5, begin=0, every=1, count=1)
    tf.train.Checkpoint(model=other, prune_initial=other_pruner.initial).read(path)
    for name, layer in model.layers.items():
        np.testing.assert_array_equal(other.layers[name].mask.numpy(), layer.mask.numpy())
    assert float(other_pruner.initial) == float(pruner.initial) == 0.0
    np.testing.assert_array_equal(other(IMAGES).numpy(), model(IMAGES).numpy())


@pytest.mark.parametrize("flags, stage, message", [
    ({"sparsity": 1.0}, "qat8", "outside [0, 1)"),
    ({"sparsity": -0.5}, "qat8", "--sparsity"),
    ({"sparsity": 0.5, "prune_end": 1.5}, "qat8", "ends the schedule after its stage"),
    ({"sparsity": 0.5, "prune_start": 0.8, "prune_end": 0.5}, "qat8", "must be below"),
    ({"sparsity": 0.5}, "pretrain", "pruning runs in the quantized stages"),
    ({"sparsity": 0.5}, "finetune", "its masks are frozen"),
])
def test_bad_pruning_options_are_one_line(flags, stage, message):
    with pytest.raises(UserError) as err:
        resolve({"dataset": "synthetic", **flags}, stage)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_best_checkpoint_of_a_pruning_stage_has_the_final_sparsity():
    early = {"name": "me1", "top1": 0.98, "pruning_done": False}
    late = {"name": "me9", "top1": 0.90, "pruning_done": True}
    later = {"name": "me10", "top1": 0.92, "pruning_done": True}
    assert max([early, late, later], key=pruned_best_key())["name"] == "me10"
    by_metric = pruned_best_key(lambda e: -e["top1"])  # another rule, still after pruning
    assert max([early, late, later], key=by_metric)["name"] == "me9"
