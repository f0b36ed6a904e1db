"""TFLite export of a float or quantized network: the BN-folded inference graph, the
conversion (float, dynamic-range, int8, adjustable) and the learned weight levels.

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
  (sigmoid, products, sums) are calibrated on the representative dataset. A conv or
  depthwise weight tensor whose channels all hold learned levels in [-7, 7] is stored as
  INT4 (:func:`int4_steps`, ``ExportNet.int4``). A conv with only some such channels is
  split in two ops, the fitting channels INT4 and the others INT8, whose outputs are
  concatenated and put back in order by one ``GATHER``. INT8 channels hold their learned
  levels where those fit (:func:`snap_to_learned_levels`).

See docs/export.md for what TFLite can and cannot represent exactly.
"""

from __future__ import annotations

import numpy as np

from adj_quant.errors import UserError

#: Conversion modes of :func:`convert`.
QUANTIZATIONS = ("float", "dynamic", "int8", "adjustable")

# --------------------------------------------------------------------------- the inference network


class ExportNet:
    """The BN-folded network as constants: what gets converted.

    ``layers[scope] = (kind, stride, weights, biases)`` (numpy); ``act_ranges`` maps an
    activation-quantizer site (``<scope>/input``, ``/swish_input``, ``/sigmoid_input``) to the
    per-tensor ``(min, max)`` a ``fake_quant_with_min_max_vars`` op imposes there
    (``adjustable``).
    """

    def __init__(self, arch, layers: dict, act_ranges: dict | None = None,
                 int4: dict | None = None):
        self.arch = arch
        self.layers = layers
        self.act_ranges = act_ranges or {}
        #: ``scope -> step`` (per output channel) of the weight tensors stored as INT4:
        #: their values ``k * step_c`` (``|k| <= 7``) pass through a 4-bit narrow-range
        #: per-channel fake quant over ``[-7 step_c, 7 step_c]``, which leaves them on their
        #: grid and tells the converter to write INT4 with scale ``step_c``. A NaN step marks
        #: a channel that stays INT8: the layer is split (:meth:`_split_linear`).
        self.int4 = int4 or {}
        #: ``scope -> (min, max)``: an 8-bit fake quant on the output of an INT4 layer whose
        #: output has none (the converter writes INT4 only for a layer between fake quants);
        #: the range is the one calibration would give that tensor (:func:`output_ranges`).
        self.out_ranges: dict = {}
        self._observed: dict | None = None
        #: ``scope -> the model's output channels the layer keeps`` (index array) for a layer
        #: that lost channels (:func:`remove_channels`); the others keep all.
        self.channels: dict = {}

    def model_channels(self, scope: str):
        """The model's output channels that layer ``scope`` computes (an index array), or
        ``slice(None)`` for all of them."""
        kept = self.channels.get(scope)
        return slice(None) if kept is None else kept

    def is_split(self, scope: str) -> bool:
        """Whether ``scope`` exports as two ops, an INT4 and an INT8 one."""
        return scope in self.int4 and bool(np.isnan(self.int4[scope]).any())

    def split_channels(self, scope: str) -> tuple[np.ndarray, np.ndarray]:
        """``(int4, int8)``: the output channels of a split layer in each op."""
        fits = ~np.isnan(self.int4[scope])
        return np.flatnonzero(fits), np.flatnonzero(~fits)

    def _int4_weights(self, scope: str, kind: str, weights, channels=None):
        import tensorflow as tf

        if scope not in self.int4:
            return weights
        step = np.asarray(self.int4[scope], np.float32)
        if channels is not None:
            step = step[channels]
        lo, hi = tf.constant(-7.0 * step), tf.constant(7.0 * step)
        if kind == "dws":  # [h, w, C, 1]: the per-channel fake quant takes the last axis
            shape = weights.shape
            moved = tf.reshape(weights, [shape[0], shape[1], 1, shape[2]])
            moved = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                moved, lo, hi, num_bits=4, narrow_range=True)
            return tf.reshape(moved, shape)
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(
            weights, lo, hi, num_bits=4, narrow_range=True)

    def _fake_quant(self, name: str, x):
        import tensorflow as tf

        if name not in self.act_ranges:
            return x
        lo, hi = self.act_ranges[name]
        return tf.quantization.fake_quant_with_min_max_vars(
            x, tf.constant(lo, tf.float32), tf.constant(hi, tf.float32), num_bits=8,
            narrow_range=False)

    def _output_range(self, scope: str, moved: dict) -> tuple[float, float]:
        """The ``(min, max)`` of the first fake quant the output of ``scope`` meets: the
        INT4 half of a split layer is fake-quantized to it, so that the concatenation and
        the gather keep one scale and add no requantization."""
        from adj_quant import network as nw

        if scope in moved:
            return self.act_ranges[moved[scope]]
        for fn in nw.QUANTIZED_ACTIVATIONS:
            if f"{scope}/{fn}_input" in self.act_ranges:
                return self.act_ranges[f"{scope}/{fn}_input"]
        if scope in self.out_ranges:
            return self.out_ranges[scope]
        after = self.consumers().get(scope, [])
        ranges = {self.act_ranges.get(f"{node.name}/input") for node in after}
        if len(ranges) == 1 and None not in ranges:
            return ranges.pop()
        raise RuntimeError(f"{scope}: a split layer's output meets no single fake quant")

    def _split_linear(self, scope: str, x, moved: dict):
        """The layer as an INT4 op on its fitting channels and an INT8 op on the others,
        concatenated and gathered back into channel order (exactly the layer's output)."""
        import tensorflow as tf

        from adj_quant import network as nw

        kind, stride, weights, biases = self.layers[scope]
        node = self.arch.node(scope)
        int4, int8 = self.split_channels(scope)
        options = nw.linear_options(node)
        low = nw.apply_linear(kind, x, self._int4_weights(scope, kind, weights[..., int4], int4),
                              stride, node.padding, **options) + biases[int4]
        if self._observed is None:  # the ranges are known (not while observing them)
            lo, hi = self._output_range(scope, moved)
            low = tf.quantization.fake_quant_with_min_max_vars(
                low, tf.constant(lo, tf.float32), tf.constant(hi, tf.float32), num_bits=8,
                narrow_range=False)
        high = nw.apply_linear(kind, x, weights[..., int8], stride, node.padding,
                               **options) + biases[int8]
        order = np.argsort(np.concatenate([int4, int8])).astype(np.int32)
        return tf.gather(tf.concat([low, high], axis=-1), order, axis=-1)

    def consumers(self) -> dict[str, list]:
        """``node name -> the nodes that read its output`` (each once)."""
        out: dict[str, list] = {}
        for node in self.arch.nodes:
            for source in set(self.arch.inputs_of(node)):
                out.setdefault(source, []).append(node)
        return out

    def _moved_input_ranges(self) -> dict:
        """``producer scope -> "<consumer>/input"``: a layer whose output feeds another
        layer's input quantizer and also something else (a projection feeding the next
        block's expansion and its residual sum). The fake quant goes on the producer's output,
        shared by every consumer; the converter otherwise leaves the producer float."""
        consumers = self.consumers()
        moved = {}
        for scope in self.layers:
            source = self.arch.inputs_of(self.arch.node(scope))[0]
            if (f"{scope}/input" in self.act_ranges and source in self.layers
                    and len(consumers.get(source, [])) > 1):
                moved[source] = f"{scope}/input"
        return moved

    def __call__(self, images):
        import tensorflow as tf

        from adj_quant import network as nw

        moved = self._moved_input_ranges()

        def layer(scope, x, training=False):
            kind, stride, weights, biases = self.layers[scope]
            if scope in self.int4 and self.arch.is_stem(self.arch.node(scope)):
                # The converter takes a weight fake quant only where the layer's input has
                # one too; the stem's input is the image in [0, 1], 8 bits.
                x = tf.quantization.fake_quant_with_min_max_vars(
                    x, tf.constant(0.0), tf.constant(1.0), num_bits=8, narrow_range=False)
            if f"{scope}/input" not in moved.values():
                x = self._fake_quant(f"{scope}/input", x)
            if self.is_split(scope):
                y = self._split_linear(scope, x, moved)
            else:
                weights = self._int4_weights(scope, kind, weights)
                y = nw.apply_linear(kind, x, weights, stride, self.arch.node(scope).padding,
                                    **nw.linear_options(self.arch.node(scope))) + biases
            if self._observed is not None:
                lo, hi = float(tf.reduce_min(y)), float(tf.reduce_max(y))
                old = self._observed.get(scope, (lo, hi))
                self._observed[scope] = (min(lo, old[0]), max(hi, old[1]))
            if scope in moved:
                y = self._fake_quant(moved[scope], y)
            if scope in self.out_ranges:
                lo, hi = self.out_ranges[scope]
                y = tf.quantization.fake_quant_with_min_max_vars(
                    y, tf.constant(lo, tf.float32), tf.constant(hi, tf.float32), num_bits=8,
                    narrow_range=False)
            return y

        def activation(scope, fn, x):
            if fn in nw.QUANTIZED_ACTIVATIONS:
                x = self._fake_quant(f"{scope}/{fn}_input", x)
            return nw.ACTIVATIONS[fn](x)

        return self.arch.forward(images, layer, activation=activation)


