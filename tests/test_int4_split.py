"""A conv whose channels do not all fit INT4 exports as two ops, an INT4 one on the channels
that fit and an INT8 one on the others, concatenated and gathered back into order.

The network's stem (whose output feeds the next layer's input fake quant), expansion (feeding
a swish) and projection (feeding a pool, no fake quant) each have channels of 2-4 bits on a
grid around 0 and channels of 8 bits. Oracles: the flatbuffer's tensor types and bytes; the
model's fake-quantized weights; the same network exported unsplit, in TensorFlow and in the
LiteRT interpreter.
"""

import numpy as np
import pytest
import tensorflow as tf
from conftest import set_weight_bits_on_a_centred_range
from tensorflow.lite.python import schema_util
from tensorflow.lite.tools import flatbuffer_utils

from adj_quant import tflite_export as TE
from adj_quant import tflite_runner as TR
from adj_quant.checkpoints import ModelSpec
from adj_quant.network import FloatNetwork, Network, Node
from adj_quant.qnetwork import QuantConfig, QuantizedNetwork

NET = Network("split", "split", (
    Node("Conv", "conv", kernel=3, filters=16, stride=2),
    Node("block/expand", "conv", filters=32), Node("block/expand/swish", "act", fn="swish"),
    Node("block/project", "conv", filters=16), Node("pool", "gap", keepdims=False),
    Node("Logits", "fc", filters=10, batch_norm=False)))
MIXED = ("Conv", "block/expand", "block/project")
INT4, INT8 = 17, 9
CONV, CONCATENATION, GATHER = 3, 2, 36


def _bits(channels: int) -> np.ndarray:
    """2, 3, 4, 8, 2, 3, 4, 8, ...: a quarter of the channels at 8 bits."""
    return np.resize([2, 3, 4, 8], channels)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    rng = np.random.default_rng(1)
    model = QuantizedNetwork.from_float(FloatNetwork(NET, seed=1), QuantConfig(bits_trainable=True))
    images = (rng.integers(0, 256, (48, 32, 32, 3)) / 255).astype(np.float32)
    model.calibrate_activations([images], progress=False)
    for scope in MIXED:
        quant = model.layers[scope].weight_quant
        set_weight_bits_on_a_centred_range(quant, _bits(quant.channels))
    out = tmp_path_factory.mktemp("split")
    result = {"model": model, "images": images}
    for name, split in (("split", True), ("whole", False)):
        net = TE.export_net(model, ModelSpec("quant", NET, model.qcfg), "adjustable")
        net.int4 = TE.int4_steps(model, net, split=split, min_saving=0)
        # the same output fake quants in both (unsplit, these layers would have none)
        net.out_ranges = (TE.output_ranges(net, images) if split
                          else result["split"]["net"].out_ranges)
        data, levels = TE.snap_to_learned_levels(
            TE.convert(TE.inference_module(net, 32), "adjustable", images), model, net)
        path = out / f"{name}.tflite"
        path.write_bytes(data)
        runner = TR.TFLiteRunner(str(path), batch=len(images))
        result[name] = {"bytes": data, "levels": levels, "net": net, "logits": runner(images),
                        "step": runner.output["quantization"][0],
                        "tf": net(tf.constant(images)).numpy()}
    return result


def _ops(data: bytes):
    fb = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    graph = fb.subgraphs[0]
    return fb, graph, [(schema_util.get_builtin_code_from_operator_code(
        fb.operatorCodes[op.opcodeIndex]), op) for op in graph.operators]


def test_split_layers_are_an_int4_and_an_int8_op(toy):
    net = toy["split"]["net"]
    assert [scope for scope in NET.layer_names if net.is_split(scope)] == list(MIXED)
    for scope in MIXED:
        int4, int8 = net.split_channels(scope)
        bits = _bits(len(int4) + len(int8))
        np.testing.assert_array_equal(bits[int4] <= 4, True)
        np.testing.assert_array_equal(bits[int8], 8)
    _, graph, ops = _ops(toy["split"]["bytes"])
    codes = [code for code, _ in ops]
    assert codes.count(CONCATENATION) == len(MIXED) and codes.count(GATHER) == len(MIXED)
    types = [graph.tensors[op.inputs[1]].type for code, op in ops if code == CONV]
    assert sorted(types) == sorted([INT4, INT8] * len(MIXED))  # the FC layer is not a conv
    rows = toy["split"]["levels"]["layers"]
    assert [rows[scope]["container"] for scope in NET.layer_names] == [
        "INT4+INT8"] * 3 + ["INT8"]
    # unsplit, each of these tensors has an 8-bit channel: INT8
    assert {row["container"] for row in toy["whole"]["levels"]["layers"].values()} == {"INT8"}


