"""The quantized network derived from a declaration (docs/method.md, "What is quantized").

Built from a float model (:class:`adj_quant.network.FloatNetwork`): batch norm is folded into
every conv's weights and bias, then
every weight tensor, the input of every conv/FC (except a stem, whose input is the 8-bit
image), every swish input, every sigmoid input (EfficientNet's SE gates) and every bias
gets a quantizer (:class:`adj_quant.quantizers.Quantizer`) of the registered kind
``QuantConfig.quantizer`` names: the adjustable quantizer (``"adjq"``,
:class:`adj_quant.quantizers.adjustable.AdjustableQuantizer`) or, as the LSQ+ baseline at
fixed bits, ``"lsq"`` (:class:`adj_quant.quantizers.lsq.LsqQuantizer`). Where they go
follows from the network's declaration alone.

Quantizer ("tensor") names, used by ``initial_thresholds.json``::

    <scope>/weights        per output channel (depthwise: per channel, axis 2)
    <scope>/input          per input channel: the activation the layer multiplies with
    <scope>/swish_input    per channel, the pre-activation of a swish (``--swish_bits``)
    <block>/se_2/sigmoid_input  per channel, the SE gate's pre-activation (like a swish input)
    <scope>/biases         one range per tensor (``--bias_bits``); by default its base range
                           is the bias tensor's live min/max (``--bias_range``)
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Callable

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from adj_quant import network as nw
from adj_quant import quantizers
from adj_quant.errors import UserError
from adj_quant.files import write_json_atomic
from adj_quant.quantizers import Quantizer
from adj_quant.quantizers.adjustable import AdjustableQuantizer
from adj_quant.quantizers.formula import _bits_math, check_bits, check_bits_grad, range_preset
from adj_quant.sparsity import learned_mask

BIAS_RANGES = ("live", "calibrated")
#: ``--quantizer``: the registered quantizers (adj_quant.quantizers.names()): the adjustable
#: quantizer (the method) and LSQ+ (a baseline at fixed bits).
QUANTIZERS = quantizers.names()
#: Quantizer-name suffixes of the activation sites (calibrated on data, exported as ranges).
ACTIVATION_SITES = ("/input", "/swish_input", "/sigmoid_input")


class SwishMode(enum.Enum):
    """How the inputs of the swishes (and SE gates) are quantized. The value is the
    ``--swish_bits`` flag (and ``swish_bits`` of QuantConfig / model_spec.json) that asks
    for it."""

    FIXED8 = 8        # fixed 8 bits
    TRAINABLE = 0     # bits from act_bits, trained with the others
    FLOAT = -1        # not quantized

    @classmethod
    def flags(cls) -> tuple[int, ...]:
        return tuple(mode.value for mode in cls)

    @classmethod
    def from_flag(cls, flag: int) -> "SwishMode":
        if flag not in cls.flags():
            raise UserError(f"swish_bits {flag} is not a swish mode; use 8 (fixed "
                            "8 bits), 0 (trainable bits from act_bits) or -1 (not quantized)")
        return cls(flag)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Which tensors are quantized, at how many initial bits, and whether bits train.

    ``swish_bits`` and ``bias_bits`` hold the flag values (as model_spec.json does):
    :attr:`swish` and :attr:`quantized_bias_bits` say what they mean.
    """

    weight_bits: int = 8
    act_bits: int = 8
    swish_bits: int = 8       # the SwishMode's flag: 8 fixed, 0 trainable, -1 float
    bias_bits: int = 8        # 0: float biases (quantized_bias_bits None)
    bits_trainable: bool = False
    range_preset: int = 5
    bits_grad: str = "original"     # the upper clip bound's estimator (formula.BITS_GRAD_MODES)
    bias_range: str = "live"        # "live": the bias tensor's own min/max; "calibrated": fixed
    #: quantize every sigmoid's input (the SE gates) like a swish input
    quantize_se_gate: bool = True
    #: "adjq": AdjustableQuantizer; "lsq": LsqQuantizer at fixed bits (range_preset,
    #: bits_grad and bias_range do not apply to it: its step and offset are learned).
    quantizer: str = "adjq"
    #: Every weight tensor has a 0/1 mask (a non-trainable variable, in the checkpoint)
    #: applied after its quantizer, so pruned weights are exactly 0 (docs/method.md,
    #: "Sparsity"). The recipe sets it from ``--sparsity`` and ``--learned_sparsity``.
    pruned: bool = False
    #: Every prunable weight tensor (not depthwise, not the stem) has a trainable magnitude
    #: threshold, and its mask follows it (:func:`adj_quant.sparsity.learned_mask`).
    learned_sparsity: bool = False
    #: Every weight quantizer puts its channels on a symmetric narrow grid with zero point 0,
    #: ``clip(round(x s), -n, n) / s`` with ``n = 2^(b-1) - 1`` (``--symmetric_weights``,
    #: :mod:`adj_quant.quantizers.formula`): at <= 4 bits a weight tensor exports as INT4.
    #: Activations and biases keep the asymmetric grid. The adjustable quantizer only.
    symmetric_weights: bool = False

    #: What a model_spec.json written before these fields existed was trained with.
    LEGACY = {"bits_grad": "scale_only", "bias_range": "calibrated", "quantize_se_gate": False}

    def __post_init__(self):
        check_bits(self.weight_bits, "weight_bits")
        check_bits(self.act_bits, "act_bits")
        SwishMode.from_flag(self.swish_bits)
        if self.bias_bits != 0:
            check_bits(self.bias_bits, "bias_bits")
        range_preset(self.range_preset)
        check_bits_grad(self.bits_grad)
        if self.bias_range not in BIAS_RANGES:
            raise UserError(f"bias_range {self.bias_range!r}: use one of {', '.join(BIAS_RANGES)}")
        if self.quantizer not in QUANTIZERS:
            raise UserError(f"quantizer {self.quantizer!r}: use one of {', '.join(QUANTIZERS)}")
        if self.quantizer == "lsq" and self.bits_trainable:
            raise UserError("quantizer 'lsq' runs at fixed bits; pass bits_trainable=False, or "
                            "quantizer 'adjq' to learn bits")
        if self.quantizer != "adjq" and self.symmetric_weights:
            raise UserError(f"symmetric_weights is a grid of the adjustable quantizer, not of "
                            f"quantizer {self.quantizer!r}; pass symmetric_weights=False, or "
                            "quantizer 'adjq'")

    @classmethod
    def from_options(cls, options, **overrides) -> "QuantConfig":
        """The config named by the fields of ``options`` (recipe Options, or any object
        with these attributes; ``range_preset`` is its ``range``), with ``overrides``."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in DERIVED]
        values = {name: getattr(options, OPTION_NAMES.get(name, name)) for name in names}
        values.update({name: derive(options) for name, derive in DERIVED.items()})
        return cls(**{**values, **overrides})

    @property
    def swish(self) -> SwishMode:
        return SwishMode.from_flag(self.swish_bits)

    @property
    def quantized_bias_bits(self) -> int | None:
        """The biases' bits; None: the biases stay float."""
        return self.bias_bits or None

    def make_quantizer(self, scope: str, channels: int, *, init_bits: int, axis: int = -1,
                       bits_trainable: bool = False, signed: bool = False,
                       live_range: bool = False, compiled: bool = True,
                       symmetric: bool = False) -> Quantizer:
        """The quantizer of one tensor under this config (``Quantizer.for_tensor`` of the
        registered ``quantizer``): ``signed`` for weights and biases (LSQ+ quantizes them
        symmetrically, without offset); ``live_range`` and ``compiled`` are the adjustable
        quantizer's (LSQ+ has a learned step instead); ``symmetric`` (a weight tensor under
        ``symmetric_weights``) is passed on only when true."""
        extra = {"symmetric": True} if symmetric else {}
        return quantizers.get(self.quantizer).for_tensor(
            scope, channels, axis=axis, init_bits=init_bits, bits_trainable=bits_trainable,
            signed=signed, live_range=live_range, compiled=compiled,
            range_preset_id=self.range_preset, bits_grad=self.bits_grad, **extra)