# --------------------------------------------------------------------------- removed channels

#: Operations that act on each channel alone: their input and output carry the same channels.
_CHANNELWISE = ("act", "gap", "maxpool", "avgpool", "pad", "crop", "dropout")


def carried_channels(arch, layers: dict, img_size: int = 224) -> dict[str, tuple]:
    """``scope -> (input channels, output channels)`` (index arrays, ``None``: all) that the
    exported graph needs to compute, from the exported weights themselves.

    A channel is left out of a tensor when it is 0 for every image (*dead*: no nonzero weight
    reads a live channel and the bias is 0; it stays 0 through swish, ReLU and the like, a
    product with it is 0) or when nothing downstream reads it (*unused*: its consumers' weights
    from it are 0, or it is multiplied by a dead channel, as an SE gate is where the block's
    channel was removed). Tensors joined channel by channel (an activation, a pool, a
    depthwise, the factors of a product, the terms of a sum) carry the same channels, so
    nothing has to be scattered back: a sum keeps a channel when either term is live. The
    image, the logits and the inputs and outputs of concatenations, slices, flatten, layer
    norm and grouped convolutions keep every channel. ``img_size``: the exported input
    size (a flatten's channels depend on it)."""
    from adj_quant import network as nw
    from adj_quant.cost import ZERO_PRESERVING

    nodes = arch.nodes
    channels = {name: shape.channels for name, shape in arch.shapes(img_size).items()}
    channels[nw.IMAGE] = len(arch.input_mean)
    live = {nw.IMAGE: np.ones(channels[nw.IMAGE], bool)}

    def depthwise(name):  # a depthwise layer with one output channel per input channel
        return name in layers and layers[name][0] == "dws" and layers[name][2].shape[3] == 1

    def reads(weights, alive_in):  # conv / FC: [..., cin, cout] -> [cout] any nonzero live tap
        nonzero = (weights != 0).reshape(-1, weights.shape[-2], weights.shape[-1]).any(axis=0)
        return (nonzero & alive_in[:, None]).any(axis=0)

    for node in nodes:
        names = arch.inputs_of(node)
        x = live[names[0]]
        if node.name in layers:
            kind, _, weights, biases = layers[node.name]
            if kind == "dws":
                taps = (weights != 0).any(axis=(0, 1, 3))
                y = ((taps & x) | (biases != 0) if weights.shape[3] == 1
                     else np.ones(channels[node.name], bool))
            elif node.groups != 1:
                y = np.ones(channels[node.name], bool)
            else:
                y = reads(weights, x) | (biases != 0)
        elif node.op == "act":
            y = x.copy() if node.fn in ZERO_PRESERVING else np.ones_like(x)
        elif node.op == "mul":
            y = x & live[names[1]]
        elif node.op == "add":
            y = x | live[names[1]]
        elif node.op in _CHANNELWISE:
            y = x.copy()
        else:
            y = np.ones(channels[node.name], bool)
        live[node.name] = y
    # Which channels are read, from the logits back.
    used = {name: np.zeros(n, bool) for name, n in channels.items()}
    used[nodes[-1].name][:] = True
    for node in reversed(nodes):
        names = arch.inputs_of(node)
        out = used[node.name]
        if depthwise(node.name):
            used[names[0]] |= out
        elif node.name in layers and node.groups == 1 and layers[node.name][0] != "dws":
            weights = layers[node.name][2]
            nonzero = (weights != 0).reshape(-1, weights.shape[-2], weights.shape[-1])
            used[names[0]] |= nonzero.any(axis=0)[:, out].any(axis=1)
        elif node.op == "mul":
            used[names[0]] |= out & live[names[1]]
            used[names[1]] |= out & live[names[0]]
        elif node.op == "add" or node.op in _CHANNELWISE:
            for name in names:
                used[name] |= out
        else:
            for name in names:
                used[name][:] = True
    # Tensors joined channel by channel share one set: the channels any of them needs.
    group = {name: name for name in channels}

    def root(name):
        while group[name] != name:
            group[name] = group[group[name]]
            name = group[name]
        return name

    full = {nw.IMAGE, nodes[-1].name}
    for node in nodes:
        names = arch.inputs_of(node)
        if node.op in ("mul", "add") or node.op in _CHANNELWISE or depthwise(node.name):
            for name in names:
                group[root(name)] = root(node.name)
        elif node.name not in layers or node.groups != 1 or layers[node.name][0] == "dws":
            full.update(names)
            full.add(node.name)
    keep = {}
    for name in channels:
        r = root(name)
        keep[r] = keep.get(r, np.zeros(channels[name], bool)) | (used[name] & live[name])
    for name in full:
        keep[root(name)][:] = True
    for r, k in keep.items():
        if not k.any():  # a tensor with no channel left keeps one (TFLite has no empty tensors)
            k[0] = True

    def index(name):
        k = keep[root(name)]
        return None if k.all() else np.flatnonzero(k)

    return {scope: (index(arch.inputs_of(arch.node(scope))[0]), index(scope)) for scope in layers}


