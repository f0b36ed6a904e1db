"""Import a float Keras 3 functional model as a :class:`~adj_quant.network.Network`.

::

    net, weights = from_keras(keras.applications.MobileNetV2(...), input_range=(-1, 1))
    model = FloatNetwork(net)
    load_weights(model, weights)        # model(x) == keras_model(-1 + 2 * x), x in [0, 1]

:func:`from_keras` walks the model's graph (``model.operations`` in topological order,
each operation's ``input`` / ``output`` KerasTensors) and turns every layer into zero, one
or two declaration nodes; the weights come back keyed by slim variable name
(``<scope>/<node>/weights``, ``.../depthwise_weights``, ``.../biases``,
``.../BatchNorm/{gamma,beta,moving_mean,moving_variance}``), as
``FloatNetwork(net).slim_variables()`` names them.

Mapping rules (Keras layer -> nodes):

``InputLayer``
    The image. One input ``[N, H, W, 3]`` (square when H and W are known), channels last.
``Rescaling`` / ``Normalization`` directly after the input (a chain of them, nothing else
reading the raw input)
    No node: composed with ``input_range`` into the network's per-channel ``input_mean`` /
    ``input_std``. adjq feeds images ``x`` in ``[0, 1]``; the Keras model is taken to see
    ``lo + (hi - lo) * x`` for ``input_range=(lo, hi)`` (``(-1, 1)`` for MobileNetV2,
    ``(0, 255)`` for EfficientNet, whose first layers rescale and normalise). Then
    ``(x - input_mean) / input_std`` equals the output of the chain.
``Conv2D``, ``DepthwiseConv2D``, ``Dense``
    A ``conv`` / ``dws`` / ``fc`` node named after the layer, with ``biases`` (zeros when
    the layer has no bias). Square kernels and strides, no dilation, ``groups=1``,
    ``depth_multiplier=1``, ``channels_last``; ``Dense`` reads ``[N, features]``. A
    layer's own ``activation=`` becomes an extra ``act`` node ``<layer>/<fn>``.
``BatchNormalization``
    Only directly after a ``Conv2D`` / ``DepthwiseConv2D`` / ``Dense`` without its own
    activation whose output feeds nothing else: folded into that node's slim
    ``BatchNorm`` scope (``batch_norm=True``). A bias of that layer folds into
    ``moving_mean - bias``; ``center=False`` gives ``beta = 0``, ``scale=False``
    ``gamma = 1``. All batch norms must share one ``epsilon`` (the network's
    ``bn_epsilon``); the Keras momentum is not kept (``FloatNetwork(bn_momentum=...)``).
``ReLU`` (``max_value`` None or 6, no slope or threshold), ``Activation``
    An ``act`` node: ``relu``, ``relu6``, ``swish`` / ``silu`` -> swish, ``sigmoid``,
    ``hard_swish`` / ``hard_silu`` -> hard_swish; ``linear`` is no node.
``Add`` (two inputs of one shape), ``Multiply`` (two inputs)
    ``add`` / ``mul`` nodes. A ``mul`` takes the larger (feature map) operand first and the
    ``[N, 1, 1, C]`` gate second, as squeeze-excitation does.
``Dropout``
    One with the per-example ``noise_shape=(None, 1, 1, 1)`` that feeds nothing but an
    ``Add`` becomes that add's drop-connect: the dropped operand goes first and
    ``drop_path = (index, total)`` with ``index / total = rate / 0.2``, so that
    ``FloatNetwork``'s default ``drop_connect_rate=0.2`` reproduces the Keras rate (and
    other rates scale it). Any other ``Dropout`` becomes a ``dropout`` node, which uses
    the network-wide ``dropout_rate`` (the Keras rate is not kept).
``GlobalAveragePooling2D``
    A ``gap`` node (``keepdims`` kept). A following ``Reshape`` to ``(1, 1, C)`` that is its
    only consumer is no node: the pool keeps its dims instead. No other ``Reshape``.
``ZeroPadding2D``
    A ``pad`` node (``top + bottom == left + right``).
``MaxPooling2D``
    A ``maxpool`` node (square pool size and strides).

The last layer must be a ``Dense``: the network outputs its logits. A ``softmax`` on it
(its own ``activation="softmax"`` or a final ``Activation("softmax")`` / ``Softmax``) is
dropped. Anything else (another layer, a supported layer in an unsupported position, a
layer called twice, a nested model, a Sequential or subclassed model, several inputs or
outputs, an input without 3 channels) raises a one-line
:class:`~adj_quant.errors.UserError` naming the layer and its class.

Node names are the Keras layer names, made valid (``[A-Za-z0-9_.-]``) and unique; the slim
scope is ``scope`` (a Python identifier, as ``tf.Module`` names are), by default ``name``
made one. ``params`` is ``(("num_classes", n),)``.
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction

import numpy as np

from adj_quant.errors import UserError
from adj_quant.network import IMAGE, Network, Node

SUPPORTED_LAYERS = (
    "InputLayer", "Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense",
    "BatchNormalization", "LayerNormalization", "ReLU", "Activation", "Add", "Multiply",
    "Concatenate", "GlobalAveragePooling2D", "AveragePooling2D", "MaxPooling2D", "Flatten",
    "Reshape", "Dropout", "ZeroPadding2D", "Cropping2D", "Rescaling", "Normalization",
    "Softmax", "LayerScale", "StochasticDepth", "CustomScaleLayer", "Sequential",
    "Functional", "keras.ops hard sigmoid relu6(x + 3) * (1 / 6)",
)
#: ``drop_path`` encodes a Keras drop-connect rate relative to this network-wide rate
#: (Keras' EfficientNet rate and ``FloatNetwork``'s default).
REFERENCE_DROP_CONNECT_RATE = 0.2

#: Keras activation name -> adjq ``act`` function (``None``: no node).
_ACTIVATIONS = {"relu": "relu", "relu6": "relu6", "silu": "swish", "swish": "swish",
                "sigmoid": "sigmoid", "hard_silu": "hard_swish", "hard_swish": "hard_swish",
                "hard_sigmoid": "hard_sigmoid", "gelu": "gelu", "linear": None}


def _keras():
    import keras  # noqa: PLC0415 (only the importer needs Keras)

    return keras


def _class_name(op) -> str:
    """The layer's class; a ``keras.ops`` operation (``x * y`` on KerasTensors) says so."""
    if isinstance(op, _keras().layers.Layer):
        return type(op).__name__
    return f"operation {type(op).__module__}.{type(op).__name__}"


