"""Channels that pruning removed are left out of the exported graph.

A small MBConv block with squeeze-and-excitation. The masks remove three channels of the
expansion (so the depthwise channels, the SE gate channels and the projection's input
channels that only they fed or read have no use), one channel of the SE reduction, and one
output channel of the projection (kept: the residual sum's other term is live there).
Oracles: the channel sets worked out by hand; the same network exported without removal,
in TensorFlow and in the LiteRT interpreter; the flatbuffer's weight shapes.
"""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.lite.python import schema_util
from tensorflow.lite.tools import flatbuffer_utils

from adj_quant import tflite_export as TE
from adj_quant import tflite_runner as TR
from adj_quant.checkpoints import ModelSpec
from adj_quant.network import FloatNetwork, Network, Node
from adj_quant.qnetwork import QuantConfig, QuantizedNetwork

NET = Network("se", "se", (
    Node("Conv", "conv", kernel=3, filters=8, stride=2), Node("Conv/swish", "act", fn="swish"),
    Node("block/expand", "conv", filters=16), Node("block/expand/swish", "act", fn="swish"),
    Node("block/dws", "dws", kernel=3), Node("block/dws/swish", "act", fn="swish"),
    Node("block/se/pool", "gap", keepdims=True),
    Node("block/se/reduce", "conv", filters=4), Node("block/se/reduce/swish", "act", fn="swish"),
    Node("block/se/expand", "conv", filters=16),
    Node("block/se/gate", "act", fn="sigmoid"),
    Node("block/se/scale", "mul", inputs=("block/dws/swish", "block/se/gate")),
    Node("block/project", "conv", filters=8),
    Node("block/add", "add", inputs=("block/project", "Conv/swish")),
    Node("pool", "gap", keepdims=False), Node("Logits", "fc", filters=10, batch_norm=False)))
GONE_EXPAND = [2, 5, 11]
LEFT_16 = [c for c in range(16) if c not in GONE_EXPAND]
LINEAR = {3: "conv", 4: "dws", 9: "fc"}  # BuiltinOperator codes


@pytest.fixture(scope="module")
def pruned():
    rng = np.random.default_rng(3)
    model = QuantizedNetwork.from_float(FloatNetwork(NET, seed=3), QuantConfig(pruned=True))
    for layer in model.layers.values():  # folded batch norms shift every channel
        layer.biases.assign(rng.uniform(-0.3, 0.3, layer.biases.shape).astype(np.float32))
    model.calibrate_weights()
    images = rng.uniform(0, 1, (32, 16, 16, 3)).astype(np.float32)
    model.calibrate_activations([images], progress=False)

    def remove(scope, channels):
        mask = model.layers[scope].mask.numpy()
        mask[..., channels] = 0
        model.layers[scope].mask.assign(mask)

    remove("block/expand", GONE_EXPAND)
    remove("block/se/reduce", [0])
    remove("block/project", [1])
    return model, images


def _net(model, remove=True, quantization="adjustable"):
    net = TE.export_net(model, ModelSpec("quant", NET, model.qcfg), quantization)
    removed = TE.remove_channels(net, 16) if remove else 0
    return net, removed


def test_the_channels_left_are_those_worked_out_by_hand(pruned):
    model, _ = pruned
    net, _ = _net(model, remove=False)
    got = TE.carried_channels(NET, net.layers, 16)
    assert got["Conv"] == (None, None)  # feeds the residual sum
    assert got["block/expand"][0] is None and list(got["block/expand"][1]) == LEFT_16
    assert list(got["block/dws"][1]) == LEFT_16
    # The SE reduction reads the pooled block channels; its channel 0 is gone.
    assert list(got["block/se/reduce"][0]) == LEFT_16
    assert list(got["block/se/reduce"][1]) == [1, 2, 3]
    # The gate of a removed channel multiplies a 0: nothing reads it.
    assert list(got["block/se/expand"][0]) == [1, 2, 3]
    assert list(got["block/se/expand"][1]) == LEFT_16
    assert list(got["block/project"][0]) == LEFT_16
    # Projection channel 1 is 0, but the residual sum's other term is not: it stays.
    assert got["block/project"][1] is None
    assert got["Logits"] == (None, None)


def test_the_graph_without_them_computes_the_same_logits(pruned):
    model, images = pruned
    full, _ = _net(model, remove=False)
    small, removed = _net(model)
    def size(net):
        return sum(w.size for _, _, w, _ in net.layers.values())
    assert removed == size(full) - size(small) > 0
    assert small.layers["block/dws"][2].shape == (3, 3, 13, 1)
    assert small.layers["block/project"][2].shape == (1, 1, 13, 8)
    want = TE.inference_module(full, 16).serve(tf.constant(images))["logits"].numpy()
    got = TE.inference_module(small, 16).serve(tf.constant(images))["logits"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _shapes(data: bytes) -> list:
    fb = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    graph = fb.subgraphs[0]
    return [list(graph.tensors[op.inputs[1]].shape) for op in graph.operators
            if schema_util.get_builtin_code_from_operator_code(
                fb.operatorCodes[op.opcodeIndex]) in LINEAR]


def test_the_interpreter_runs_the_smaller_file_to_the_same_logits(pruned, tmp_path):
    model, images = pruned
    outputs, sizes = {}, {}
    for name, remove in (("full", False), ("removed", True)):
        net, _ = _net(model, remove)
        data, _ = TE.snap_to_learned_levels(
            TE.convert(TE.inference_module(net, 16), "adjustable", images), model, net)
        path = tmp_path / f"{name}.tflite"
        path.write_bytes(data)
        sizes[name] = len(data)
        outputs[name] = TR.TFLiteRunner(str(path), batch=len(images))(images)
        if remove:
            # OHWI (TFLite's layout): expand 13 outputs, dws 13 channels, SE reduce 3 of 4
            # outputs reading 13, SE expand 13 outputs reading 3, project reading 13.
            assert _shapes(data)[1:6] == [[13, 1, 1, 8], [1, 3, 3, 13], [3, 1, 1, 13],
                                          [13, 1, 1, 3], [8, 1, 1, 13]]
    assert sizes["removed"] < sizes["full"]
    want = TE.inference_module(_net(model, False)[0], 16).serve(
        tf.constant(images))["logits"].numpy()
    step = np.ptp(want) / 255  # one step of the int8 output
    worst_full = np.abs(outputs["full"] - want).max()
    # The same integer graph minus zeros: within one output step of the full file.
    assert np.abs(outputs["removed"] - outputs["full"]).max() <= step + 1e-6
    assert np.abs(outputs["removed"] - want).max() <= worst_full + step + 1e-6
