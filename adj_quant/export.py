"""Export a checkpoint to TFLite (float, dynamic-range, full-integer int8, adjustable) or a SavedModel.

    python -m adj_quant.export --ckpt_path runs/digits/qat8 --format tflite --quantization int8
    python -m adj_quant.export --ckpt_path runs/digits/finetune --format tflite --quantization adjustable --eval
    python eval.py --tflite runs/digits/finetune/model_adjustable.tflite

The exported network is a plain inference function ``images float32 [N, S, S, 3] in [0, 1]
-> logits`` with batch norm folded and every weight and bias baked in as a constant:

* a float checkpoint: the BN-folded float weights (``fold_batch_norm``);
* a quantized checkpoint (``qat8``, ``adjustable``, ``finetune``): its BN-folded weights and
  biases after their learned quantizers (``QuantizedLayer.quantized_weights()``), so every
  weight channel holds only its learned ``2^b`` levels.

Quantization modes (docs/export.md):

* ``float``: plain conversion, float32 everywhere;
* ``dynamic``: dynamic-range PTQ (``Optimize.DEFAULT``), int8 weights, float activations;
* ``int8``: full-integer PTQ: a representative dataset of training images calibrates every
  activation; int8 input and output;
* ``adjustable`` (quantized checkpoints only): full-integer int8 whose activation ranges are
  the learned ones: at every activation quantizer of the model a
  ``fake_quant_with_min_max_vars`` (8 bits, per tensor, range = the union of the learned
  per-channel ranges) tells the converter the range; the tensors the model never quantized
  (sigmoid, products, sums) are calibrated on the representative dataset.

See docs/export.md for what TFLite can and cannot represent exactly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np

import adj_quant.quiet  # noqa: F401  (quiet TensorFlow start-up)
from adj_quant.files import write_atomic
from adj_quant.config import build_parser
from adj_quant.errors import UserError, cli_main

FORMATS = ("tflite", "saved_model")
QUANTIZATIONS = ("float", "dynamic", "int8", "adjustable")
DATA_FIELDS = ["dataset", "img_size", "num_classes", "labels_offset", "batch_size", "eval_crop",
               "max_val_images", "config", "progress", "seed"]
DEFAULT_REPRESENTATIVE = 100
EXTRA = {
    "--ckpt_path": dict(metavar="PATH", required=True,
                        help="checkpoint to export: a prefix, or a run's stage directory (its "
                             "best checkpoint); a float (pretrain) or quantized (qat8, "
                             "adjustable, finetune) model"),
    "--format": dict(choices=FORMATS, default="tflite",
                     help="tflite: a .tflite flatbuffer; saved_model: a SavedModel directory of "
                          "the same BN-folded inference function (float or adjustable only)"),
    "--quantization": dict(choices=QUANTIZATIONS, required=True,
                           help="float: no quantization; dynamic: int8 weights, float "
                                "activations; int8: full-integer post-training quantization "
                                "calibrated on --representative_images training images; "
                                "adjustable: full-integer int8 with the learned weight levels "
                                "and activation ranges of a quantized checkpoint"),
    "--output": dict(metavar="PATH",
                     help="output file (tflite) or directory (saved_model) (default: "
                          "<ckpt dir>/model_<quantization>.tflite or "
                          "<ckpt dir>/saved_model_<quantization>/)"),
    "--representative_images": dict(type=int, metavar="N", default=DEFAULT_REPRESENTATIVE,
                                     help="training images that calibrate the int8 activation "
                                          "ranges (int8 and adjustable)"),
    "--overwrite": dict(action="store_true",
                        help="replace an existing output (atomically); without it an existing "
                             "output is refused"),
    "--eval": dict(action="store_true", dest="evaluate",
                   help="after a tflite export, evaluate the file in the TFLite interpreter on "
                        "the validation split and print top-1/top-5"),
}


# --------------------------------------------------------------------------- options


def resolve_options(cli: dict, beside: str | None):
    """Options from the config.json beside ``beside`` (a checkpoint or model file), then ``cli``."""
    from adj_quant.config import resolve, trained_config

    keep = {k: v for k, v in cli.items() if k in DATA_FIELDS}
    base = trained_config(beside) if beside else {}
    return resolve({**base, **keep}, None)


# --------------------------------------------------------------------------- the inference network


class ExportNet:
    """The BN-folded network as constants: what gets converted.

    ``layers[scope] = (kind, stride, weights, biases)`` (numpy); ``act_ranges`` maps an
    activation-quantizer site (``<scope>/input``, ``/swish_input``, ``/sigmoid_input``) to the per-tensor
    ``(min, max)`` a ``fake_quant_with_min_max_vars`` op imposes there (``adjustable``).
    """

    def __init__(self, arch, layers: dict, act_ranges: dict | None = None):
        self.arch = arch
        self.layers = layers
        self.act_ranges = act_ranges or {}

    def _fake_quant(self, name: str, x):
        import tensorflow as tf

        if name not in self.act_ranges:
            return x
        lo, hi = self.act_ranges[name]
        return tf.quantization.fake_quant_with_min_max_vars(
            x, tf.constant(lo, tf.float32), tf.constant(hi, tf.float32), num_bits=8,
            narrow_range=False)

    def __call__(self, images):
        from adj_quant import network as nw

        def layer(scope, x, training=False):
            kind, stride, weights, biases = self.layers[scope]
            x = self._fake_quant(f"{scope}/input", x)
            return nw.apply_linear(kind, x, weights, stride) + biases

        def activation(scope, fn, x):
            if fn in nw.QUANTIZED_ACTIVATIONS:
                x = self._fake_quant(f"{scope}/{fn}_input", x)
            return nw.ACTIVATIONS[fn](x)

        return self.arch.forward(images, layer, activation=activation)


def export_net(model, spec, quantization: str) -> ExportNet:
    """The :class:`ExportNet` of a restored float or quantized model."""
    from adj_quant.network import fold_batch_norm
    from adj_quant.qmodel import ACTIVATION_SITES

    layers = {}
    for scope, layer in model.layers.items():
        if spec.kind == "float":
            weights, biases = fold_batch_norm(layer)
        else:
            weights, biases = layer.quantized_weights()
        layers[scope] = (layer.kind, layer.stride, weights.numpy().astype(np.float32),
                         biases.numpy().astype(np.float32))
    act_ranges = None
    if quantization == "adjustable":
        act_ranges = {name: union_range(quant)
                      for name, quant in model.quantizers().items()
                      if name.endswith(ACTIVATION_SITES)}
    return ExportNet(model.arch, layers, act_ranges)


def union_range(quant) -> tuple[float, float]:
    """Per-tensor ``(min, max)`` covering every channel's learned range, and 0.

    The adjusted range of channel c is ``[L_c, L_c + W_c]``; TFLite needs 0 representable.
    """
    low, width = (t.numpy() for t in quant.adjusted_range())
    return float(min(low.min(), 0.0)), float(max((low + width).max(), 0.0))


def inference_module(net: ExportNet, img_size: int):
    """A ``tf.Module`` with ``serve(images float32 [None, S, S, 3]) -> logits``."""
    import tensorflow as tf

    module = tf.Module()
    module.serve = tf.function(
        lambda images: {"logits": net(images)},
        input_signature=[tf.TensorSpec([None, img_size, img_size, 3], tf.float32, name="images")])
    return module


# --------------------------------------------------------------------------- conversion


def convert(module, quantization: str, representative: np.ndarray | None = None) -> bytes:
    """The .tflite bytes of ``module.serve`` under one of :data:`QUANTIZATIONS`."""
    import tensorflow as tf

    concrete = module.serve.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    if quantization != "float":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization in ("int8", "adjustable"):
        if representative is None or len(representative) == 0:
            raise UserError(f"--quantization {quantization} needs representative images")

        def dataset():
            for image in representative:
                yield [image[np.newaxis].astype(np.float32)]

        converter.representative_dataset = dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    try:
        return converter.convert()
    except Exception as err:  # converter errors are long; keep the first line
        raise UserError(f"TFLite conversion ({quantization}) failed: "
                        f"{str(err).strip().splitlines()[0] if str(err).strip() else err!r}") from err


# --------------------------------------------------------------------------- learned weight levels

# TFLite keeps int8 conv / depthwise / FC weights symmetric per output channel: real value =
# scale_c * k with k in [-127, 127] and zero point 0. The converter picks
# scale_c = max|w_c| / 127, which re-rounds a learned grid {q / s_c : q in [z_c, z_c + 2^b - 1]}
# onto another one (levels move by up to half an int8 step and neighbours can merge). When
# every |q| <= 127 (b <= 7 and a range around 0) the learned grid itself fits: scale_c = 1/s_c,
# k = q. :func:`snap_to_learned_levels` rewrites those channels in the converted file.

_LINEAR_OPS = {3: "conv", 4: "dws", 9: "fc"}  # BuiltinOperator CONV_2D, DEPTHWISE_CONV_2D, FC
_INT8, _INT32 = 9, 2                          # TensorType


def learned_grid(quant, values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``(q, s)``: the integer level of every fake-quantized value and each channel's scale.

    ``values`` are the quantizer's outputs (``q / s_c``) with channels on ``axis``.
    """
    low, width = (t.numpy().astype(np.float64) for t in quant.adjusted_range())
    bits = quant.bits().numpy().astype(np.float64)
    scale = (2.0 ** bits - 1.0) / (width + 1e-7)
    shape = [1] * values.ndim
    shape[axis] = -1
    q = np.round(values.astype(np.float64) * scale.reshape(shape))
    return q, scale


