"""The quantized EfficientNet-B0 (specification section 2).

Built from a float model: batch norm is folded into every conv's weights and bias, then
every weight tensor, the input of every conv/FC (except the stem, whose input is the
8-bit image), every swish input and every bias gets an :class:`AdjustableQuantizer`.

Quantizer ("tensor") names, used by ``initial_thresholds.json``::

    <scope>/weights      per output channel (depthwise: per channel, axis 2)
    <scope>/input        per input channel: the activation the layer multiplies with
    <scope>/swish_input  per channel, the pre-activation of a swish (``--swish_bits``)
    <scope>/biases       one range per tensor (``--bias_bits``)
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from adj_quant.errors import UserError
from adj_quant.quantizers import AdjustableQuantizer, check_bits, range_preset
from slim_nets import efficientnet_b0 as eb0

STEM = "Conv"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Which tensors are quantized, at how many initial bits, and whether bits train."""

    weight_bits: int = 8
    act_bits: int = 8
    swish_bits: int = 8       # 8: fixed 8 bits; 0: trainable bits from act_bits; -1: float
    bias_bits: int = 8        # 0: float biases
    bits_trainable: bool = False
    range_preset: int = 5

    def __post_init__(self):
        check_bits(self.weight_bits, "--weight_bits")
        check_bits(self.act_bits, "--act_bits")
        if self.swish_bits not in (8, 0, -1):
            raise UserError(f"--swish_bits {self.swish_bits} is not a swish mode; use 8 (fixed "
                            "8 bits), 0 (trainable bits from --act_bits) or -1 (not quantized)")
        if self.bias_bits != 0:
            check_bits(self.bias_bits, "--bias_bits")
        range_preset(self.range_preset)