def remove_channels(net: ExportNet, img_size: int = 224) -> int:
    """Drop from ``net`` the channels :func:`carried_channels` finds no use for: the
    layers' weights and biases lose those input and output channels, and ``net.channels``
    records which of the model's channels each layer kept. Returns the weights removed."""
    removed = 0
    for scope, (cin, cout) in carried_channels(net.arch, net.layers, img_size).items():
        if cin is None and cout is None:
            continue
        kind, stride, weights, biases = net.layers[scope]
        before = weights.size
        if kind == "dws":
            weights = weights[:, :, cout] if cout is not None else weights
        else:
            weights = weights if cin is None else np.take(weights, cin, axis=-2)
            weights = weights if cout is None else np.take(weights, cout, axis=-1)
        biases = biases if cout is None else biases[cout]
        net.layers[scope] = (kind, stride, weights, biases)
        net.channels[scope] = cout
        removed += before - weights.size
    return removed


def export_net(model, spec, quantization: str) -> ExportNet:
    """The :class:`ExportNet` of a restored float or quantized model."""
    from adj_quant.network import fold_batch_norm
    from adj_quant.qnetwork import ACTIVATION_SITES

    layers = {}
    alive = {} if spec.kind == "float" else model.output_liveness() or {}
    for scope, layer in model.layers.items():
        if spec.kind == "float":
            weights, biases = fold_batch_norm(layer)
        else:
            weights, biases = layer.quantized_weights(alive.get(scope))
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
            raise UserError(f"{quantization} quantization needs representative images")

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
        raise UserError(
            f"TFLite conversion ({quantization}) failed: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else err!r}"
        ) from err