def _to_tflite_layout(kind: str, values: np.ndarray) -> np.ndarray:
    """TF weight layout -> TFLite's: conv HWIO -> OHWI, depthwise HWC1 -> 1HWC, FC IO -> OI."""
    return values.T if kind == "fc" else values.transpose(3, 0, 1, 2)


def snap_to_learned_levels(tflite: bytes, model, net: ExportNet) -> tuple[bytes, dict]:
    """Store each weight channel of a converted int8 model as its learned integer levels.

    For every conv / depthwise / FC op (in execution order, matched to the model's layers
    and checked against the converter's own values) and every output channel whose learned
    levels fit in [-127, 127], set the int8 values to the learned levels ``q`` and the
    channel scale to ``1 / s_c``, and requantize that channel's int32 bias with the new
    ``input_scale * weight_scale``. Other channels (8-bit grids, ranges away from 0) keep
    the converter's rounding, which still holds at most ``2^b`` values. Returns the new
    bytes and ``{"channels", "exact_channels", "layers"}``.
    """
    from tensorflow.lite.python import schema_util
    from tensorflow.lite.tools import flatbuffer_utils

    fb = flatbuffer_utils.read_model_from_bytearray(bytearray(tflite))
    graph = fb.subgraphs[0]
    linear = [op for op in graph.operators if schema_util.get_builtin_code_from_operator_code(
        fb.operatorCodes[op.opcodeIndex]) in _LINEAR_OPS]
    scopes = model.arch.layer_names
    if len(linear) != len(scopes):
        raise RuntimeError(f"the converted model has {len(linear)} conv/depthwise/FC ops, the "
                           f"network {len(scopes)} layers")
    uses: dict[int, int] = {}
    for tensor in graph.tensors:
        uses[tensor.buffer] = uses.get(tensor.buffer, 0) + 1

    def read(tensor, dtype):
        return np.frombuffer(bytes(fb.buffers[tensor.buffer].data), dtype).reshape(tensor.shape)

    def write(tensor, values):
        data = np.frombuffer(values.tobytes(), np.uint8).copy()
        if uses[tensor.buffer] > 1:  # a deduplicated buffer: give this tensor its own
            buffer = type(fb.buffers[tensor.buffer])()
            fb.buffers.append(buffer)
            uses[tensor.buffer] -= 1
            tensor.buffer = len(fb.buffers) - 1
            uses[tensor.buffer] = 1
        fb.buffers[tensor.buffer].data = data

    channels = exact = 0
    layers = {}
    for op, scope in zip(linear, scopes):
        kind, _, weights, biases = net.layers[scope]
        w_t, b_t, x_t = (graph.tensors[i] for i in (op.inputs[1], op.inputs[2], op.inputs[0]))
        if w_t.type != _INT8 or b_t.type != _INT32:
            raise RuntimeError(f"{scope}: weights/bias of the converted model are not int8/int32")
        stored = read(w_t, np.int8)
        old_scale = np.asarray(w_t.quantization.scale, np.float64)
        axis = w_t.quantization.quantizedDimension
        target = _to_tflite_layout(kind, weights)
        if stored.shape != target.shape or old_scale.size != target.shape[axis]:
            raise RuntimeError(f"{scope}: converted weights {list(stored.shape)} do not match "
                               f"the layer's {list(target.shape)}")
        shape = [1] * target.ndim
        shape[axis] = -1
        converted = stored * old_scale.reshape(shape)
        if np.any(np.abs(converted - target) > 0.5001 * old_scale.reshape(shape) + 1e-6):
            raise RuntimeError(f"{scope}: converted weights are not this layer's values")
        q, s = learned_grid(model.layers[scope].weight_quant, target, axis)
        on_grid = np.abs(q / s.reshape(shape) - target) <= 1e-5 * (np.abs(target) + 1e-3)
        fits = np.moveaxis((np.abs(q) <= 127) & on_grid, axis, 0).reshape(len(s), -1).all(axis=1)
        new_ints = np.where(fits.reshape(shape), q, stored).astype(np.int8)
        new_scale = np.where(fits, 1.0 / s, old_scale).astype(np.float32)
        x_scale = float(x_t.quantization.scale[0])
        bias_scale = x_scale * new_scale.astype(np.float64)
        bias_ints = np.round(biases.astype(np.float64) / bias_scale)
        if np.any(np.abs(bias_ints) > 2 ** 31 - 1):
            raise RuntimeError(f"{scope}: a requantized bias overflows int32")
        write(w_t, new_ints)
        w_t.quantization.scale = new_scale
        write(b_t, bias_ints.astype(np.int32))
        b_t.quantization.scale = bias_scale.astype(np.float32)
        channels += len(s)
        exact += int(fits.sum())
        layers[scope] = {"channels": len(s), "exact": int(fits.sum())}
    out = flatbuffer_utils.convert_object_to_bytearray(fb)
    return bytes(out), {"channels": channels, "exact_channels": exact, "layers": layers}