#: QuantConfig fields whose option (flag) has another name.
OPTION_NAMES = {"range_preset": "range"}
#: QuantConfig fields that follow from other options.
DERIVED = {"pruned": lambda options: ((getattr(options, "sparsity", 0.0) or 0.0) > 0
                                      or bool(getattr(options, "learned_sparsity", False)))}


class QuantizedLayer(tf.Module):
    """Folded conv / depthwise / FC with quantized weights, input and bias."""

    def __init__(self, net_scope: str, node: nw.Node, cin: int, cout: int, stem: bool,
                 qcfg: QuantConfig):
        super().__init__(name=None)
        scope, kind = node.name, node.op
        full = f"{net_scope}/{scope}"
        self.scope, self.kind, self.kernel, self.stride = scope, kind, node.kernel, node.stride
        self.cin, self.cout, self.padding = cin, cout, node.padding
        self.weights = tf.Variable(np.zeros(nw.node_weight_shape(node, cin, cout), np.float32),
                                   name=f"{full}/{nw.weight_name(kind)}")
        self.options = nw.linear_options(node)
        self.biases = tf.Variable(np.zeros([cout], np.float32), name=f"{full}/biases")
        self.weight_quant = qcfg.make_quantizer(
            f"{full}/weight_quant", cout, axis=2 if kind == "dws" else -1,
            init_bits=qcfg.weight_bits, bits_trainable=qcfg.bits_trainable, signed=True,
            compiled=False, symmetric=qcfg.symmetric_weights)
        self.act_quant = None if stem else qcfg.make_quantizer(
            f"{full}/act_quant", cin, axis=-1, init_bits=qcfg.act_bits,
            bits_trainable=qcfg.bits_trainable)
        self.bias_quant = None if qcfg.quantized_bias_bits is None else qcfg.make_quantizer(
            f"{full}/bias_quant", 1, init_bits=qcfg.quantized_bias_bits, signed=True,
            live_range=qcfg.bias_range == "live", compiled=False)
        self.mask = tf.Variable(np.ones(self.weights.shape, np.float32), trainable=False,
                                name=f"{full}/mask") if qcfg.pruned else None
        self.prune_threshold = tf.Variable(
            0.0, name=f"{full}/prune_threshold") if qcfg.learned_sparsity and \
            self.prunable and self.mask is not None else None

    def load_float(self, layer: nw.ConvLayer) -> None:
        weights, biases = nw.fold_batch_norm(layer)
        self.weights.assign(weights)
        self.biases.assign(biases)

    @property
    def prunable(self) -> bool:
        """Whether pruning applies: not a depthwise kernel (9 weights a channel: pruning it
        removes whole channels) and not the stem (few MACs, the image's only path)."""
        return self.kind != "dws" and self.act_quant is not None

    def current_mask(self) -> tf.Tensor | None:
        """The 0/1 mask in force: the learned threshold's (with its straight-through
        gradient), else the mask variable; None for a layer without one."""
        if self.prune_threshold is not None:
            return learned_mask(self.weights, self.prune_threshold)
        return self.mask

    def freeze_mask(self) -> None:
        """Store the learned threshold's mask in the mask variable (for the checkpoint, and
        for a stage that keeps the masks as they are)."""
        if self.prune_threshold is not None:
            self.mask.assign(learned_mask(self.weights, self.prune_threshold))

    def quantized_weights(self, alive_out=None) -> tuple[tf.Tensor, tf.Tensor]:
        """The weights and biases the layer computes with. ``alive_out`` ([cout] 1/0, from
        :meth:`QuantizedNetwork.output_liveness`) says which output channels the network
        keeps; without it, a channel is kept when it has a weight left."""
        biases = self.biases if self.bias_quant is None else self.bias_quant(self.biases)
        weights = self.weight_quant(self.weights)
        if self.mask is None:
            return weights, biases
        # Pruned weights are exactly 0; an output channel with none left (or none reading a
        # channel that is left) loses its bias.
        mask = self.current_mask()
        kept = self.kept_channels(mask) if alive_out is None else tf.cast(alive_out, mask.dtype)
        return weights * mask, biases * kept

    def _out_axis(self) -> int:
        return 2 if self.kind == "dws" else len(self.weights.shape) - 1

    def kept_channels(self, mask=None) -> tf.Tensor:
        """1 for each output channel with a weight left, 0 for a removed one."""
        mask = self.current_mask() if mask is None else mask
        axes = [i for i in range(len(mask.shape)) if i != self._out_axis()]
        return tf.cast(tf.reduce_max(mask, axis=axes) > 0, mask.dtype)

    def density(self) -> tf.Tensor | None:
        """The kept fraction of the weights: ``[cin, cout]`` (per channel pair), depthwise
        ``[C]``; None when the layer has no mask. A learned mask passes its gradient."""
        if self.mask is None:
            return None
        mask = tf.cast(self.current_mask(), tf.float64)
        if self.kind == "dws":
            return tf.reduce_mean(mask, axis=[0, 1, 3])
        if len(mask.shape) == 4:
            return tf.reduce_mean(mask, axis=[0, 1])
        return mask

    def __call__(self, x: tf.Tensor, training: bool = False, alive_out=None,
                 parameters: tuple[tf.Tensor, tf.Tensor] | None = None) -> tf.Tensor:
        """``parameters``: this layer's :meth:`quantized_weights`, computed beforehand."""
        if self.act_quant is not None:
            x = self.act_quant(x)
        if parameters is None:
            parameters = self.quantized_weights(alive_out)
        weights, biases = parameters
        return nw.apply_linear(self.kind, x, weights, self.stride, self.padding,
                               **self.options) + biases

    def float_call(self, x: tf.Tensor, observe) -> tf.Tensor:
        """Unquantized forward that reports its input to ``observe`` (for calibration)."""
        if self.act_quant is not None:
            observe(f"{self.scope}/input", x)
        return nw.apply_linear(self.kind, x, self.weights, self.stride, self.padding,
                               **self.options) + self.biases