# --------------------------------------------------------------------------- learned weight levels

# TFLite keeps int8 conv / depthwise / FC weights symmetric per output channel: real value =
# scale_c * k with k in [-127, 127] and zero point 0. The converter picks
# scale_c = max|w_c| / 127, which re-rounds a learned grid {q / s_c : q in [z_c, z_c + 2^b - 1]}
# onto another one (levels move by up to half an int8 step and neighbours can merge). When
# every |q| <= 127 (b <= 7 and a range around 0) the learned grid itself fits: scale_c = 1/s_c,
# k = q. :func:`snap_to_learned_levels` rewrites those channels in the converted file.

_LINEAR_OPS = {3: "conv", 4: "dws", 9: "fc"}  # BuiltinOperator CONV_2D, DEPTHWISE_CONV_2D, FC
_INT8, _INT32, _INT4 = 9, 2, 17               # TensorType


def learned_grid(quant, values: np.ndarray, axis: int,
                 channels=slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """``(q, s)``: the integer level of every fake-quantized value and each channel's scale.

    ``values`` are the quantizer's outputs (``q / s_c``) with channels on ``axis``: the
    quantizer's ``channels`` (all, or those a layer kept, ``ExportNet.model_channels``).
    """
    from adj_quant.packed import quantizer_grid

    scale = quantizer_grid(quant)[0].astype(np.float64)[channels]  # s_c as the quantizer has it
    shape = [1] * values.ndim
    shape[axis] = -1
    q = np.round(values.astype(np.float64) * scale.reshape(shape))
    return q, scale


#: A conv whose INT4-fitting channels would save fewer bytes than this is not split: the split
#: adds a CONCATENATION, a GATHER and their tensors to the file (measured: ~1 KB).
MIN_SPLIT_SAVING = 2048


def int4_steps(model, net: ExportNet, split: bool = True,
               min_saving: int = MIN_SPLIT_SAVING) -> dict:
    """``scope -> per-channel step`` of the weight tensors stored (wholly or partly) as INT4:
    what :attr:`ExportNet.int4` holds.

    A channel fits INT4 when it holds learned levels ``q / s_c`` with ``|q| <= 7`` (learned
    bits <= 4 and a grid around 0; always, at bits <= 4, for a symmetric grid,
    ``--symmetric_weights``, whose levels are ``k / s_c`` with ``|k| <= 2^(b-1) - 1``). A conv
    or depthwise tensor whose channels all fit is INT4. With ``split``, a conv (not grouped)
    with some fitting channels gets a NaN step on the others and is exported as two ops
    (:meth:`ExportNet._split_linear`) when that saves at least ``min_saving`` bytes.
    Depthwise tensors are not split (a split would gather the input too), nor FC weights,
    which stay INT8: the converter refuses a per-channel fake quant on them and a
    per-tensor one would re-round channels of different steps."""
    steps = {}
    for scope, (kind, _, weights, _) in net.layers.items():
        if kind == "fc":
            continue
        axis = 2 if kind == "dws" else weights.ndim - 1
        q, s = learned_grid(model.layers[scope].weight_quant, weights, axis,
                            net.model_channels(scope))
        shape = [1] * weights.ndim
        shape[axis] = -1
        on_grid = np.abs(q / s.reshape(shape) - weights) <= 1e-5 * (np.abs(weights) + 1e-3)
        fits = np.moveaxis(on_grid & (np.abs(q) <= 7), axis, 0).reshape(len(s), -1).all(axis=1)
        # A channel of zeros (removed by pruning) gets step 1: its grid is not stored.
        zero = np.moveaxis(weights, axis, 0).reshape(len(s), -1).any(axis=1) == 0
        step = np.where(zero, 1.0, 1.0 / s).astype(np.float32)
        if fits.all():
            steps[scope] = step
            continue
        per_channel = weights.size // len(s)
        if (split and kind == "conv" and net.arch.node(scope).groups == 1
                and fits.sum() * per_channel / 2 >= min_saving):
            steps[scope] = np.where(fits, step, np.nan).astype(np.float32)
    return steps


def output_ranges(net: ExportNet, representative: np.ndarray) -> dict:
    """``scope -> (min, max)`` over ``representative`` of the output of every INT4 layer
    whose output meets no fake quant: not a swish / sigmoid input, nor fed straight into
    another layer (whose ``/input`` has one). 0 is included, as TFLite needs."""
    import tensorflow as tf

    consumers = net.consumers()
    layer_names = set(net.layers)

    moved = net._moved_input_ranges()

    def quantized_after(scope):
        if (f"{scope}/swish_input" in net.act_ranges or f"{scope}/sigmoid_input" in net.act_ranges
                or scope in moved):
            return True
        after = consumers.get(scope, [])
        return bool(after) and all(node.name in layer_names and f"{node.name}/input"
                                   in net.act_ranges for node in after)

    wanted = [scope for scope in net.int4 if not quantized_after(scope)]
    if not wanted:
        return {}
    net._observed = {}
    try:
        for start in range(0, len(representative), 32):
            net(tf.constant(representative[start:start + 32], tf.float32))
        observed = net._observed
    finally:
        net._observed = None
    return {scope: (min(observed[scope][0], 0.0), max(observed[scope][1], 0.0))
            for scope in wanted}


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
    parts = _match_ops(linear, model.arch.layer_names, net, graph)
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
    for op, scope, part in parts:
        kind, _, weights, biases = net.layers[scope]
        w_t, x_t = graph.tensors[op.inputs[1]], graph.tensors[op.inputs[0]]
        # The converter drops an all-zero bias (input -1).
        b_t = graph.tensors[op.inputs[2]] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
        if part is not None:
            biases = biases[part]
        if b_t is None and np.any(biases != 0):
            raise RuntimeError(f"{scope}: the converted model lost the layer's bias")
        if w_t.type not in (_INT8, _INT4) or (b_t is not None and b_t.type != _INT32):
            raise RuntimeError(f"{scope}: weights/bias of the converted model are not "
                               "int8/int4 and int32")
        int4 = w_t.type == _INT4
        if int4:
            stored = unpack_int4(fb.buffers[w_t.buffer].data, w_t.shape)
        else:
            stored = read(w_t, np.int8)
        old_scale = np.asarray(w_t.quantization.scale, np.float64)
        axis = w_t.quantization.quantizedDimension
        full = _to_tflite_layout(kind, weights)
        q, s = learned_grid(model.layers[scope].weight_quant, full, axis,
                            net.model_channels(scope))
        target = full
        if part is not None:
            target, q, s = np.take(full, part, axis), np.take(q, part, axis), s[part]
        if stored.shape != target.shape or old_scale.size != target.shape[axis]:
            raise RuntimeError(f"{scope}: converted weights {list(stored.shape)} do not match "
                               f"the layer's {list(target.shape)}")
        shape = [1] * target.ndim
        shape[axis] = -1
        converted = stored * old_scale.reshape(shape)
        if np.any(np.abs(converted - target) > 0.5001 * old_scale.reshape(shape) + 1e-6):
            raise RuntimeError(f"{scope}: converted weights are not this layer's values")
        on_grid = np.abs(q / s.reshape(shape) - target) <= 1e-5 * (np.abs(target) + 1e-3)
        fits = np.moveaxis((np.abs(q) <= 127) & on_grid, axis, 0).reshape(len(s), -1).all(axis=1)
        if int4 and not (fits.all() and np.array_equal(stored, q)):
            raise RuntimeError(f"{scope}: the INT4 weights are not the learned levels")
        # A channel of zeros (removed by pruning) keeps the converter's scale: it has no grid.
        fits &= np.moveaxis(target, axis, 0).reshape(len(s), -1).any(axis=1)
        new_ints = np.where(fits.reshape(shape), q, stored).astype(np.int8)
        new_scale = np.where(fits, 1.0 / s, old_scale).astype(np.float32)
        x_scale = float(x_t.quantization.scale[0])
        bias_scale = x_scale * new_scale.astype(np.float64)
        bias_ints = np.round(biases.astype(np.float64) / bias_scale)
        if np.any(np.abs(bias_ints) > 2 ** 31 - 1):
            raise RuntimeError(f"{scope}: a requantized bias overflows int32")
        if not int4:  # INT4 values are the learned levels already; only the scale moves
            write(w_t, new_ints)
        w_t.quantization.scale = new_scale
        if b_t is not None:
            write(b_t, bias_ints.astype(np.int32))
            b_t.quantization.scale = bias_scale.astype(np.float32)
        channels += len(s)
        exact += int(fits.sum())
        row = layers.setdefault(scope, {"channels": 0, "exact": 0, "weights": 0,
                                        "int4_weights": 0, "containers": []})
        row["channels"] += len(s)
        row["exact"] += int(fits.sum())
        row["weights"] += int(np.prod(stored.shape))
        row["int4_weights"] += int(np.prod(stored.shape)) if int4 else 0
        row["containers"].append("INT4" if int4 else "INT8")
    for row in layers.values():
        row["container"] = "+".join(sorted(set(row.pop("containers"))))  # INT4+INT8
    out = flatbuffer_utils.convert_object_to_bytearray(fb)
    return bytes(out), {"channels": channels, "exact_channels": exact, "layers": layers}


def _match_ops(linear: list, scopes: list, net: ExportNet, graph) -> list:
    """``[(op, scope, channels)]``: each conv / depthwise / FC op of the converted model (in
    execution order) with the layer and the output channels it computes (``None``: all).
    A split layer (:meth:`ExportNet.is_split`) has two ops, told apart by their weights'
    type."""
    expected = sum(2 if net.is_split(scope) else 1 for scope in scopes)
    if len(linear) != expected:
        raise RuntimeError(f"the converted model has {len(linear)} conv/depthwise/FC ops, the "
                           f"network's {len(scopes)} layers make {expected}")
    parts, ops = [], iter(linear)
    for scope in scopes:
        if not net.is_split(scope):
            parts.append((next(ops), scope, None))
            continue
        int4, int8 = net.split_channels(scope)
        pair = [next(ops), next(ops)]
        types = [graph.tensors[op.inputs[1]].type for op in pair]
        if sorted(types) != [_INT8, _INT4]:
            raise RuntimeError(f"{scope}: the two ops of a split layer are not INT4 and INT8")
        for op, kind in zip(pair, types):
            parts.append((op, scope, int4 if kind == _INT4 else int8))
    return parts


def unpack_int4(data, shape) -> np.ndarray:
    """The int8 values of an INT4 tensor's buffer (two per byte, low nibble first)."""
    raw = np.frombuffer(bytes(data), np.uint8)
    count = int(np.prod(shape))
    nibbles = np.stack([raw & 15, raw >> 4], axis=1).ravel()[:count].astype(np.int8)
    if nibbles.size != count:
        raise RuntimeError(f"an INT4 buffer of {raw.size} bytes holds fewer than {count} values")
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8).reshape(shape)