def _fail(op, why: str) -> UserError:
    return UserError(f"cannot import Keras layer {op.name!r} ({_class_name(op)}): {why}; "
                     f"supported layers: {', '.join(SUPPORTED_LAYERS)}")


def _numpy(value) -> np.ndarray:
    keras = _keras()
    return np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float32)


def _pair(op, value, what: str) -> int:
    """The side of a square ``(a, a)`` kernel / stride / pool (an int is square)."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(values) != 2 or values[0] != values[1]:
        raise _fail(op, f"{what} {value!r} is not square")
    return int(values[0])


def _kernel(op) -> tuple[int, int]:
    """``(rows, columns)`` of a conv kernel."""
    values = tuple(op.kernel_size) if isinstance(op.kernel_size, (tuple, list)) else (
        op.kernel_size, op.kernel_size)
    return int(values[0]), int(values[-1])


def _model_graph(op):
    """The functional graph of a nested model (a Sequential's is built when it is called),
    or None for a subclassed model."""
    try:
        from keras.src.models.functional import Functional  # noqa: PLC0415
    except ImportError:  # pragma: no cover (Keras moved it)
        return getattr(op, "_functional", None) or (op if hasattr(op, "_nodes_by_depth")
                                                    else None)
    graph = getattr(op, "_functional", None) if not isinstance(op, Functional) else op
    return graph if isinstance(graph, Functional) else None


def _is_ops_call(op, name: str) -> bool:
    """Whether ``op`` is the ``keras.ops`` operation ``name`` (``x + 3`` on KerasTensors)."""
    return type(op).__name__ == name and type(op).__module__.startswith("keras.src.ops")


def _constant_operand(op):
    """``(tensor, constant)`` of a binary ``keras.ops`` call on one tensor and a number."""
    nodes = getattr(op, "_inbound_nodes", ())
    if len(nodes) != 1:
        return None, None
    args = list(nodes[0].arguments.args)
    if len(args) != 2:
        return None, None
    numbers = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    tensors = [a for a in args if a is not None and not isinstance(a, (int, float))]
    if len(numbers) != 1 or len(tensors) != 1:
        return None, None
    return tensors[0], float(numbers[0])


def _padding(op) -> str:
    padding = str(op.padding).upper()
    if padding not in ("SAME", "VALID"):
        raise _fail(op, f"padding {op.padding!r}; use 'same' or 'valid'")
    return padding


def _channels_last(op) -> None:
    if getattr(op, "data_format", "channels_last") != "channels_last":
        raise _fail(op, f"data_format {op.data_format!r}; only channels_last is supported")


def _activation_name(op, fn) -> str:
    """The Keras name of a built-in activation function ``fn``."""
    keras = _keras()
    for name in list(_ACTIVATIONS) + ["softmax"]:
        if fn is keras.activations.get(name):
            return name
    raise _fail(op, f"activation {getattr(fn, '__name__', fn)!r} is not supported; use one "
                    f"of {', '.join(_ACTIVATIONS)}")


def _channel_vector(op, value, what: str) -> np.ndarray:
    """A scalar or per-channel constant as 3 float64 values."""
    array = np.asarray(_numpy(value) if not isinstance(value, (int, float, list, tuple))
                       else value, dtype=np.float64)
    if array.ndim and any(d != 1 for d in array.shape[:-1]):
        raise _fail(op, f"{what} of shape {array.shape} is not per channel")
    array = array.reshape(-1)
    if array.size not in (1, 3):
        raise _fail(op, f"{what} has {array.size} values; the image has 3 channels")
    return np.broadcast_to(array, (3,)).astype(np.float64)


@dataclasses.dataclass
class _Spec:
    """A node under construction (``Node`` is frozen)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    fields: dict


class _Importer:
    def __init__(self, model, name: str, scope: str | None, input_range):
        self.keras = _keras()
        self.model = model
        self.name = name
        if scope is None:  # a valid scope from the name
            scope = re.sub(r"\W", "_", name)
            scope = scope if scope.isidentifier() else f"net_{scope}"
        if not (isinstance(scope, str) and scope.isidentifier()):
            raise UserError(f"scope {scope!r} is not a valid slim scope (a Python identifier, "
                            "as tf.Module names are)")
        self.scope = scope
        self._check_model()
        lo, hi = (float(v) for v in input_range)
        if not np.isfinite([lo, hi]).all() or lo == hi:
            raise UserError(f"input_range {tuple(input_range)!r} must be two different finite "
                            "numbers (lo, hi)")
        # The Keras-side value of an adjq image x is a * x + b, per channel.
        self.a = np.full(3, hi - lo, np.float64)
        self.b = np.full(3, lo, np.float64)
        self.specs: list[_Spec] = []
        self.used_names = {IMAGE}
        self.names: dict[int, str] = {}          # id(KerasTensor) -> node name / IMAGE
        self.raw: int | None = None              # id of the (pre-processed) input tensor
        self.linear: dict[int, tuple[_Spec, object]] = {}  # linear output -> spec, layer
        self.gap: dict[int, _Spec] = {}
        self.weights: dict[str, dict[str, np.ndarray]] = {}  # node -> slim leaf -> array
        self.epsilons: dict[float, str] = {}
        self.consumers: dict[int, list] = {}    # id(KerasTensor) -> the ops reading it
        self.producer: dict[int, object] = {}   # id(KerasTensor) -> the op making it
        self.drop_connect: dict[int, object] = {}  # id(Dropout) -> the Add it feeds
        self.done: set[int] = set()             # id(op) of ops imported with an earlier one
        self.scalable: dict[int, _Spec] = {}    # linear (or linear + BN) output -> spec
        self.flat: set[int] = set()             # [N, 1, 1, C] tensors that are [N, C] here

    # ----------------------------------------------------------------- model checks

    def _check_model(self) -> None:
        keras = self.keras
        model = self.model
        if not isinstance(model, keras.Model):
            raise UserError(f"from_keras takes a Keras functional model, not "
                            f"{type(model).__name__}")
        try:
            from keras.src.models.functional import Functional  # noqa: PLC0415
            functional = isinstance(model, Functional)
        except ImportError:  # pragma: no cover (Keras moved it)
            functional = hasattr(model, "_nodes_by_depth")
        if isinstance(model, keras.Sequential):
            graph = _model_graph(model)
            if graph is None:
                raise UserError(f"Sequential model {model.name!r} has no input shape yet; "
                                "start it with keras.Input((H, W, 3))")
            self.model = model = graph
        elif not functional:
            raise UserError(f"model {model.name!r} ({type(model).__name__}) is a subclassed "
                            "model with no graph to import; rebuild it with "
                            "keras.Model(inputs, outputs)")
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise UserError(f"model {model.name!r} has {len(model.inputs)} inputs and "
                            f"{len(model.outputs)} outputs; only one image input and one "
                            "logits output are supported")
        shape = tuple(model.inputs[0].shape)
        if len(shape) != 4 or shape[-1] != 3:
            raise UserError(f"model {model.name!r}: input shape {shape} is not "
                            "[batch, height, width, 3] (RGB images, channels last)")
        if shape[1] is not None and shape[2] is not None and shape[1] != shape[2]:
            raise UserError(f"model {model.name!r}: input shape {shape} is not square")

    # ----------------------------------------------------------------- helpers

    def _unique(self, name: str) -> str:
        name = re.sub(r"[^A-Za-z0-9_.\-/]", "_", name)
        if not re.match(r"[A-Za-z0-9.]", name):
            name = "layer" + name
        candidate, i = name, 1
        while candidate in self.used_names:
            candidate = f"{name}_{i}"
            i += 1
        self.used_names.add(candidate)
        return candidate

    def _emit(self, name: str, op: str, inputs: tuple[str, ...], **fields) -> _Spec:
        spec = _Spec(self._unique(name), op, inputs, fields)
        self.specs.append(spec)
        return spec

    def _inputs(self, op) -> list:
        tensors = op.input if isinstance(op.input, (list, tuple)) else [op.input]
        for t in tensors:
            if id(t) not in self.names:
                raise _fail(op, "its input does not come from this model's layers (a layer "
                                "called more than once, or a nested model)")
        return list(tensors)

    def _source(self, op) -> tuple[object, str]:
        tensors = self._inputs(op)
        if len(tensors) != 1:
            raise _fail(op, f"takes {len(tensors)} inputs; expected one")
        tensor = tensors[0]
        if self.names[id(tensor)] == IMAGE and id(tensor) == self.raw:
            self.raw = None  # preprocessing ends where a layer reads the image
        return tensor, self.names[id(tensor)]

    def _output(self, op):
        output = op.output
        if isinstance(output, (list, tuple)):
            raise _fail(op, "has several outputs")
        return output

    def _is_logits_output(self, tensor) -> bool:
        return tensor is self.model.outputs[0]

    # ----------------------------------------------------------------- the walk

    def run(self) -> tuple[Network, dict[str, np.ndarray]]:
        operations = self._index(self.model)
        self._find_drop_connect(operations)
        image = self.model.inputs[0]
        self.names[id(image)] = IMAGE
        self.raw = id(image)
        self._walk(self.model)
        return self._finish()

    def _index(self, graph) -> list:
        """Producers and consumers of every tensor of ``graph`` and of the models nested in
        it; returns all their operations (topologically sorted, each graph in turn)."""
        operations = []
        for op in graph.operations:  # topologically sorted
            operations.append(op)
            outputs = op.output if isinstance(op.output, (list, tuple)) else [op.output]
            for t in outputs:
                self.producer[id(t)] = op
            if isinstance(op, self.keras.layers.InputLayer):
                continue
            for t in op.input if isinstance(op.input, (list, tuple)) else [op.input]:
                self.consumers.setdefault(id(t), []).append(op)
            if isinstance(op, self.keras.Model):
                inner = _model_graph(op)
                if inner is None:
                    raise _fail(op, "a subclassed model has no graph to import; build it "
                                    "with keras.Model(inputs, outputs) or keras.Sequential")
                operations += self._index(inner)
        return operations

    def _walk(self, graph) -> None:
        handlers = self._handlers()
        for op in graph.operations:
            if id(op) in self.done:
                continue
            if isinstance(op, self.keras.Model):
                self._nested(op)
                continue
            if isinstance(op, self.keras.layers.InputLayer) and graph is not self.model:
                continue  # a nested model's input: the outer tensor, named by _nested
            handler = handlers.get(type(op))
            if handler is None:
                handler = self._custom_handler(op)
            if handler is None:
                raise _fail(op, "this layer is not supported")
            if len(getattr(op, "_inbound_nodes", ())) > 1:
                raise _fail(op, "the layer is called more than once (shared weights)")
            handler(op)

    def _custom_handler(self, op):
        """Layers of keras.applications that are no public class, and keras.ops calls."""
        name = type(op).__name__
        module = type(op).__module__
        if module.startswith("keras.src.applications."):
            return {"LayerScale": self._layer_scale, "StochasticDepth": self._stochastic_depth,
                    "CustomScaleLayer": self._custom_scale}.get(name)
        if _is_ops_call(op, "Add") or _is_ops_call(op, "Multiply"):
            return self._ops_call
        return None

    def _ops_call(self, op) -> None:
        """``x + y`` and ``x * y`` of two tensors (an Add or Multiply), or the start of a
        hard sigmoid ``relu6(x + 3) * (1 / 6)``."""
        tensors = op.input if isinstance(op.input, (list, tuple)) else [op.input]
        if len(tensors) == 2:
            (self._add if type(op).__name__ == "Add" else self._mul)(op)
        elif type(op).__name__ == "Add":
            self._hard_sigmoid(op)
        else:
            raise _fail(op, "an operation on tensors is supported only as an add or product "
                            "of two tensors, or the hard sigmoid relu6(x + 3) * (1 / 6)")

    def _nested(self, op) -> None:
        """A nested model (a Sequential stem, say): its layers join the network."""
        if len(getattr(op, "_inbound_nodes", ())) > 1:
            raise _fail(op, "the model is called more than once (shared weights)")
        graph = _model_graph(op)
        tensors = self._inputs(op)
        if len(tensors) != 1 or len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise _fail(op, "a nested model must take one input and give one output")
        outer, inner = tensors[0], graph.inputs[0]
        self.names[id(inner)] = self.names[id(outer)]
        if id(outer) == self.raw:
            self.raw = id(inner)
        self._walk(graph)
        output, inner_output = self._output(op), graph.outputs[0]
        self.names[id(output)] = self.names[id(inner_output)]
        for table in (self.linear, self.scalable, self.gap):
            if id(inner_output) in table:
                table[id(output)] = table[id(inner_output)]
        if id(inner_output) in self.flat:
            self.flat.add(id(output))
        if id(inner_output) == self.raw:
            self.raw = id(output)

    def _handlers(self) -> dict:
        layers = self.keras.layers
        return {
            layers.InputLayer: self._input_layer,
            layers.Conv2D: self._conv,
            layers.DepthwiseConv2D: self._conv,
            layers.SeparableConv2D: self._separable,
            layers.Dense: self._dense,
            layers.LayerNormalization: self._layer_norm,
            layers.Concatenate: self._concat,
            layers.AveragePooling2D: self._avgpool,
            layers.Flatten: self._flatten,
            layers.Cropping2D: self._crop,
            layers.BatchNormalization: self._batch_norm,
            layers.ReLU: self._relu,
            layers.Activation: self._activation_layer,
            layers.Softmax: self._softmax,
            layers.Add: self._add,
            layers.Multiply: self._mul,
            layers.GlobalAveragePooling2D: self._gap,
            layers.Reshape: self._reshape,
            layers.Dropout: self._dropout,
            layers.ZeroPadding2D: self._pad,
            layers.MaxPooling2D: self._maxpool,
            layers.Rescaling: self._rescaling,
            layers.Normalization: self._normalization,
        }

    def _find_drop_connect(self, operations) -> None:
        """Dropouts with a per-example noise shape (and ConvNeXt's StochasticDepth) that feed
        nothing but an Add."""
        dropout = self.keras.layers.Dropout
        for op in operations:
            if type(op) is not self.keras.layers.Add and not _is_ops_call(op, "Add"):
                continue
            tensors = op.input if isinstance(op.input, (list, tuple)) else [op.input]
            if len(tensors) != 2:
                continue
            for t in tensors:
                producer = self.producer.get(id(t))
                per_example = (type(producer) is dropout
                               and tuple(producer.noise_shape or ()) == (None, 1, 1, 1))
                if ((per_example or type(producer).__name__ == "StochasticDepth")
                        and self.consumers.get(id(t)) == [op]):
                    self.drop_connect[id(producer)] = op
                    break

    # ----------------------------------------------------------------- layer handlers

    def _input_layer(self, op) -> None:
        if self._output(op) is not self.model.inputs[0]:
            raise _fail(op, "is not the model's input")

    def _conv_fields(self, op, depthwise: bool) -> dict:
        """Kernel, stride, padding and dilation of a conv layer (groups apart)."""
        _channels_last(op)
        if getattr(op, "quantization_mode", None):
            raise _fail(op, f"is quantized ({op.quantization_mode}); import the float model")
        if depthwise and op.depth_multiplier != 1:
            raise _fail(op, f"depth_multiplier={op.depth_multiplier}; only 1 is supported")
        rows, columns = _kernel(op)
        stride = _pair(op, op.strides, "strides")
        dilation = _pair(op, op.dilation_rate, "dilation_rate")
        padding = _padding(op)
        if rows != columns and padding != "SAME":
            raise _fail(op, f"kernel_size {op.kernel_size!r} with padding {op.padding!r}: a "
                            "non-square kernel needs padding='same' (square outputs)")
        if dilation != 1 and stride != 1:
            raise _fail(op, f"dilation_rate {op.dilation_rate!r} with strides {op.strides!r}; "
                            "dilation needs stride 1")
        return dict(kernel=rows, kernel_w=columns if columns != rows else 0, stride=stride,
                    padding=padding, dilation=dilation, batch_norm=False)

    def _conv(self, op) -> None:
        depthwise = type(op) is self.keras.layers.DepthwiseConv2D
        fields = self._conv_fields(op, depthwise)
        tensor, source = self._source(op)
        weights = _numpy(op.kernel)
        cout = weights.shape[2] if depthwise else weights.shape[3]
        bias = _numpy(op.bias) if op.use_bias else np.zeros(cout, np.float32)
        if not depthwise and self._is_logits_conv(op, tensor, fields):
            self._emit_fc(op, source, weights, bias, conv_weights=True, flatten=True)
            return
        groups = int(getattr(op, "groups", 1))
        if not depthwise and groups > 1 and groups == tensor.shape[-1] == op.filters:
            depthwise = True  # a conv with one group per channel (ConvNeXt's)
            weights = weights.reshape(weights.shape[:2] + (cout, 1))
        if not depthwise:
            fields["filters"] = int(op.filters)
            fields["groups"] = groups
        spec = self._emit(op.name, "dws" if depthwise else "conv", (source,), **fields)
        self.weights[spec.name] = {"depthwise_weights" if depthwise else "weights": weights,
                                   "biases": bias}
        self._linear_output(op, spec)

    def _is_logits_conv(self, op, tensor, fields) -> bool:
        """A 1x1 conv on a 1x1 map that alone feeds a Flatten or Reshape to ``(C,)``: the
        classifier of MobileNet (V1, V3), an fc on the flattened map."""
        consumers = self.consumers.get(id(self._output(op)), [])
        flattening = (len(consumers) == 1 and type(consumers[0]) in (
            self.keras.layers.Flatten, self.keras.layers.Reshape)
            and tuple(consumers[0].output.shape[1:]) == (int(op.filters),))
        return (flattening and fields["kernel"] == 1 and not fields["kernel_w"]
                and fields["stride"] == 1 and getattr(op, "groups", 1) == 1
                and tuple(tensor.shape[1:3]) == (1, 1))

    def _emit_fc(self, op, source: str, weights, bias, *, conv_weights: bool = False,
                 flatten: bool = False) -> None:
        if flatten and id(self._inputs(op)[0]) not in self.flat:
            source = self._emit(f"{op.name}/flatten", "flatten", (source,)).name
        spec = self._emit(op.name, "fc", (source,), filters=int(weights.shape[-1]),
                          batch_norm=False, conv_weights=conv_weights)
        self.weights[spec.name] = {"weights": weights, "biases": bias}
        if flatten:
            self.flat.add(id(self._output(op)))
        self._linear_output(op, spec)

    def _separable(self, op) -> None:
        """SeparableConv2D: a depthwise conv (zero biases) then a 1x1 conv with the bias."""
        fields = self._conv_fields(op, depthwise=True)
        _, source = self._source(op)
        depthwise = _numpy(op.depthwise_kernel)
        pointwise = _numpy(op.pointwise_kernel)
        channels, filters = depthwise.shape[2], pointwise.shape[3]
        dws = self._emit(f"{op.name}/depthwise", "dws", (source,), **fields)
        self.weights[dws.name] = {"depthwise_weights": depthwise,
                                  "biases": np.zeros(channels, np.float32)}
        spec = self._emit(f"{op.name}/pointwise", "conv", (dws.name,), filters=int(filters),
                          batch_norm=False)
        bias = _numpy(op.bias) if op.use_bias else np.zeros(filters, np.float32)
        self.weights[spec.name] = {"weights": pointwise, "biases": bias}
        self._linear_output(op, spec)

    def _dense(self, op) -> None:
        if getattr(op, "quantization_mode", None):
            raise _fail(op, f"is quantized ({op.quantization_mode}); import the float model")
        tensor, source = self._source(op)
        weights = _numpy(op.kernel)
        bias = _numpy(op.bias) if op.use_bias else np.zeros(weights.shape[1], np.float32)
        if len(tensor.shape) == 4 and id(tensor) not in self.flat:  # pointwise: a 1x1 conv
            spec = self._emit(op.name, "conv", (source,), filters=int(op.units),
                              batch_norm=False)
            self.weights[spec.name] = {"weights": weights[None, None], "biases": bias}
            self._linear_output(op, spec)
            return
        if len(tensor.shape) != 2 and id(tensor) not in self.flat:
            raise _fail(op, f"reads shape {tuple(tensor.shape)}; a Dense must read "
                            "[batch, features] or [batch, H, W, C] feature maps")
        self._emit_fc(op, source, weights, bias)

    def _linear_output(self, op, spec: _Spec) -> None:
        output = self._output(op)
        fn_name = _activation_name(op, op.activation)
        if fn_name == "softmax":
            if not (type(op) is self.keras.layers.Dense and self._is_logits_output(output)):
                raise _fail(op, "softmax is supported only on the last Dense (it is dropped)")
            fn_name = "linear"
        fn = _ACTIVATIONS[fn_name]
        if fn is None:
            self.linear[id(output)] = (spec, op)
            self.scalable[id(output)] = spec
            self.names[id(output)] = spec.name
        else:
            self.names[id(output)] = self._emit(f"{spec.name}/{fn}", "act", (spec.name,),
                                                fn=fn).name

    def _batch_norm(self, op) -> None:
        tensors = self._inputs(op)
        if len(tensors) != 1:
            raise _fail(op, f"takes {len(tensors)} inputs; expected one")
        tensor = tensors[0]
        axis = op.axis if isinstance(op.axis, int) else tuple(op.axis)
        if axis not in (-1, len(tensor.shape) - 1, (-1,), (len(tensor.shape) - 1,)):
            raise _fail(op, f"axis {op.axis!r}; only the channel axis (-1) is supported")
        epsilon = float(op.epsilon)
        same_epsilon = not self.epsilons or epsilon in self.epsilons
        if (id(tensor) not in self.linear or self.consumers.get(id(tensor)) != [op]
                or not same_epsilon):
            self._affine_batch_norm(op, same_epsilon)
            return
        spec, layer = self.linear[id(tensor)]
        self.epsilons.setdefault(epsilon, op.name)
        mean = _numpy(op.moving_mean)
        variance = _numpy(op.moving_variance)
        channels = mean.shape[0]
        weights = self.weights[spec.name]
        bias = weights.pop("biases")
        weights.update({
            "BatchNorm/gamma": _numpy(op.gamma) if op.scale else np.ones(channels, np.float32),
            "BatchNorm/beta": _numpy(op.beta) if op.center else np.zeros(channels, np.float32),
            "BatchNorm/moving_mean": mean - bias,
            "BatchNorm/moving_variance": variance,
        })
        spec.fields["batch_norm"] = True
        output = self._output(op)
        self.names[id(output)] = spec.name
        self.scalable[id(output)] = spec
        del self.linear[id(tensor)]

    def _affine_batch_norm(self, op, same_epsilon: bool) -> None:
        """A batch norm that cannot fold into the layer before it (it follows no linear
        layer, one whose output feeds others, or has another epsilon): a 1x1 depthwise conv
        of ones with the slim ``BatchNorm`` scope (as a layer, it trains like one), or,
        with another epsilon than the network's, its inference-mode scale and shift."""
        tensor, source = self._source(op)
        if len(tensor.shape) not in (2, 4):
            raise _fail(op, f"reads shape {tuple(tensor.shape)}; expected [N, H, W, C] or "
                            "[N, C]")
        mean, variance = _numpy(op.moving_mean), _numpy(op.moving_variance)
        channels = mean.shape[0]
        gamma = _numpy(op.gamma) if op.scale else np.ones(channels, np.float32)
        beta = _numpy(op.beta) if op.center else np.zeros(channels, np.float32)
        spec = self._emit(op.name, "dws", (source,), batch_norm=same_epsilon)
        if same_epsilon:
            self.epsilons.setdefault(float(op.epsilon), op.name)
            self.weights[spec.name] = {
                "depthwise_weights": np.ones([1, 1, channels, 1], np.float32),
                "BatchNorm/gamma": gamma, "BatchNorm/beta": beta,
                "BatchNorm/moving_mean": mean, "BatchNorm/moving_variance": variance}
        else:
            scale = gamma / np.sqrt(variance.astype(np.float64) + float(op.epsilon))
            self.weights[spec.name] = {
                "depthwise_weights": scale.astype(np.float32).reshape(1, 1, channels, 1),
                "biases": (beta - mean * scale).astype(np.float32)}
        output = self._output(op)
        self.names[id(output)] = spec.name
        self.scalable[id(output)] = spec

    def _scale_output(self, op, tensor, source: str, scale, what: str) -> None:
        """``tensor * scale`` (a number or one per channel): folded into the linear layer
        (and its batch norm) that alone feeds it, else a 1x1 depthwise conv."""
        channels = int(tensor.shape[-1])
        scale = np.broadcast_to(np.asarray(scale, np.float32), (channels,))
        spec = self.scalable.get(id(tensor))
        output = self._output(op)
        if spec is not None and self.consumers.get(id(tensor)) == [op]:
            weights = self.weights[spec.name]
            if "BatchNorm/gamma" in weights:
                weights["BatchNorm/gamma"] = weights["BatchNorm/gamma"] * scale
                weights["BatchNorm/beta"] = weights["BatchNorm/beta"] * scale
            else:
                key = "depthwise_weights" if spec.op == "dws" else "weights"
                shape = [1] * weights[key].ndim
                shape[2 if spec.op == "dws" else -1] = channels
                weights[key] = weights[key] * scale.reshape(shape)
                weights["biases"] = weights["biases"] * scale
            self.names[id(output)] = spec.name
            self.scalable[id(output)] = spec
            self.linear.pop(id(tensor), None)
            return
        if len(tensor.shape) not in (2, 4):
            raise _fail(op, f"{what} of shape {tuple(tensor.shape)}; expected [N, H, W, C] "
                            "or [N, C]")
        spec = self._emit(op.name, "dws", (source,), batch_norm=False)
        self.weights[spec.name] = {"depthwise_weights": scale.reshape(1, 1, channels, 1),
                                   "biases": np.zeros(channels, np.float32)}
        self.names[id(output)] = spec.name
        self.scalable[id(output)] = spec

    def _layer_scale(self, op) -> None:
        """ConvNeXt's LayerScale: ``x * gamma`` per channel."""
        tensor, source = self._source(op)
        self._scale_output(op, tensor, source, _numpy(op.gamma), "a layer scale")

    def _custom_scale(self, op) -> None:
        """InceptionResNetV2's ``x + r * scale``: the scale folds into r's layer, then an add."""
        tensors = self._two_inputs(op)
        residual, branch = tensors
        producer = self.producer.get(id(branch))
        spec = self.scalable.get(id(branch))
        if spec is None or self.consumers.get(id(branch)) != [op]:
            raise _fail(op, f"the scaled input comes from {getattr(producer, 'name', '?')!r}, "
                            "not from a Conv2D or Dense that feeds only this layer")
        self._scale_output(op, branch, self.names[id(branch)], float(op.scale), "a scale")
        inputs = (self.names[id(residual)], spec.name)
        spec = self._emit(op.name, "add", inputs)
        self.names[id(self._output(op))] = spec.name
        self.scalable.pop(id(self._output(op)), None)

    def _stochastic_depth(self, op) -> None:
        """ConvNeXt's StochasticDepth: nothing at inference; on an Add, its drop path."""
        _, source = self._source(op)
        self.names[id(self._output(op))] = source

    def _hard_sigmoid(self, op) -> None:
        """``relu6(x + 3) * (1 / 6)`` written with keras.ops (MobileNetV3): an act node."""
        tensor, constant = _constant_operand(op)
        relu = self.consumers.get(id(self._output(op)), [])
        relu = relu[0] if len(relu) == 1 else None
        scale = (self.consumers.get(id(relu.output), []) if isinstance(
            relu, self.keras.layers.ReLU) else [])
        scale = scale[0] if len(scale) == 1 else None
        factor = _constant_operand(scale)[1] if scale is not None and _is_ops_call(
            scale, "Multiply") else None
        if not (constant == 3.0 and factor is not None and abs(factor - 1.0 / 6.0) < 1e-7
                and id(tensor) in self.names and relu.max_value is not None
                and float(relu.max_value) == 6.0 and not float(relu.negative_slope or 0)
                and not float(relu.threshold or 0)):
            raise _fail(op, "an operation on tensors is supported only as the hard sigmoid "
                            "relu6(x + 3) * (1 / 6)")
        source = self.names[id(tensor)]
        if id(tensor) == self.raw:
            self.raw = None
        spec = self._emit(f"{source}/hard_sigmoid", "act", (source,), fn="hard_sigmoid")
        self.names[id(scale.output)] = spec.name
        self.done.update((id(relu), id(scale)))

    def _act(self, op, fn_name: str) -> None:
        tensor, source = self._source(op)
        output = self._output(op)
        if fn_name == "softmax":
            last = self.specs[-1] if self.specs else None
            if not (self._is_logits_output(output) and last is not None and last.op == "fc"
                    and source == last.name):
                raise _fail(op, "softmax is supported only right after the last Dense "
                                "(it is dropped)")
            self.names[id(output)] = source
            return
        fn = _ACTIVATIONS[fn_name]
        if fn is None:  # linear
            self.names[id(output)] = source
            return
        self.names[id(output)] = self._emit(op.name, "act", (source,), fn=fn).name

    def _relu(self, op) -> None:
        if float(op.negative_slope or 0) != 0 or float(op.threshold or 0) != 0:
            raise _fail(op, "a ReLU with negative_slope or threshold is not supported")
        if op.max_value is None:
            self._act(op, "relu")
        elif float(op.max_value) == 6.0:
            self._act(op, "relu6")
        else:
            raise _fail(op, f"max_value {op.max_value}; use None (relu) or 6 (relu6)")

    def _activation_layer(self, op) -> None:
        self._act(op, _activation_name(op, op.activation))

    def _softmax(self, op) -> None:
        self._act(op, "softmax")

    def _two_inputs(self, op) -> list:
        tensors = self._inputs(op)
        if len(tensors) != 2:
            raise _fail(op, f"takes {len(tensors)} inputs; only two are supported")
        for t in tensors:
            if id(t) == self.raw:
                self.raw = None
        return tensors

    def _add(self, op) -> None:
        tensors = self._two_inputs(op)
        if tuple(tensors[0].shape[1:]) != tuple(tensors[1].shape[1:]):
            raise _fail(op, f"adds shapes {tensors[0].shape} and {tensors[1].shape}; they "
                            "must be equal")
        drop_path = None
        for i, t in enumerate(tensors):
            producer = self.producer.get(id(t))
            if self.drop_connect.get(id(producer)) is op:
                rate = getattr(producer, "rate", getattr(producer, "drop_path_rate", 0.0))
                ratio = Fraction(float(rate) / REFERENCE_DROP_CONNECT_RATE)
                ratio = ratio.limit_denominator(1000)
                drop_path = (ratio.numerator, ratio.denominator) if ratio else None
                tensors = [t, tensors[1 - i]]  # the dropped operand goes first
                break
        inputs = tuple(self.names[id(t)] for t in tensors)
        spec = self._emit(op.name, "add", inputs, drop_path=drop_path)
        self.names[id(self._output(op))] = spec.name

    def _mul(self, op) -> None:
        tensors = self._two_inputs(op)
        shapes = [tuple(t.shape[1:]) for t in tensors]
        if shapes[0] != shapes[1]:
            gate = [i for i, s in enumerate(shapes)
                    if len(s) == 3 and s[:2] == (1, 1) and s[2] == shapes[1 - i][-1]]
            if len(gate) != 1 or len(shapes[1 - gate[0]]) != 3:
                raise _fail(op, f"multiplies shapes {tensors[0].shape} and "
                                f"{tensors[1].shape}; use equal shapes or a [N, 1, 1, C] gate")
            if gate[0] == 0:
                tensors = tensors[::-1]  # features first, gate second
        inputs = tuple(self.names[id(t)] for t in tensors)
        spec = self._emit(op.name, "mul", inputs)
        self.names[id(self._output(op))] = spec.name

    def _gap(self, op) -> None:
        _channels_last(op)
        tensor, source = self._source(op)
        if len(tensor.shape) != 4:
            raise _fail(op, f"reads shape {tuple(tensor.shape)}; expected [N, H, W, C]")
        spec = self._emit(op.name, "gap", (source,), keepdims=bool(op.keepdims))
        output = self._output(op)
        self.gap[id(output)] = spec
        self.names[id(output)] = spec.name

    def _reshape(self, op) -> None:
        tensor, source = self._source(op)
        spec = self.gap.get(id(tensor))
        channels = tensor.shape[-1]
        target = tuple(op.target_shape)
        if len(tensor.shape) == 4 and target == (int(np.prod(tensor.shape[1:])),):
            self._flatten(op)  # to [N, H * W * C]
            return
        if (spec is None or spec.fields["keepdims"] or self.consumers.get(id(tensor)) != [op]
                or target != (1, 1, channels)):
            raise _fail(op, "only a Reshape to (1, 1, C) that alone reads a "
                            "GlobalAveragePooling2D, or a flattening Reshape, is supported")
        spec.fields["keepdims"] = True
        self.names[id(self._output(op))] = spec.name

    def _flatten(self, op) -> None:
        tensor, source = self._source(op)
        output = self._output(op)
        if id(tensor) in self.flat or len(tensor.shape) == 2:
            self.names[id(output)] = source  # already [N, features] here
            return
        if len(tensor.shape) != 4 or getattr(op, "data_format", None) == "channels_first":
            raise _fail(op, f"reads shape {tuple(tensor.shape)}; expected [N, H, W, C], "
                            "channels last")
        dims = tuple(tensor.shape[1:])
        features = int(np.prod(dims)) if None not in dims else None
        self.names[id(output)] = self._emit(op.name, "flatten", (source,),
                                            filters=features).name

    def _concat(self, op) -> None:
        tensors = self._inputs(op)
        if int(op.axis) not in (-1, 3):
            raise _fail(op, f"axis {op.axis}; only the channel axis (-1) is supported")
        if len(tensors) < 2 or any(len(t.shape) != 4 for t in tensors):
            raise _fail(op, "concatenates anything but two or more [N, H, W, C] maps")
        for t in tensors:
            if id(t) == self.raw:
                self.raw = None
        inputs = tuple(self.names[id(t)] for t in tensors)
        self.names[id(self._output(op))] = self._emit(op.name, "concat", inputs).name

    def _avgpool(self, op) -> None:
        _channels_last(op)
        _, source = self._source(op)
        kernel = _pair(op, op.pool_size, "pool_size")
        stride = _pair(op, op.strides, "strides")
        spec = self._emit(op.name, "avgpool", (source,), kernel=kernel, stride=stride,
                          padding=_padding(op))
        self.names[id(self._output(op))] = spec.name

    def _crop(self, op) -> None:
        _channels_last(op)
        _, source = self._source(op)
        (top, bottom), (left, right) = (tuple(int(v) for v in p) for p in op.cropping)
        if top + bottom != left + right:
            raise _fail(op, f"cropping {op.cropping!r}: top + bottom must equal left + right "
                            "(square images)")
        spec = self._emit(op.name, "crop", (source,), pads=(top, bottom, left, right))
        self.names[id(self._output(op))] = spec.name

    def _layer_norm(self, op) -> None:
        """A ``layer_norm`` node, then its gamma and beta as a 1x1 depthwise conv."""
        tensor, source = self._source(op)
        axis = op.axis if isinstance(op.axis, int) else tuple(op.axis)
        rank = len(tensor.shape)
        if axis not in (-1, rank - 1, (-1,), (rank - 1,)) or rank not in (2, 4):
            raise _fail(op, f"axis {op.axis!r} on shape {tuple(tensor.shape)}; only the "
                            "channel axis (-1) of [N, H, W, C] or [N, C] is supported")
        if getattr(op, "rms_scaling", False):
            raise _fail(op, "rms_scaling is not supported")
        norm = self._emit(op.name, "layer_norm", (source,), epsilon=float(op.epsilon))
        output = self._output(op)
        self.names[id(output)] = norm.name
        if not (op.scale or op.center):
            return
        channels = int(tensor.shape[-1])
        gamma = _numpy(op.gamma) if op.scale else np.ones(channels, np.float32)
        beta = _numpy(op.beta) if op.center else np.zeros(channels, np.float32)
        spec = self._emit(f"{op.name}/affine", "dws", (norm.name,), batch_norm=False)
        self.weights[spec.name] = {"depthwise_weights": gamma.reshape(1, 1, channels, 1),
                                   "biases": beta}
        self.names[id(output)] = spec.name
        self.scalable[id(output)] = spec

    def _dropout(self, op) -> None:
        tensor, source = self._source(op)
        output = self._output(op)
        if id(op) in self.drop_connect:
            self.names[id(output)] = source  # the Add applies it as drop_path
            return
        self.names[id(output)] = self._emit(op.name, "dropout", (source,)).name

    def _pad(self, op) -> None:
        _channels_last(op)
        _, source = self._source(op)
        (top, bottom), (left, right) = (tuple(int(v) for v in p) for p in op.padding)
        if top + bottom != left + right:
            raise _fail(op, f"padding {op.padding!r}: top + bottom must equal left + right "
                            "(square images)")
        spec = self._emit(op.name, "pad", (source,), pads=(top, bottom, left, right))
        self.names[id(self._output(op))] = spec.name

    def _maxpool(self, op) -> None:
        _channels_last(op)
        _, source = self._source(op)
        kernel = _pair(op, op.pool_size, "pool_size")
        stride = _pair(op, op.strides, "strides")
        spec = self._emit(op.name, "maxpool", (source,), kernel=kernel, stride=stride,
                          padding=_padding(op))
        self.names[id(self._output(op))] = spec.name

    def _preprocessing_input(self, op) -> None:
        tensors = self._inputs(op)
        if (len(tensors) != 1 or id(tensors[0]) != self.raw
                or self.consumers.get(id(tensors[0])) != [op]):
            raise _fail(op, "Rescaling and Normalization are supported only directly after "
                            "the input (a chain of them that alone reads the input)")

    def _rescaling(self, op) -> None:
        self._preprocessing_input(op)
        scale = _channel_vector(op, op.scale, "scale")
        offset = _channel_vector(op, op.offset, "offset")
        self.a, self.b = self.a * scale, self.b * scale + offset
        self._preprocessed(op)

    def _normalization(self, op) -> None:
        self._preprocessing_input(op)
        if op.mean is None or op.variance is None:
            raise _fail(op, "has no mean and variance yet (adapt it or pass them)")
        mean = _channel_vector(op, op.mean, "mean")
        std = np.maximum(np.sqrt(_channel_vector(op, op.variance, "variance")),
                         self.keras.config.epsilon())
        if op.invert:
            self.a, self.b = self.a * std, self.b * std + mean
        else:
            self.a, self.b = self.a / std, (self.b - mean) / std
        self._preprocessed(op)

    def _preprocessed(self, op) -> None:
        output = self._output(op)
        self.names[id(output)] = IMAGE
        self.raw = id(output)

    # ----------------------------------------------------------------- result

    def _finish(self) -> tuple[Network, dict[str, np.ndarray]]:
        output = self.model.outputs[0]
        last = self.specs[-1] if self.specs else None
        producer = self.producer[id(output)]
        if last is None or last.op != "fc" or self.names.get(id(output)) != last.name:
            raise _fail(producer, "the last layer must be a Dense (the logits)")
        if np.any(self.a == 0):
            raise UserError(f"model {self.model.name!r}: the input layers scale a channel by "
                            "0; the input cannot be normalised")
        nodes = []
        previous = IMAGE
        for spec in self.specs:
            inputs = spec.inputs
            if len(inputs) == 1 and inputs[0] == previous:
                inputs = ()
            nodes.append(Node(spec.name, spec.op, inputs, **spec.fields))
            previous = spec.name
        std = tuple(float(v) for v in 1.0 / self.a)
        mean = tuple(float(v) for v in -self.b / self.a)
        epsilon = next(iter(self.epsilons), 1e-3)
        try:
            net = Network(self.name, self.scope, tuple(nodes),
                          (("num_classes", int(nodes[-1].filters)),), mean, std, epsilon)
        except ValueError as err:
            raise UserError(f"model {self.model.name!r} imports as an invalid network: "
                            f"{err}") from None
        weights = {f"{self.scope}/{node}/{leaf}": array
                   for node, leaves in self.weights.items() for leaf, array in leaves.items()}
        return net, weights


def from_keras(model, *, name: str = "keras_model", scope: str | None = None,
               input_range=(0.0, 1.0)) -> tuple[Network, dict[str, np.ndarray]]:
    """A float Keras 3 functional ``model`` as ``(Network, {slim variable name: array})``.

    ``input_range=(lo, hi)``: the range adjq's ``[0, 1]`` images are mapped to before
    they enter the Keras model (``(-1, 1)`` for MobileNetV2, ``(0, 255)`` for EfficientNet
    and, with its caffe preprocessing outside the model, roughly for ResNet50). The
    network's ``input_mean`` / ``input_std`` fold this map and any leading
    ``Rescaling`` / ``Normalization`` layers, so that ``FloatNetwork(net)(x)`` equals
    ``model(lo + (hi - lo) * x)`` without a final softmax. See the module docstring for the
    layer mapping; unsupported models raise a one-line :class:`UserError`.
    """
    return _Importer(model, name, scope, input_range).run()


def load_weights(float_model, weights: dict[str, np.ndarray]) -> None:
    """Assign ``weights`` (from :func:`from_keras`) to ``float_model``'s slim variables.

    Every variable must get a value of its shape; the first missing, unknown or
    mismatched name is a :class:`UserError`.
    """
    variables = float_model.slim_variables()
    for key in variables:
        if key not in weights:
            raise UserError(f"no weights for variable {key!r} of network "
                            f"{float_model.net.name!r}")
    for key, value in weights.items():
        if key not in variables:
            raise UserError(f"weights name {key!r} is not a variable of network "
                            f"{float_model.net.name!r}")
        shape = tuple(np.shape(value))
        wanted = tuple(variables[key].shape)
        if shape != wanted:
            raise UserError(f"weights {key!r} have shape {shape}; the network's variable "
                            f"has shape {wanted}")
    for key, value in weights.items():
        variables[key].assign(np.asarray(value, np.float32))
