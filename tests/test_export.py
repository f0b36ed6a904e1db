"""TFLite / SavedModel export (``adjq-export``) of the tiny trained digits run.

Every model is converted once (module fixture) and evaluated on the 360 validation digits,
in the LiteRT interpreter and, for the fake-quant reference, in TensorFlow.
Run with ``-s`` to see the accuracy and size table.
"""

import shutil

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.lite.tools import flatbuffer_utils

from adj_quant import tflite_export as TE
from adj_quant import tflite_runner as TR
from adj_quant.checkpoints import resolve_checkpoint
from adj_quant.cli import evaluate as eval_cli
from adj_quant.cli import export as E
from adj_quant.recipe import export as export_lib
from adj_quant.recipe import validation
from adj_quant.recipe.data import validation_data

QUIET = ["--no-progress"]


def _export(*argv):
    return E.main([*argv, *QUIET])


def _validation(ckpt):
    o = export_lib.resolve_options({}, ckpt)
    images, labels = [], []
    for x, y in validation_data(o, 10):
        images.append(x.numpy())
        labels.append(y.numpy())
    return o, np.concatenate(images), np.concatenate(labels)


def _logits(path, images):
    return TR.TFLiteRunner(str(path), batch=len(images))(images)


def _top1(logits, labels):
    return TR.topk_hits(logits, labels, 1) / len(labels)


@pytest.fixture(scope="module")
def exported(digits_run, tmp_path_factory):
    """Every export the tests look at, with accuracies on the same 360 validation images."""
    out = tmp_path_factory.mktemp("export")
    qat8_dir = out / "qat8"  # a copy, so that the default output does not land in the shared run
    shutil.copytree(digits_run / "qat8", qat8_dir)
    qat8 = resolve_checkpoint(str(qat8_dir))
    finetune = resolve_checkpoint(str(digits_run / "finetune"))
    o, images, labels = _validation(qat8)
    assert len(labels) == 360
    r = {"dir": out, "qat8": qat8, "finetune": finetune, "images": images, "labels": labels}

    r["float_result"] = _export("--ckpt_path", str(qat8_dir), "--quantization", "float")
    r["float"] = r["float_result"]["output"]
    r["dynamic"] = _export("--ckpt_path", qat8, "--quantization", "dynamic",
                           "--output", str(out / "dynamic.tflite"))["output"]
    r["int8_result"] = _export("--ckpt_path", qat8, "--quantization", "int8",
                               "--output", str(out / "int8.tflite"), "--eval")
    r["int8"] = r["int8_result"]["output"]
    r["adj_result"] = _export("--ckpt_path", finetune, "--quantization", "adjustable",
                              "--output", str(out / "adjustable.tflite"))
    r["adjustable"] = r["adj_result"]["output"]

    acc = {}
    for key in ("float", "dynamic", "int8", "adjustable"):
        r[f"{key}_logits"] = _logits(r[key], images)
        acc[key] = _top1(r[f"{key}_logits"], labels)
    for stage in ("qat8", "finetune"):
        model, spec, _ = export_lib.load_checkpoint(r[stage], o)
        r[f"{stage}_model"], r[f"{stage}_spec"] = model, spec
        acc[f"{stage} fake-quant (TF)"] = validation.accuracy(
            model, validation_data(o, 10), progress=False)["top1"]
        r[f"{stage}_tf_logits"] = model(tf.constant(images)).numpy()
    r["acc"] = acc
    print("\ntop-1 on the 360 validation digits:")
    for key, value in acc.items():
        print(f"  {key:26s} {100 * value:6.2f}%")
    for key in ("float", "dynamic", "int8", "adjustable"):
        print(f"  size {key:10s} {export_lib.tree_size(r[key]):>9,} bytes")
    return r