# --------------------------------------------------------------------------- files


def default_output(ckpt: str, fmt: str, quantization: str) -> str:
    directory = os.path.dirname(os.path.abspath(ckpt))
    if fmt == "tflite":
        return os.path.join(directory, f"model_{quantization}.tflite")
    return os.path.join(directory, f"saved_model_{quantization}")


def check_output(path: str, overwrite: bool) -> None:
    if os.path.lexists(path) and not overwrite:
        raise UserError(f"output {path} already exists; pass --overwrite to replace it or "
                        "--output elsewhere")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"output directory {parent} does not exist; create it or pass another "
                        "--output")


def write_saved_model_atomic(module, path: str) -> None:
    import tensorflow as tf

    parent = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve})
        if os.path.isdir(path) and not os.path.islink(path):
            old = f"{tmp}.old"
            os.replace(path, old)  # two renames: the old one is never half deleted
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            if os.path.lexists(path):
                os.remove(path)
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tree_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


# --------------------------------------------------------------------------- export


def load_checkpoint(ckpt_path: str, o, quantization: str | None = None):
    """``(model, spec, ckpt)``: the model a run's checkpoint holds, restored."""
    from adj_quant.checkpoints import ModelSpec, model_spec_for, resolve_checkpoint, restore_model
    from adj_quant.recipe import arch_of

    ckpt = resolve_checkpoint(ckpt_path, "--ckpt_path")
    spec = model_spec_for(ckpt, ModelSpec("float", arch_of(o)), "--ckpt_path")
    if quantization == "adjustable" and spec.kind != "quant":
        raise UserError(f"--quantization adjustable needs a quantized checkpoint (a qat8, "
                        f"adjustable or finetune stage); {ckpt} holds a float model: export it "
                        "with --quantization int8 (post-training quantization) instead")
    model = spec.build(seed=o.seed)
    restore_model(model, ckpt)
    return model, spec, ckpt