class QuantizedNetwork(tf.Module):
    """The fake-quantized, BN-folded twin of a declared network.

    Quantizers: ``layers[scope].weight_quant / act_quant / bias_quant`` for every weight
    layer, ``swish_quant[scope]`` for every swish input and ``gate_quant[scope]`` for every
    sigmoid input (keyed by the scope that feeds the activation).
    """

    def __init__(self, net: nw.Network, qcfg: QuantConfig, *, dropout_rate: float = 0.0,
                 drop_connect_rate: float = 0.0, seed: int = 0):
        super().__init__(name=net.scope)
        self.net, self.qcfg = net, qcfg
        self.dropout_rate, self.drop_connect_rate = dropout_rate, drop_connect_rate
        self.rng = tf.random.Generator.from_seed(seed)
        shapes = net.layer_shapes(32)
        self.layers = {node.name: QuantizedLayer(net.scope, node, shapes[node.name][1],
                                                 shapes[node.name][3], net.is_stem(node), qcfg)
                       for node in net.layers}
        self.swish_quant, self.gate_quant = {}, {}
        if qcfg.swish is not SwishMode.FLOAT:
            trainable = qcfg.swish is SwishMode.TRAINABLE
            channels = net.shapes(32)

            def activation_quantizer(scope, name):
                return qcfg.make_quantizer(
                    f"{net.scope}/{scope}/{name}", channels[scope].channels,
                    init_bits=qcfg.act_bits if trainable else 8,
                    bits_trainable=trainable and qcfg.bits_trainable)

            for scope in net.activation_sites("swish"):
                self.swish_quant[scope] = activation_quantizer(scope, "swish_quant")
            if qcfg.quantize_se_gate:
                for scope in net.activation_sites("sigmoid"):
                    self.gate_quant[scope] = activation_quantizer(scope, "sigmoid_quant")

    @property
    def arch(self) -> nw.Network:
        return self.net

    @classmethod
    def from_float(cls, float_model: nw.FloatNetwork, qcfg: QuantConfig, seed: int = 0, *,
                   dropout_rate: float = 0.0, drop_connect_rate: float = 0.0,
                   ) -> "QuantizedNetwork":
        """The quantized twin of ``float_model`` (weights folded, weight ranges calibrated).

        The quantized network runs without dropout and drop-connect by default, as the
        original did; pass rates to turn them on.
        """
        model = cls(float_model.net, qcfg, dropout_rate=dropout_rate,
                    drop_connect_rate=drop_connect_rate, seed=seed)
        for scope, layer in model.layers.items():
            layer.load_float(float_model.layers[scope])
        model.calibrate_weights()
        return model

    # ------------------------------------------------------------------ forward

    def _quantizer_of(self, scope: str, fn: str):
        if fn == "swish":
            return self.swish_quant.get(scope)
        return self.gate_quant.get(scope) if fn == "sigmoid" else None

    def _activation(self, scope: str, fn: str, x: tf.Tensor) -> tf.Tensor:
        quant = self._quantizer_of(scope, fn)
        return nw.ACTIVATIONS[fn](x if quant is None else quant(x))

    def output_liveness(self, img_size: int = 224) -> dict[str, tf.Tensor] | None:
        """``{layer: [cout] 1/0}``: the output channels the network keeps, or None when it
        has no masks. A channel is removed when none of its kept weights reads a channel
        that is left (:func:`adj_quant.cost.channel_liveness`, the rule the score counts
        by): a depthwise channel whose input channel was pruned away loses its bias too,
        so every removed channel is exactly 0."""
        if not self.qcfg.pruned:
            return None
        from adj_quant.cost import channel_liveness

        density = {s: layer.density() for s, layer in self.layers.items()
                   if layer.mask is not None}
        return channel_liveness(self.net, density, img_size)[1]

    def quantized_parameters(self, img_size: int = 224) -> dict[str, tuple[tf.Tensor, tf.Tensor]]:
        """Every layer's weights and biases as :meth:`__call__` computes with them at
        ``img_size`` (quantized, and masked where pruned), by layer scope."""
        alive = self.output_liveness(img_size) or {}
        return {scope: layer.quantized_weights(alive.get(scope))
                for scope, layer in self.layers.items()}

    def __call__(self, images: tf.Tensor, training: bool = False,
                 parameters: dict[str, tuple[tf.Tensor, tf.Tensor]] | None = None) -> tf.Tensor:
        """The logits. ``parameters``: :meth:`quantized_parameters` at the images' size,
        computed once for many batches (evaluation; the result is the same)."""
        if parameters is not None:
            def layer(name, x, t):
                return self.layers[name](x, t, parameters=parameters[name])
        else:
            alive = self.output_liveness(int(images.shape[1] or 224)) or {}

            def layer(name, x, t):
                return self.layers[name](x, t, alive.get(name))
        return self.net.forward(
            images, layer,
            training=training,
            activation=self._activation, dropout=nw.stateless_dropout(self.rng),
            dropout_rate=self.dropout_rate, drop_connect_rate=self.drop_connect_rate)

    def float_forward(self, images: tf.Tensor, observe=lambda name, x: None) -> tf.Tensor:
        """The BN-folded float network (no quantization), reporting every quantizer's input."""
        def activation(scope, fn, x):
            if self._quantizer_of(scope, fn) is not None:
                observe(f"{scope}/{fn}_input", x)
            return nw.ACTIVATIONS[fn](x)

        return self.net.forward(images, lambda name, x, t: self.layers[name].float_call(x, observe),
                                activation=activation)

    # ------------------------------------------------------------------ quantizers

    def quantizers(self) -> dict[str, Quantizer]:
        """Every quantizer by tensor name (``<scope>/weights``, ``/input``, ...)."""
        result = {}
        for scope, layer in self.layers.items():
            result[f"{scope}/weights"] = layer.weight_quant
            if layer.act_quant is not None:
                result[f"{scope}/input"] = layer.act_quant
            if layer.bias_quant is not None:
                result[f"{scope}/biases"] = layer.bias_quant
        for scope, quant in self.swish_quant.items():
            result[f"{scope}/swish_input"] = quant
        for scope, quant in self.gate_quant.items():
            result[f"{scope}/sigmoid_input"] = quant
        return result

    def bits_variables(self) -> list[tf.Variable]:
        return [v for q in self.quantizers().values() for v in q.bits_variables()]

    def sparsity_variables(self) -> list[tf.Variable]:
        """The learned magnitude thresholds (trained with the bits, by the metric term)."""
        return [layer.prune_threshold for layer in self.layers.values()
                if layer.prune_threshold is not None]

    def freeze_masks(self) -> None:
        for layer in self.layers.values():
            layer.freeze_mask()

    def bit_assignment(self, bits: Callable[[Quantizer], tf.Tensor] | None = None):
        """Current bits of every quantized tensor as a :class:`adj_quant.cost.BitAssignment`.

        ``bits(quantizer)``: its bits, when they were read beforehand (default: ``bits()``
        of each quantizer; see :meth:`bits_reader`)."""
        from adj_quant.cost import BitAssignment, counted_bits

        bits = bits or self._current_bits()
        weight = {s: bits(layer.weight_quant) for s, layer in self.layers.items()}
        act = {s: (8.0 if layer.act_quant is None else bits(layer.act_quant))
               for s, layer in self.layers.items()}
        swish = {s: (bits(self.swish_quant[s]) if s in self.swish_quant else 32.0)
                 for s in self.net.activation_sites("swish")}
        swish.update({s: bits(q) for s, q in self.gate_quant.items()})
        density = {s: layer.density() for s, layer in self.layers.items()
                   if layer.mask is not None}
        return BitAssignment(weight=weight, act=act, swish=swish,
                             bias_bits=counted_bits(self.qcfg.quantized_bias_bits),
                             density=density)

    def _current_bits(self) -> Callable[[Quantizer], tf.Tensor]:
        """``bits(quantizer)``: each quantizer's :meth:`~AdjustableQuantizer.bits`, those of
        the trainable adjustable quantizers computed together, as one
        ``clip(round(bits_scale * b0), 2, 8)`` over all their channels. Channel by channel
        the same ops on the same values, so the same bits and gradients; but a few dozen
        graph ops, forward and backward, instead of a few dozen per quantizer, which the
        metric term of every step that trains the bits would trace."""
        trained = [q for q in self.quantizers().values()
                   if isinstance(q, AdjustableQuantizer) and q.bits_scale is not None]
        if len(trained) < 2:
            return lambda quant: quant.bits()
        b0 = np.concatenate([np.full([q.channels], q.init_bits, np.float32) for q in trained])
        joint = _bits_math(tf.concat([q.bits_scale for q in trained], 0), b0)
        parts = dict(zip(map(id, trained), tf.split(joint, [q.channels for q in trained])))
        return lambda quant: parts[id(quant)] if id(quant) in parts else quant.bits()

    def bits_reader(self) -> Callable[[], dict[str, tf.Tensor]]:
        """A function that reads every quantizer's current bits (by the names of
        :meth:`quantizers`) in one traced call: eagerly, reading the bits of EfficientNet-B0's
        ~300 quantizers takes ~1,500 small ops. For reports made at every mini-epoch;
        :meth:`assignment_of` turns what it read into the assignment."""
        quantizers = self.quantizers()
        return tf.function(lambda: {name: q.bits() for name, q in quantizers.items()},
                           autograph=False)

    def assignment_of(self, values: dict[str, tf.Tensor]):
        """:meth:`bit_assignment` from the bits :meth:`bits_reader` read."""
        names = {id(q): name for name, q in self.quantizers().items()}
        return self.bit_assignment(lambda quant: values[names[id(quant)]])

    # ------------------------------------------------------------------ calibration

    def calibrate_weights(self) -> None:
        """Weight and bias ranges: per-channel min/max of the folded tensors (and, for
        LSQ+, the weight steps from the weights themselves)."""
        for layer in self.layers.values():
            w = layer.weights.numpy()
            axes = (0, 1, 3) if layer.kind == "dws" else tuple(range(w.ndim - 1))
            layer.weight_quant.set_range(w.min(axis=axes), w.max(axis=axes))
            if layer.bias_quant is not None:
                b = layer.biases.numpy()
                layer.bias_quant.set_range([b.min()], [b.max()])
        self._init_from_weights()

    def _init_from_weights(self) -> None:
        """Every weight quantizer's initialisation from the weights themselves
        (``Quantizer.init_from_weights``, after their min/max range; LSQ+: mean +- 3 std of
        the weights, the adjustable quantizer: nothing more)."""
        for layer in self.layers.values():
            layer.weight_quant.init_from_weights(layer.weights.numpy())

    def calibrate_activations(self, batches, num_images: int | None = None,
                              progress: bool = True) -> int:
        """Activation ranges: running per-channel min/max of every quantizer input.

        ``batches`` yields image batches (or ``(images, labels)``); stops after
        ``num_images``. Returns the number of images seen.

        Under a ``tf.distribute`` strategy each batch is split over the replicas and their
        per-channel minima and maxima are reduced across all of them, so the ranges equal
        those of one device on the same images.
        """
        from adj_quant import distribution

        quants = self.quantizers()
        names = [n for n in quants if n.endswith(ACTIVATION_SITES)]
        lo = {n: np.full([quants[n].channels], np.inf, np.float32) for n in names}
        hi = {n: np.full([quants[n].channels], -np.inf, np.float32) for n in names}
        strategy = tf.distribute.get_strategy()

        def batch_ranges(images):
            low, high = {}, {}

            def observe(name, x):
                axes = list(range(len(x.shape) - 1))
                low[name], high[name] = tf.reduce_min(x, axes), tf.reduce_max(x, axes)

            self.float_forward(images, observe)
            return low, high

        @tf.function(autograph=False)
        def step(images):
            low, high = strategy.run(batch_ranges, (images,))
            return distribution.reduce_min_max(strategy, low, high)

        seen = 0
        bar = tqdm(total=num_images, desc="calibrate", unit="img", disable=not progress,
                   leave=False)
        for batch in batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if num_images is not None:
                images = images[: num_images - seen]
            low, high = step(*distribution.split_batch(strategy, images))
            for n in names:
                lo[n] = np.minimum(lo[n], low[n].numpy())
                hi[n] = np.maximum(hi[n], high[n].numpy())
            seen += int(images.shape[0])
            bar.update(int(images.shape[0]))
            if num_images is not None and seen >= num_images:
                break
        bar.close()
        if seen == 0:
            raise UserError("calibration saw no images; pass a non-empty image source")
        for n in names:
            quants[n].set_range(lo[n], hi[n])
        return seen

    # ------------------------------------------------------------------ thresholds file

    def thresholds(self) -> dict[str, dict[str, list[float]]]:
        return {name: {"min": q.init_min.numpy().tolist(), "max": q.init_max.numpy().tolist()}
                for name, q in self.quantizers().items()}

    def save_thresholds(self, path: str) -> None:
        write_json_atomic(path, self.thresholds(), indent=None)

    def load_thresholds(self, path: str) -> None:
        """Load ``initial_thresholds.json``; refuse a file for another model."""
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise UserError(f"thresholds file {path} not found; calibrate the model first (the "
                            "recipe's calibrate stage writes it) or pass the right path") from None
        except IsADirectoryError:
            raise UserError(f"thresholds file {path} is a directory; pass its "
                            "initial_thresholds.json") from None
        except OSError as err:
            raise UserError(f"thresholds file {path} cannot be read ({err.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"thresholds file {path} is not valid JSON ({err})") from None
        self.set_thresholds(data, source=path)

    def set_thresholds(self, data: dict, source: str = "thresholds") -> None:
        quants = self.quantizers()
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a JSON object of tensor names")
        for name, quant in quants.items():
            if name not in data:
                raise UserError(f"{source} does not match the model: it has no entry for "
                                f"{name!r} (another swish_bits/bias_bits setting or "
                                "architecture?); recalibrate (the recipe's calibrate stage)")
            entry = data[name]
            for key in ("min", "max"):
                values = entry.get(key) if isinstance(entry, dict) else None
                if not isinstance(values, list) or len(values) != quant.channels:
                    got = len(values) if isinstance(values, list) else type(values).__name__
                    raise UserError(f"{source} does not match the model: {name} {key} has "
                                    f"{got} values, the model needs {quant.channels} (another "
                                    "class count or width?); recalibrate")
                bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))
                       or not math.isfinite(v)]
                if bad:
                    raise UserError(f"{source}: {name} {key} holds {bad[0]!r}, not a finite "
                                    "number; recalibrate")
            low = next((i for i, (a, b) in enumerate(zip(entry["min"], entry["max"])) if a > b),
                       None)
            if low is not None:
                raise UserError(f"{source}: {name} channel {low} has min {entry['min'][low]} > "
                                f"max {entry['max'][low]}; recalibrate")
        extra = sorted(set(data) - set(quants))
        if extra:
            raise UserError(f"{source} does not match the model: unknown tensor {extra[0]!r} "
                            "(another swish_bits/bias_bits setting?); recalibrate")
        for name, quant in quants.items():
            quant.set_range(data[name]["min"], data[name]["max"])
        self._init_from_weights()


def is_quantized(model) -> bool:
    """Whether ``model`` is a :class:`QuantizedNetwork` (else a float model, e.g.
    :class:`adj_quant.network.FloatNetwork`, whose bits are 32 everywhere)."""
    return isinstance(model, QuantizedNetwork)