def test_float_export_computes_the_model(exported):
    """The float file is the quantized checkpoint's network with float activations, exactly."""
    net = TE.export_net(exported["qat8_model"], exported["qat8_spec"], "float")
    want = net(tf.constant(exported["images"][:32])).numpy()
    got = exported["float_logits"][:32]
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max())
    assert exported["float"].endswith("qat8/model_float.tflite")  # the default output


def test_float_checkpoint_bn_folded(digits_run, tmp_path):
    """A float (pretrain) checkpoint: BN folded, same logits as the float model with BN."""
    ckpt = resolve_checkpoint(str(digits_run / "pretrain"))
    result = _export("--ckpt_path", ckpt, "--quantization", "float",
                     "--output", str(tmp_path / "pretrain.tflite"))
    model, spec, _ = export_lib.load_checkpoint(ckpt, export_lib.resolve_options({}, ckpt))
    assert spec.kind == "float"
    x = np.random.default_rng(0).uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
    want = model(tf.constant(x), training=False).numpy()
    got = _logits(result["output"], x)
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max())


def test_int8_qat8(exported):
    """Full-integer PTQ of the 8-bit QAT checkpoint: int8 in and out, within 1 point."""
    interpreter = TR.make_interpreter(exported["int8"])
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    assert inp["quantization"][0] > 0 and out["quantization"][0] > 0
    acc = exported["acc"]
    assert abs(acc["int8"] - acc["qat8 fake-quant (TF)"]) <= 0.01, acc
    # the --eval flag evaluated the same file the same way
    assert exported["int8_result"]["eval_top1"] == pytest.approx(acc["int8"])
    assert acc["float"] > 0.6 and acc["dynamic"] > 0.6  # reported above; both run


def test_int8_size(exported):
    """int8 weights take at most 0.3x the float bytes.

    The whole file is compared too, but loosely: per-channel quantization parameters (a
    float32 scale and an int64 zero point per output channel of every weight and bias) cost
    12 bytes per channel, which for this width-0.25 network (~22 weights per channel) is
    over half of the int8 payload. The full-size EfficientNet-B0 file is 0.29x (docs/export.md).
    """
    def payload(path):
        fb = flatbuffer_utils.read_model(path)
        return sum(len(b.data) for b in fb.buffers if b.data is not None)

    float_size = export_lib.tree_size(exported["float"])
    int8_size = export_lib.tree_size(exported["int8"])
    ratio = payload(exported["int8"]) / payload(exported["float"])
    print(f"\nint8/float: weights {ratio:.3f}, file {int8_size / float_size:.3f}")
    assert ratio <= 0.3
    assert int8_size <= 0.5 * float_size