def export(cli: dict) -> dict:
    """Export a checkpoint as the flags in ``cli`` say; returns what was written."""
    from adj_quant import data as data_lib
    from adj_quant.checkpoints import resolve_checkpoint
    from adj_quant.trainer import data_args

    fmt, quantization = cli["format"], cli["quantization"]
    count = cli.get("representative_images", DEFAULT_REPRESENTATIVE)
    if count <= 0:
        raise UserError(f"--representative_images {count} must be positive")
    if fmt == "saved_model" and quantization in ("dynamic", "int8"):
        raise UserError(f"--format saved_model --quantization {quantization}: {quantization} "
                        "quantization happens in the TFLite converter; write a tflite file, or "
                        "a saved_model with --quantization float or adjustable")
    ckpt = resolve_checkpoint(cli["ckpt_path"], "--ckpt_path")
    output = cli.get("output") or default_output(ckpt, fmt, quantization)
    check_output(output, cli.get("overwrite", False))
    o = resolve_options(cli, ckpt)
    model, spec, ckpt = load_checkpoint(ckpt, o, quantization)
    net = export_net(model, spec, quantization)
    module = inference_module(net, o.img_size)
    started = time.time()
    levels = None
    activation_ranges = "learned (per tensor: the union of the channels' ranges)" if (
        quantization == "adjustable") else None
    if fmt == "saved_model":
        write_saved_model_atomic(module, output)
    else:
        representative = None
        if quantization in ("int8", "adjustable"):
            name, dataset_dir, _, offset = data_args(o)
            representative = data_lib.representative_images(
                name, img_size=o.img_size, count=count, seed=o.seed, dataset_dir=dataset_dir,
                labels_offset=offset, eval_crop=o.eval_crop)
        tflite = convert(module, quantization, representative)
        if quantization == "adjustable":
            left_float = float_linear_ops(tflite)
            if left_float:
                # The converter sometimes keeps a conv float behind a FakeQuant range; then
                # calibrated activation ranges give a fully integer model (weights still
                # hold their learned levels).
                activation_ranges = (f"calibrated on {count} images: with the learned "
                                     f"ranges the converter left {left_float} layer(s) float")
                net.act_ranges = {}
                tflite = convert(inference_module(net, o.img_size), quantization,
                                 representative)
            tflite, levels = snap_to_learned_levels(tflite, model, net)
        write_atomic(output, tflite)
    return {"output": output, "size_bytes": tree_size(output), "checkpoint": ckpt,
            "model_kind": spec.kind, "format": fmt, "quantization": quantization,
            "seconds": time.time() - started, "options": o, "levels": levels,
            "activation_ranges": activation_ranges}