def tensor_types(tflite: bytes) -> list[int]:
    """The flatbuffer ``TensorType`` of the weights of every conv / depthwise / FC op, in
    execution order (9: INT8, 17: INT4, 0: FLOAT32)."""
    from tensorflow.lite.python import schema_util
    from tensorflow.lite.tools import flatbuffer_utils

    fb = flatbuffer_utils.read_model_from_bytearray(bytearray(tflite))
    graph = fb.subgraphs[0]
    return [graph.tensors[op.inputs[1]].type for op in graph.operators
            if schema_util.get_builtin_code_from_operator_code(
                fb.operatorCodes[op.opcodeIndex]) in _LINEAR_OPS]


def float_linear_ops(tflite: bytes) -> int:
    """Conv / depthwise / FC ops of a .tflite file whose weights are not int8 or int4."""
    from tensorflow.lite.python import schema_util
    from tensorflow.lite.tools import flatbuffer_utils

    fb = flatbuffer_utils.read_model_from_bytearray(bytearray(tflite))
    graph = fb.subgraphs[0]
    return sum(1 for op in graph.operators
               if schema_util.get_builtin_code_from_operator_code(
                   fb.operatorCodes[op.opcodeIndex]) in _LINEAR_OPS
               and graph.tensors[op.inputs[1]].type not in (_INT8, _INT4))