def test_adjustable_holds_learned_levels(exported):
    """Each weight channel of the adjustable export holds at most 2^b int8 values; where the
    learned grid fits in [-127, 127] (b <= 7, range around 0) they are the learned levels."""
    model = exported["finetune_model"]
    net = TE.export_net(model, exported["finetune_spec"], "adjustable")
    interpreter = TR.make_interpreter(exported["adjustable"])
    details = interpreter.get_tensor_details()
    fb = flatbuffer_utils.read_model(exported["adjustable"])
    graph = fb.subgraphs[0]
    linear = [op for op in graph.operators
              if fb.operatorCodes[op.opcodeIndex].builtinCode in (3, 4, 9)]  # conv, dws, FC
    scopes = model.arch.layer_names
    assert len(linear) == len(scopes)
    channels = exact = must_be_exact = 0
    for op, scope in zip(linear, scopes):
        kind, _, weights, _ = net.layers[scope]
        index = op.inputs[1]
        stored = interpreter.get_tensor(index)
        quant = details[index]["quantization_parameters"]
        assert stored.dtype == np.int8 and np.all(quant["zero_points"] == 0)
        axis = quant["quantized_dimension"]
        want = weights.T if kind == "fc" else weights.transpose(3, 0, 1, 2)
        assert stored.shape == want.shape, scope
        per_channel = np.moveaxis(stored, axis, 0).reshape(stored.shape[axis], -1)
        deq = np.moveaxis(
            stored * quant["scales"].reshape([-1 if a == axis else 1 for a in range(stored.ndim)]),
            axis, 0,
        ).reshape(len(per_channel), -1)
        ref = np.moveaxis(want, axis, 0).reshape(len(per_channel), -1)
        bits = model.layers[scope].weight_quant.bits().numpy()
        low, width = (t.numpy() for t in model.layers[scope].weight_quant.adjusted_range())
        for c, row in enumerate(per_channel):
            assert len(np.unique(row)) <= 2 ** bits[c], (scope, c, bits[c])
            err = np.abs(deq[c] - ref[c]).max()
            is_exact = err <= 1e-5 * np.abs(ref[c]).max() + 1e-9
            assert is_exact or err <= 0.5001 * quant["scales"][c], (scope, c)
            if bits[c] <= 7 and low[c] <= 0 <= low[c] + width[c]:
                must_be_exact += 1
                assert is_exact, (scope, c, bits[c], err)
            exact += is_exact
            channels += 1
    levels = exported["adj_result"]["levels"]
    assert levels["channels"] == channels and exact >= levels["exact_channels"] >= must_be_exact
    print(f"\nadjustable: {exact}/{channels} weight channels hold exactly their learned levels "
          f"({must_be_exact} had to); every channel holds <= 2^b int8 values")


def test_adjustable_accuracy(exported):
    """The adjustable int8 file against the fake-quant finetune model in TF.

    Measured on this run: 86-87% vs 88.3% (the gap is 1-2.5 points depending on the
    representative images). The exported activation grid itself (8-bit per-tensor, union of
    the learned ranges) simulated in TF is within 0.3 points of the fake-quant model; the
    rest comes from the int8 arithmetic of tensors the model kept float (sigmoid, SE product,
    residual sums, means), which the converter calibrates. 4 points (~2x the worst gap seen)
    is the bound.
    """
    acc = exported["acc"]
    assert abs(acc["adjustable"] - acc["finetune fake-quant (TF)"]) <= 0.04, acc
    agree = np.mean(exported["adjustable_logits"].argmax(-1)
                    == exported["finetune_tf_logits"].argmax(-1))
    print(f"\nadjustable vs fake-quant top-1 agreement: {100 * agree:.1f}%")
    assert agree >= 0.9


def test_adjustable_activation_ranges(exported):
    """The input of every quantized conv carries the learned (union) range, not a calibrated one."""
    model = exported["finetune_model"]
    interpreter = TR.make_interpreter(exported["adjustable"])
    details = interpreter.get_tensor_details()
    fb = flatbuffer_utils.read_model(exported["adjustable"])
    linear = [op for op in fb.subgraphs[0].operators
              if fb.operatorCodes[op.opcodeIndex].builtinCode in (3, 4, 9)]
    checked = 0
    for op, scope in zip(linear, model.arch.layer_names):
        quant = model.layers[scope].act_quant
        if quant is None:
            continue
        lo, hi = TE.union_range(quant)
        scale = details[op.inputs[0]]["quantization_parameters"]["scales"][0]
        assert scale == pytest.approx((hi - lo) / 255, rel=1e-4), scope
        checked += 1
    assert checked == len(linear) - 1  # all but the stem


def test_eval_py_tflite(exported, capsys):
    eval_cli.main(["--tflite", exported["int8"], "--no-progress"])
    out = capsys.readouterr().out
    assert "top-1:" in out and "(360 images)" in out
    assert f"{100 * exported['acc']['int8']:.2f}%" in out