def float_linear_ops(tflite: bytes) -> int:
    """Conv / depthwise / FC ops of a .tflite file whose weights are not int8."""
    from tensorflow.lite.python import schema_util
    from tensorflow.lite.tools import flatbuffer_utils

    fb = flatbuffer_utils.read_model_from_bytearray(bytearray(tflite))
    graph = fb.subgraphs[0]
    return sum(1 for op in graph.operators
               if schema_util.get_builtin_code_from_operator_code(
                   fb.operatorCodes[op.opcodeIndex]) in _LINEAR_OPS
               and graph.tensors[op.inputs[1]].type != _INT8)


# --------------------------------------------------------------------------- interpreter


def make_interpreter(model_path: str | None = None, model_content: bytes | None = None):
    """A LiteRT interpreter (``tf.lite.Interpreter`` only if ai_edge_litert is missing)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - ai-edge-litert is a dependency
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    try:
        return Interpreter(model_path=model_path, model_content=model_content)
    except ValueError as err:
        raise UserError(f"--tflite {model_path}: not a TFLite model ({str(err).splitlines()[0]})")


def quantize_input(images: np.ndarray, detail: dict) -> np.ndarray:
    """Images as the input tensor's dtype, with the (scale, zero point) the interpreter reports."""
    dtype = detail["dtype"]
    if not np.issubdtype(dtype, np.integer):
        return images.astype(dtype)
    scale, zero = detail["quantization"]
    if scale == 0:
        raise UserError("the TFLite model's integer input has no quantization parameters")
    info = np.iinfo(dtype)
    return np.clip(np.round(images / scale + zero), info.min, info.max).astype(dtype)