def test_stored_values_are_the_learned_levels(toy):
    """Every stored integer times its channel scale is the model's fake-quantized weight of
    that channel, in both halves; INT4 halves hold half a byte a weight."""
    fb, graph, ops = _ops(toy["split"]["bytes"])
    net = toy["split"]["net"]
    convs = [op for code, op in ops if code == CONV]
    seen = {scope: [] for scope in MIXED}
    for op, scope in zip(convs, [s for s in MIXED for _ in range(2)]):
        tensor = graph.tensors[op.inputs[1]]
        data = fb.buffers[tensor.buffer].data
        if tensor.type == INT4:
            values = TE.unpack_int4(data, tensor.shape)
            assert len(data) == (int(np.prod(tensor.shape)) + 1) // 2
            channels = net.split_channels(scope)[0]
        else:
            values = np.frombuffer(bytes(data), np.int8).reshape(tensor.shape)
            channels = net.split_channels(scope)[1]
        want = toy["model"].layers[scope].quantized_weights()[0].numpy()
        want = want.transpose(3, 0, 1, 2)[channels]  # HWIO -> OHWI
        scale = np.asarray(tensor.quantization.scale).reshape(-1, 1, 1, 1)
        np.testing.assert_allclose(values * scale, want, rtol=1e-6, atol=1e-9)
        seen[scope].append(tensor.type)
    assert all(sorted(types) == sorted([INT4, INT8]) for types in seen.values())


def test_split_graph_computes_the_unsplit_layer(toy):
    """In TensorFlow, the split graph (the INT4 half fake-quantized to the range its output
    meets next) gives the unsplit graph's logits."""
    np.testing.assert_allclose(toy["split"]["tf"], toy["whole"]["tf"], rtol=1e-5, atol=1e-5)


def test_interpreter_agrees_and_the_file_is_smaller(toy):
    """Measured: the split file's logits are within ~2 output steps of the TensorFlow graph,
    like the unsplit INT8 file's; top-1 agrees on every image. The bound is the unsplit
    file's worst difference plus 1.5 steps (tests/test_int4_export.py's)."""
    split, whole = toy["split"], toy["whole"]
    diff_split = np.abs(split["logits"] - split["tf"]).max() / split["step"]
    diff_whole = np.abs(whole["logits"] - whole["tf"]).max() / whole["step"]
    print(f"\nmax |interpreter - TF| in output steps: split {diff_split:.2f}, unsplit "
          f"{diff_whole:.2f}; bytes {len(split['bytes'])} against {len(whole['bytes'])}")
    assert diff_split <= diff_whole + 1.5
    np.testing.assert_array_equal(split["logits"].argmax(-1), split["tf"].argmax(-1))
    np.testing.assert_array_equal(split["logits"].argmax(-1), whole["logits"].argmax(-1))
    int4_weights = sum(row["int4_weights"] for row in split["levels"]["layers"].values())
    assert int4_weights == sum(
        toy["model"].layers[s].weights.shape[:3].num_elements() * int(np.sum(_bits(
            toy["model"].layers[s].weights.shape[-1]) <= 4)) for s in MIXED)
    # half a byte saved per INT4 weight (the file's ops and tensors grow by ~770 bytes a
    # split; MIN_SPLIT_SAVING keeps small layers whole)
    assert _weight_bytes(whole["bytes"]) - _weight_bytes(split["bytes"]) == sum(
        count // 2 for count in _int4_counts(split["bytes"]))


def _weight_bytes(data: bytes) -> int:
    fb, graph, ops = _ops(data)
    return sum(len(fb.buffers[graph.tensors[op.inputs[1]].buffer].data)
               for code, op in ops if code in (CONV, 9))


def _int4_counts(data: bytes) -> list[int]:
    _, graph, ops = _ops(data)
    return [int(np.prod(graph.tensors[op.inputs[1]].shape)) for code, op in ops
            if code == CONV and graph.tensors[op.inputs[1]].type == INT4]