def test_saved_model_adjustable(exported, tmp_path):
    path = tmp_path / "sm"
    result = _export("--ckpt_path", exported["finetune"], "--format", "saved_model",
                     "--quantization", "adjustable", "--output", str(path))
    assert result["output"] == str(path) and (path / "saved_model.pb").exists()
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    images = tf.constant(exported["images"][:16])
    got = serve(images=images)["logits"].numpy()
    net = TE.export_net(exported["finetune_model"], exported["finetune_spec"], "adjustable")
    # The same graph before saving: run eagerly instead, a last-bit difference of a conv
    # can move one activation across a fake-quant rounding boundary (seen on one image).
    before = TE.inference_module(net, images.shape[1]).serve(images)["logits"].numpy()
    np.testing.assert_allclose(got, before, rtol=1e-5, atol=1e-5)


def _error(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        _export(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input(digits_run, exported, tmp_path, capsys):
    msg = _error(capsys, "--ckpt_path", str(tmp_path / "missing"), "--quantization", "int8")
    assert "checkpoint not found" in msg
    msg = _error(capsys, "--ckpt_path", str(digits_run / "pretrain"), "--quantization",
                 "adjustable", "--output", str(tmp_path / "x.tflite"))
    assert "needs a quantized checkpoint" in msg
    assert not (tmp_path / "x.tflite").exists()
    # the default output of the fixture exists already
    msg = _error(capsys, "--ckpt_path", str(exported["dir"] / "qat8"), "--quantization", "float")
    assert "already exists" in msg and "--overwrite" in msg
    msg = _error(capsys, "--ckpt_path", exported["qat8"], "--format", "saved_model",
                 "--quantization", "int8", "--output", str(tmp_path / "sm"))
    assert "saved_model" in msg
    (tmp_path / "bad.tflite").write_bytes(b"not a flatbuffer")
    for path, expected in ((tmp_path / "none.tflite", "no such file"),
                           (tmp_path / "bad.tflite", "not a TFLite model")):
        with pytest.raises(SystemExit) as exit_info:
            eval_cli.main(["--tflite", str(path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err


def test_int8_file_size_for_full_width_b0():
    """int8 vs float file size on the real architecture: full-width EfficientNet-B0, 10 classes.

    File size does not depend on the weights' values, but it does on whether biases repeat
    (zero biases are deduplicated), so the BN statistics are made non-trivial. Measured:
    0.304x (the trained digits model gives the same 0.304x). The issue's goal of 0.3x is
    missed by 0.004: int8 stores a float32 scale and an int64 zero point per output channel
    (12 bytes x ~30k channels) and keeps the int32 biases; the weights alone are 0.25x.
    """
    from adj_quant import nets
    from adj_quant.checkpoints import ModelSpec
    from adj_quant.network import FloatNetwork
    from adj_quant.tflite_export import convert, export_net, inference_module

    model = FloatNetwork(nets.build("efficientnet_b0", num_classes=10))
    rng = np.random.default_rng(0)
    for layer in model.layers.values():
        if layer.bn is not None:
            layer.bn.beta.assign(rng.normal(0, 0.1, layer.cout))
            layer.bn.moving_mean.assign(rng.normal(0, 0.1, layer.cout))
    module = inference_module(export_net(model, ModelSpec("float", model.arch), "float"), 32)
    representative = rng.uniform(0, 1, (4, 32, 32, 3)).astype(np.float32)
    float_bytes = convert(module, "float")
    int8_bytes = convert(module, "int8", representative)
    assert len(int8_bytes) <= 0.31 * len(float_bytes), (len(int8_bytes), len(float_bytes))


def test_float_linear_ops_counts_layers_left_float(exported):
    """The check behind the adjustable export's fallback to calibrated activation ranges."""
    with open(exported["float"], "rb") as f:
        float_file = f.read()
    with open(exported["adjustable"], "rb") as f:
        adjustable_file = f.read()
    n_layers = len(exported["qat8_model"].layers)
    assert TE.float_linear_ops(float_file) == n_layers
    assert TE.float_linear_ops(adjustable_file) == 0
    assert exported["adj_result"]["activation_ranges"].startswith("learned")