def dequantize_output(values: np.ndarray, detail: dict) -> np.ndarray:
    if not np.issubdtype(detail["dtype"], np.integer):
        return values.astype(np.float32)
    scale, zero = detail["quantization"]
    return (values.astype(np.float32) - zero) * scale


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """Images whose label is among the top ``k`` logits; a tie at the boundary counts as a miss.

    (Quantized logits tie more often than float ones; a tie is not a correct answer.)
    """
    k = min(k, logits.shape[-1])
    mine = logits[np.arange(len(labels)), labels][:, None]
    others_at_least = (logits >= mine).sum(axis=-1) - 1
    return int((others_at_least < k).sum())


class TFLiteRunner:
    """Runs a .tflite classifier on float images in [0, 1], ``batch`` images per invoke."""

    def __init__(self, model_path: str, batch: int = 1):
        self.interpreter = make_interpreter(model_path)
        inputs, outputs = (self.interpreter.get_input_details(),
                           self.interpreter.get_output_details())
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"--tflite {model_path}: expected one input and one output, found "
                            f"{len(inputs)} and {len(outputs)}")
        self.input, self.output = inputs[0], outputs[0]
        shape = list(self.input["shape"])
        if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
            raise UserError(f"--tflite {model_path}: input shape {shape} is not [N, S, S, 3]")
        self.img_size = int(shape[1])
        self.num_classes = int(self.output["shape"][-1])
        self.batch = 0
        self._resize(batch)

    def _resize(self, batch: int) -> None:
        if batch == self.batch:
            return
        self.interpreter.resize_tensor_input(self.input["index"],
                                             [batch, self.img_size, self.img_size, 3])
        self.interpreter.allocate_tensors()
        # The quantization parameters do not change with the batch; re-read index/dtype anyway.
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = batch

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits (float32) of ``images`` float32 [n, S, S, 3] in [0, 1]."""
        self._resize(len(images))
        self.interpreter.set_tensor(self.input["index"], quantize_input(images, self.input))
        self.interpreter.invoke()
        return dequantize_output(self.interpreter.get_tensor(self.output["index"]), self.output)


def interpreter_accuracy(model_path: str, dataset, *, batch: int = 1, progress: bool = True,
                         max_images: int | None = None, what: str = "validation data") -> dict:
    """Top-1/top-5 of a .tflite file over ``dataset`` (batches of ``(images, labels)``)."""
    from adj_quant.evaluation import accuracy

    runner = TFLiteRunner(model_path, batch)

    def step(images, labels):
        images, labels = images.numpy(), labels.numpy()
        if images.shape[1:] != (runner.img_size, runner.img_size, 3):
            raise UserError(f"{what}: images of shape {list(images.shape[1:])} but the model "
                            f"takes {runner.img_size}x{runner.img_size}x3; pass --img_size "
                            f"{runner.img_size}")
        if labels.size and labels.max() >= runner.num_classes:
            raise UserError(f"{what}: label {labels.max()} but the model has "
                            f"{runner.num_classes} classes; pass the matching --dataset")
        top1 = top5 = 0
        for start in range(0, len(images), batch):
            logits = runner(images[start:start + batch])
            part = labels[start:start + batch]
            top1 += topk_hits(logits, part, 1)
            top5 += topk_hits(logits, part, 5)
        return top1, top5

    return accuracy(None, dataset, what=what, progress=progress, max_images=max_images,
                    step=step, desc="tflite")


def evaluate_tflite(cli: dict) -> dict:
    """``eval.py --tflite FILE``: accuracy of a .tflite model in the interpreter.

    Data flags default to the ``config.json`` beside the file (the checkpoint directory the
    default ``--output`` writes to), then to the config file; the image size and class count
    come from the model itself.
    """
    from adj_quant import data as data_lib
    from adj_quant.trainer import data_args

    path = cli["tflite"]
    if not os.path.isfile(path):
        raise UserError(f"--tflite {path}: no such file")
    runner = TFLiteRunner(path)
    if "img_size" in cli and cli["img_size"] != runner.img_size:
        raise UserError(f"--img_size {cli['img_size']} but {path} takes {runner.img_size}x"
                        f"{runner.img_size} images; drop --img_size")
    o = resolve_options({**cli, "img_size": runner.img_size}, path)
    name, dataset_dir, _, offset = data_args(o)
    classes = o.num_classes or runner.num_classes
    batch = max(o.batch_size, 64)
    dataset = data_lib.make_dataset(name, "validation", batch_size=batch, img_size=runner.img_size,
                                    training=False, dataset_dir=dataset_dir, labels_offset=offset,
                                    num_classes=classes, eval_crop=o.eval_crop)
    result = interpreter_accuracy(path, dataset, batch=batch, progress=o.progress,
                                  max_images=o.max_val_images)
    result.update(tflite=path, size_bytes=os.path.getsize(path))
    return result


# --------------------------------------------------------------------------- CLI


DATA_HELP = {
    "dataset": "'digits', 'synthetic', or a directory of slim ImageNet TFRecord shards: the "
               "representative images (int8, adjustable) and the --eval data (default: the "
               "checkpoint's, from the config.json beside it)",
    "img_size": "input size of the exported model (default: the checkpoint's training size)",
    "num_classes": "number of classes (default: the checkpoint's)",
    "labels_offset": "subtracted from TFRecord labels for --eval (default: the checkpoint's)",
    "batch_size": "with --eval: images per interpreter call is the larger of this and 64",
    "max_val_images": "with --eval: evaluate at most this many validation images (default: all)",
    "config": "TOML config file for defaults the checkpoint's config.json does not set",
    "progress": "show a progress bar during --eval",
    "seed": "seed of the representative image sample",
}


def parse(argv=None) -> dict:
    parser = build_parser("python -m adj_quant.export", __doc__.split("\n\n")[0], extra=EXTRA,
                          fields=DATA_FIELDS)
    for action in parser._actions:  # noqa: SLF001 (export-specific wording of shared flags)
        if action.dest in DATA_HELP:
            action.help = DATA_HELP[action.dest]
    return vars(parser.parse_args(argv))


@cli_main
def main(argv=None) -> dict:
    cli = parse(argv)
    evaluate = cli.pop("evaluate", False)
    if evaluate and cli["format"] != "tflite":
        raise UserError("--eval evaluates a .tflite file; drop it with --format saved_model")
    result = export(cli)
    print(f"wrote {result['output']} ({result['size_bytes']:,} bytes, {result['quantization']} "
          f"{result['format']} of the {result['model_kind']} checkpoint {result['checkpoint']})")
    if result.get("activation_ranges"):
        print(f"activation ranges: {result['activation_ranges']}")
    if evaluate:
        o = result["options"]  # the checkpoint's data, wherever the file went
        accuracy = evaluate_tflite({
            "tflite": result["output"], "dataset": o.dataset, "num_classes": o.num_classes,
            "labels_offset": o.labels_offset, "batch_size": o.batch_size,
            "max_val_images": o.max_val_images, "config": o.config, "progress": o.progress})
        print(f"interpreter top-1: {100 * accuracy['top1']:.2f}%   top-5: "
              f"{100 * accuracy['top5']:.2f}%   ({accuracy['images']} images)")
        result.update({f"eval_{k}": v for k, v in accuracy.items()})
    return result


def console_main() -> None:
    """``adjq-export``: :func:`main` without its return value (which would be printed)."""
    main()


if __name__ == "__main__":
    main()