class QuantizedLayer(tf.Module):
    """Folded conv / depthwise / FC with quantized weights, input and bias."""

    def __init__(self, scope: str, kind: str, kernel: int, cin: int, cout: int, stride: int,
                 qcfg: QuantConfig):
        super().__init__(name=None)
        full = f"{eb0.SCOPE}/{scope}"
        self.scope, self.kind, self.kernel, self.stride = scope, kind, kernel, stride
        self.cin, self.cout = cin, cout
        shape = {"conv": [kernel, kernel, cin, cout], "dws": [kernel, kernel, cin, 1],
                 "fc": [cin, cout]}[kind]
        weight_name = "depthwise_weights" if kind == "dws" else "weights"
        self.weights = tf.Variable(tf.zeros(shape), name=f"{full}/{weight_name}")
        self.biases = tf.Variable(tf.zeros([cout]), name=f"{full}/biases")
        common = dict(bits_trainable=qcfg.bits_trainable, range_preset_id=qcfg.range_preset)
        self.weight_quant = AdjustableQuantizer(
            f"{full}/weight_quant", cout, axis=2 if kind == "dws" else -1,
            init_bits=qcfg.weight_bits, **common)
        self.act_quant = None if scope == STEM else AdjustableQuantizer(
            f"{full}/act_quant", cin, axis=-1, init_bits=qcfg.act_bits, **common)
        self.bias_quant = None if qcfg.bias_bits == 0 else AdjustableQuantizer(
            f"{full}/bias_quant", 1, init_bits=qcfg.bias_bits, range_preset_id=qcfg.range_preset)

    def load_float(self, layer: eb0.ConvLayer) -> None:
        weights, biases = eb0.fold_batch_norm(layer)
        self.weights.assign(weights)
        self.biases.assign(biases)

    def quantized_weights(self) -> tuple[tf.Tensor, tf.Tensor]:
        biases = self.biases if self.bias_quant is None else self.bias_quant(self.biases)
        return self.weight_quant(self.weights), biases

    def __call__(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        weights, biases = self.quantized_weights()
        return eb0.apply_linear(self.kind, x, weights, self.stride) + biases

    def float_call(self, x: tf.Tensor, observe) -> tf.Tensor:
        """Unquantized forward that reports its input to ``observe`` (for calibration)."""
        if self.act_quant is not None:
            observe(f"{self.scope}/input", x)
        return eb0.apply_linear(self.kind, x, self.weights, self.stride) + self.biases


class QuantizedEfficientNetB0(tf.Module):
    """Fake-quantized, BN-folded EfficientNet-B0."""

    def __init__(self, arch: eb0.ArchConfig, qcfg: QuantConfig, *, dropout_rate: float = 0.2,
                 drop_connect_rate: float = 0.2, seed: int = 0):
        super().__init__(name=eb0.SCOPE)
        self.arch, self.qcfg = arch, qcfg
        self.dropout_rate, self.drop_connect_rate = dropout_rate, drop_connect_rate
        self.rng = tf.random.Generator.from_seed(seed)
        shapes = eb0.build_layer_shapes(arch)
        self.layers = {scope: QuantizedLayer(scope, *shape, qcfg=qcfg)
                       for scope, shape in shapes.items()}
        self.swish_quant = {}
        if qcfg.swish_bits != -1:
            trainable = qcfg.swish_bits == 0
            for scope in eb0.swish_scopes(arch):
                self.swish_quant[scope] = AdjustableQuantizer(
                    f"{eb0.SCOPE}/{scope}/swish_quant", self.layers[scope].cout,
                    init_bits=qcfg.act_bits if trainable else 8,
                    bits_trainable=trainable and qcfg.bits_trainable,
                    range_preset_id=qcfg.range_preset)

    @classmethod
    def from_float(cls, float_model: eb0.EfficientNetB0, qcfg: QuantConfig,
                   seed: int = 0) -> "QuantizedEfficientNetB0":
        model = cls(float_model.arch, qcfg, dropout_rate=float_model.dropout_rate,
                    drop_connect_rate=float_model.drop_connect_rate, seed=seed)
        for scope, layer in model.layers.items():
            layer.load_float(float_model.layers[scope])
        model.calibrate_weights()
        return model

    # ------------------------------------------------------------------ forward

    def _swish(self, scope: str, x: tf.Tensor) -> tf.Tensor:
        quant = self.swish_quant.get(scope)
        return eb0.swish(x if quant is None else quant(x))

    def __call__(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        return eb0.efficientnet_forward(
            self.layers, images, self.arch, training=training, swish_fn=self._swish,
            dropout_rate=self.dropout_rate, drop_connect_rate=self.drop_connect_rate, rng=self.rng)

    def float_forward(self, images: tf.Tensor, observe=lambda name, x: None) -> tf.Tensor:
        """The BN-folded float network (no quantization), reporting every quantizer's input."""
        def swish_fn(scope, x):
            if scope in self.swish_quant:
                observe(f"{scope}/swish_input", x)
            return eb0.swish(x)

        layers = {scope: (lambda x, training, layer=layer: layer.float_call(x, observe))
                  for scope, layer in self.layers.items()}
        return eb0.efficientnet_forward(layers, images, self.arch, training=False,
                                        swish_fn=swish_fn)

    # ------------------------------------------------------------------ quantizers

    def quantizers(self) -> dict[str, AdjustableQuantizer]:
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
        return result

    def bits_variables(self) -> list[tf.Variable]:
        return [q.bits_scale for q in self.quantizers().values() if q.bits_scale is not None]

    def bit_assignment(self):
        """Current bits of every quantized tensor as a :class:`adj_quant.metric.BitAssignment`."""
        from adj_quant.metric import BitAssignment

        weight = {s: l.weight_quant.bits() for s, l in self.layers.items()}
        act = {s: (8.0 if l.act_quant is None else l.act_quant.bits())
               for s, l in self.layers.items()}
        swish = {s: (self.swish_quant[s].bits() if s in self.swish_quant else 32.0)
                 for s in eb0.swish_scopes(self.arch)}
        return BitAssignment(weight=weight, act=act, swish=swish,
                             bias_bits=self.qcfg.bias_bits or 32)

    # ------------------------------------------------------------------ calibration

    def calibrate_weights(self) -> None:
        """Weight and bias ranges: per-channel min/max of the folded tensors."""
        for layer in self.layers.values():
            w = layer.weights.numpy()
            axes = (0, 1, 3) if layer.kind == "dws" else tuple(range(w.ndim - 1))
            layer.weight_quant.set_range(w.min(axis=axes), w.max(axis=axes))
            if layer.bias_quant is not None:
                b = layer.biases.numpy()
                layer.bias_quant.set_range([b.min()], [b.max()])

    def calibrate_activations(self, batches, num_images: int | None = None,
                              progress: bool = True) -> int:
        """Activation ranges: running per-channel min/max of every quantizer input.

        ``batches`` yields image batches (or ``(images, labels)``); stops after
        ``num_images``. Returns the number of images seen.
        """
        names = [n for n in self.quantizers() if n.endswith(("/input", "/swish_input"))]
        quants = self.quantizers()
        lo = {n: tf.Variable(tf.fill([quants[n].channels], np.inf)) for n in names}
        hi = {n: tf.Variable(tf.fill([quants[n].channels], -np.inf)) for n in names}

        def observe(name, x):
            axes = list(range(len(x.shape) - 1))
            lo[name].assign(tf.minimum(lo[name], tf.reduce_min(x, axes)))
            hi[name].assign(tf.maximum(hi[name], tf.reduce_max(x, axes)))

        step = tf.function(lambda images: self.float_forward(images, observe))
        seen = 0
        bar = tqdm(total=num_images, desc="calibrate", unit="img", disable=not progress,
                   leave=False)
        for batch in batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if num_images is not None:
                images = images[: num_images - seen]
            step(images)
            seen += int(images.shape[0])
            bar.update(int(images.shape[0]))
            if num_images is not None and seen >= num_images:
                break
        bar.close()
        if seen == 0:
            raise UserError("calibration saw no images; check --dataset")
        for n in names:
            quants[n].set_range(lo[n].numpy(), hi[n].numpy())
        return seen

    # ------------------------------------------------------------------ thresholds file

    def thresholds(self) -> dict[str, dict[str, list[float]]]:
        return {name: {"min": q.init_min.numpy().tolist(), "max": q.init_max.numpy().tolist()}
                for name, q in self.quantizers().items()}

    def save_thresholds(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.thresholds(), f)
        os.replace(tmp, path)

    def load_thresholds(self, path: str) -> None:
        """Load ``initial_thresholds.json``; refuse a file for another model."""
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise UserError(f"thresholds file {path} not found; run `train.py --stage calibrate` "
                            "first or pass the right path") from None
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
                                f"{name!r} (another --swish_bits/--bias_bits or architecture?); "
                                "recalibrate with `train.py --stage calibrate`")
            entry = data[name]
            for key in ("min", "max"):
                values = entry.get(key) if isinstance(entry, dict) else None
                if not isinstance(values, list) or len(values) != quant.channels:
                    got = len(values) if isinstance(values, list) else type(values).__name__
                    raise UserError(f"{source} does not match the model: {name} {key} has "
                                    f"{got} values, the model needs {quant.channels} (another "
                                    "--num_classes or width?); recalibrate")
        extra = sorted(set(data) - set(quants))
        if extra:
            raise UserError(f"{source} does not match the model: unknown tensor {extra[0]!r} "
                            "(another --swish_bits/--bias_bits setting?); recalibrate")
        for name, quant in quants.items():
            quant.set_range(data[name]["min"], data[name]["max"])
