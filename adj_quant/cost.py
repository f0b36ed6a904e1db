"""MicroNet-style cost of a (mixed-precision) EfficientNet-B0: params, multiplies, adds, score.

Two counting styles, written once with TensorFlow ops so that the same code prints the
report and gives the differentiable metric term of the training loss:

``micronet``
    The official challenge rules (``docs/metric.md``). Multiplies of a conv / FC
    cost ``max(w_co, a_ci) / 32`` per multiply (per output channel weight bits, per input
    channel activation bits); adds of fake-quantized layers are float32 accumulations and
    cost 32/32; pooling, SE scale, sigmoid, swish and residual adds are counted; the
    quantizers' scales and offsets are 32-bit parameters. A fully float network may use
    the 16-bit "freebie" (params and multiplies at 16 bits).

``adjq``
    The original submission's own counting: ``2 * MACs * max(w, a) / 32`` per weight
    layer, where for per-channel bits ``max(w, a)`` is the original's
    ``mean(maximum(tile(w, len(a)), tile(a, len(w))))`` (see :func:`tiled_max_mean`); the
    stem at 8 bits, swish at 3 ops per element, nothing else; params at
    ``weights * mean(w) / 32 + biases * bias_bits / 32``.

Everything is computed in float64 (exact integer counts for the float model); a float32
bits tensor is cast, so gradients flow back to it. Wherever a max of weight and
activation bits is taken, :func:`surrogate_max` supplies the gradient
``(1 - gamma) * dL/dw, gamma * dL/da``.

The building blocks are public so they can be checked on tiny inputs:
:func:`micronet_layer_counts`, :func:`micronet_element_counts`, :func:`adjq_layer_counts`,
:func:`adjq_element_counts` and :func:`count_specs` (any list of :class:`LayerSpec` and
:class:`ElementOp`). A layer with ``stem=True`` multiplies with the 8-bit image, which has
no quantizer of ours (micronet) and which ``adjq`` charges at a flat 8 bits.
:func:`network_layers` and :func:`element_ops` derive the lists from a declared network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import numpy as np
import tensorflow as tf

from adj_quant.bits import FLOAT_BITS, is_bit_width
from adj_quant.errors import UserError
from adj_quant.network import Network

P_REF, O_REF = 6.9e6, 1170e6

IMAGE_BITS = 8
STYLES = ("adjq", "micronet")  # the loss counting (--metric_style), then the official
LAYER_KINDS = ("conv", "dws", "fc")
ELEMENT_KINDS = ("swish", "sigmoid", "relu", "relu6", "hard_swish", "gap", "maxpool", "se_scale",
                 "residual_add", "hard_sigmoid", "gelu", "avgpool", "layer_norm")

_DTYPE = tf.float64


# --------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One conv / depthwise / FC layer (scope relative to ``efficientnet_b0``)."""

    scope: str
    kind: str  # "conv" | "dws" | "fc"
    kernel: int
    cin: int
    cout: int
    stride: int
    in_hw: int  # input spatial size (side); 1 for SE convs and FC
    out_hw: int  # output spatial size (side), SAME padding: ceil(in / stride)
    has_bias: bool  # True for every layer of the folded model
    stem: bool = False  # multiplies with the 8-bit image (no input quantizer of ours)
    kernel_w: int = 0  # kernel columns of a non-square kernel (0: square)
    groups: int = 1  # conv: each output channel reads cin / groups input channels

    @property
    def taps(self) -> int:
        """Kernel positions: rows times columns."""
        return self.kernel * (self.kernel_w or self.kernel)

    @property
    def weights_per_out_channel(self) -> int:
        """Weight elements behind one output channel (depthwise: one channel's kernel)."""
        if self.kind == "dws":
            return self.taps
        return self.taps * (self.cin // self.groups)

    @property
    def weight_channels(self) -> int:
        """Channels of the per-channel weight quantizer (``cout``; depthwise ``C``)."""
        return self.cin if self.kind == "dws" else self.cout

    @property
    def macs(self) -> int:
        positions = self.out_hw * self.out_hw
        return positions * self.weights_per_out_channel * self.cout


@dataclasses.dataclass(frozen=True)
class ElementOp:
    """A non-conv op of the MicroNet table. ``hw`` is the spatial side: ``hw*hw*channels``
    elements."""

    kind: str  # one of ELEMENT_KINDS
    # swish and sigmoid: the scope whose output they take (key of BitAssignment.swish);
    # else e.g. "expanded_conv_3/se"
    scope: str
    hw: int
    channels: int
    kernel: int = 1  # maxpool: the window side (``hw`` is then the output side)


def network_layers(net: Network, img_size: int) -> list[LayerSpec]:
    """Every weight layer of a declared network, in execution order."""
    shapes = net.layer_shapes(img_size)
    layers = []
    for node in net.layers:
        in_hw, cin, out_hw, cout = shapes[node.name]
        layers.append(LayerSpec(node.name, node.op, node.kernel, cin, cout, node.stride, in_hw,
                                out_hw, True, stem=net.is_stem(node), kernel_w=node.kernel_w,
                                groups=node.groups))
    return layers


_ELEMENT_KINDS_OF = {"gap": "gap", "maxpool": "maxpool", "mul": "se_scale", "add": "residual_add",
                     "avgpool": "avgpool", "layer_norm": "layer_norm"}
_WINDOW_OPS = ("maxpool", "avgpool")


def element_ops(net: Network, img_size: int) -> list[ElementOp]:
    """Activations, pooling, SE scales and residual adds, in execution order.

    An activation's scope is the scope that feeds it (the key of its input bits); the
    others use their node's name. Dropout costs nothing at inference.
    """
    shapes = net.shapes(img_size)
    ops = []
    for node in net.nodes:
        source = shapes[net.inputs_of(node)[0]]
        if node.op == "act":
            ops.append(ElementOp(node.fn, net.inputs_of(node)[0], source.hw, source.channels))
        elif node.op in _ELEMENT_KINDS_OF:
            out = shapes[node.name]
            hw = source.hw if node.op == "gap" else out.hw
            ops.append(ElementOp(_ELEMENT_KINDS_OF[node.op], node.name, hw, out.channels,
                                 node.kernel if node.op in _WINDOW_OPS else 1))
    return ops


# --------------------------------------------------------------------------- bits


def _static(value) -> np.ndarray | None:
    """The numeric value of ``value`` if it is known now (numbers, arrays, eager tensors)."""
    if isinstance(value, (bool, int, float, np.ndarray, np.number, list, tuple)):
        return np.asarray(value, dtype=np.float64)
    if isinstance(value, (tf.Tensor, tf.Variable)):
        if tf.executing_eagerly() and hasattr(value, "numpy"):
            return np.asarray(value.numpy(), dtype=np.float64)
        static = tf.get_static_value(value) if isinstance(value, tf.Tensor) else None
        return None if static is None else np.asarray(static, dtype=np.float64)
    return None


def _is_all(value, bits: float) -> bool:
    v = _static(value)
    return v is not None and v.size > 0 and bool(np.all(v == bits))


def _check_uniform_bits(name: str, value, allowed_extra: tuple[int, ...]) -> None:
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        if not isinstance(value, bool):
            return  # tensors: the caller's business
    elif is_bit_width(value, allow_float=True) or value in allowed_extra:
        return
    extra = "".join(f", {e}" for e in allowed_extra)
    raise UserError(f"{name}={value!r}: bits must be an integer in [2, 8]{extra} "
                    f"(or 32 for the float model)")


def counted_bits(bits: int | None) -> int:
    """Bits as the counts take them: None (a float tensor, e.g. float biases) is 32."""
    return FLOAT_BITS if bits is None else bits


@dataclasses.dataclass
class BitAssignment:
    """Bit-widths of every quantized tensor of the network, keyed by slim scope.

    ``weight[scope]``: bits per OUTPUT channel (``[cout]``; depthwise ``[C]``) or a scalar.
    ``act[scope]``: bits of the layer's INPUT activation per input channel (``[cin]``) or a
    scalar; a stem's is 8, the 8-bit image (its scope is in ``image_inputs``).
    ``swish[scope]``: bits of the input of an activation function (scalar or ``[C]``):
    every swish site and, when quantized, every sigmoid site (EfficientNet's SE gates,
    ``<block>/se_2``; absent means float). ``bias_bits``: bits of all biases. 32 anywhere
    means "not quantized" (float): a float tensor is counted at 32 bits, without a scale
    and offset (:func:`counted_bits` turns a config's None into 32). Values may be numbers,
    numpy arrays or tf tensors.

    ``density[scope]``: the fraction of the layer's weights that are nonzero (``1 -
    sparsity``): a scalar, one value per output channel (``[cout]``; depthwise ``[C]``), or,
    for a conv / FC, one per (input, output) channel pair (``[cin, cout]``: the fraction of
    the ``k*k`` taps kept). A layer without an entry is dense; an output channel whose
    density is 0 is removed (see :func:`input_liveness`).
    """

    weight: dict[str, Any]
    act: dict[str, Any]
    swish: dict[str, Any]
    bias_bits: Any
    image_inputs: frozenset = frozenset()
    density: dict[str, Any] = dataclasses.field(default_factory=dict)

    def fingerprint(self) -> bytes:
        """A digest of every bit-width and density: equal assignments have equal
        fingerprints, so a cost computed for one serves the other."""
        digest = hashlib.sha256()

        def add(value) -> None:
            if value is None:
                digest.update(b"None")
            else:
                array = np.asarray(value, np.float64)
                digest.update(str(array.shape).encode() + array.tobytes())

        for table in (self.weight, self.act, self.swish, self.density):
            for key in sorted(table):
                digest.update(key.encode() + b"=")
                add(table[key])
            digest.update(b"|")
        add(self.bias_bits)
        digest.update(",".join(sorted(self.image_inputs)).encode())
        return digest.digest()

    @classmethod
    def uniform(cls, arch: Network, weight_bits, act_bits, swish_bits=8,
                bias_bits=8, se_gate: bool = True, sparsity: float = 0.0) -> "BitAssignment":
        """The same bits everywhere.

        ``swish_bits`` (the flag's values): 8 (or any of 2..8) fixed, 0 "trainable, starting
        from ``act_bits``" (counted at ``act_bits``), -1 float. ``se_gate``: the SE sigmoid's
        input is quantized like a swish input. ``bias_bits`` None (or the flag's 0) means
        float biases. Weight and activation bits of 32/32 give the float model (swish, gates
        and biases float too). ``sparsity``: the fraction of zero weights of every conv,
        depthwise and FC weight tensor (as the official ``print_summary(sparsity=...)``).
        """
        _check_uniform_bits("weight_bits", weight_bits, ())
        _check_uniform_bits("act_bits", act_bits, ())
        _check_uniform_bits("swish_bits", swish_bits, (-1, 0))
        _check_uniform_bits("bias_bits", bias_bits, (0,))
        scopes = arch.layer_names
        stems = frozenset(n.name for n in arch.layers if arch.is_stem(n))
        if weight_bits == FLOAT_BITS and act_bits == FLOAT_BITS:
            swish, bias = FLOAT_BITS, FLOAT_BITS
        else:
            swish = {-1: FLOAT_BITS, 0: act_bits}.get(swish_bits, swish_bits)
            bias = counted_bits(bias_bits or None)  # the flag's 0 is float
        act = {scope: act_bits for scope in scopes}
        act.update({scope: IMAGE_BITS for scope in stems})
        sites = arch.activation_sites("swish") + (arch.activation_sites("sigmoid") if se_gate
                                                  else [])
        if sparsity:
            from adj_quant.sparsity import check_sparsity

            sparsity = check_sparsity(sparsity)
        density = {scope: 1.0 - sparsity for scope in scopes} if sparsity else {}
        return cls(weight={scope: weight_bits for scope in scopes}, act=act,
                   swish={scope: swish for scope in sites}, bias_bits=bias, image_inputs=stems,
                   density=density)

    def is_float(self) -> bool:
        """True when every entry is 32 (the stem's image input excepted).

        Symbolic tensors (inside ``tf.function``) are unknown and make this False.
        """
        values = list(self.weight.values()) + list(self.swish.values())
        values.append(counted_bits(self.bias_bits))
        values += [v for scope, v in self.act.items() if scope not in self.image_inputs]
        return all(_is_all(v, FLOAT_BITS) for v in values)


def _bits(value, n: int, what: str) -> tf.Tensor:
    """``value`` as a float64 tensor of shape ``[]`` or ``[n]``."""
    t = value if isinstance(value, tf.Tensor) else tf.convert_to_tensor(value)
    if t.dtype != _DTYPE:
        t = tf.cast(t, _DTYPE)
    shape = t.shape
    if shape.rank is None or shape.rank > 1:
        raise ValueError(f"{what}: bits must be a scalar or a vector of {n}, got shape {shape}")
    if shape.rank == 1:
        length = shape[0]
        if length == 1 and n != 1:
            return tf.reshape(t, [])
        if length not in (n, None):
            raise ValueError(f"{what}: {length} bits, expected {n} (one per channel) or a scalar")
    return t


def _channel_sum(t: tf.Tensor, n: int) -> tf.Tensor:
    """Sum over ``n`` channels of a ``[]`` or ``[n]`` (or broadcast matrix) tensor."""
    size = t.shape.num_elements()
    if size is None:
        return tf.reduce_sum(t) * tf.cast(n, _DTYPE) / tf.cast(tf.size(t), _DTYPE)
    return tf.reduce_sum(t) * (n / size)


def _quantized_channels(t: tf.Tensor, n: int) -> tf.Tensor:
    """Number of channels with bits < 32 (they carry a per-channel scale and offset)."""
    return _channel_sum(tf.cast(t < FLOAT_BITS, _DTYPE), n)


def _reduce_to_shape(grad: tf.Tensor, shape: tf.Tensor) -> tf.Tensor:
    _, axes = tf.raw_ops.BroadcastGradientArgs(s0=tf.shape(grad), s1=shape)
    return tf.reshape(tf.reduce_sum(grad, axis=axes), shape)


def surrogate_max(w_bits, a_bits, gamma) -> tf.Tensor:
    """``max(w, a)`` (broadcasting) whose gradient is that of ``(1-gamma)*w + gamma*a``.

    The incoming gradient ``g`` goes to ``w`` as ``g*(1-gamma)`` and to ``a`` as
    ``g*gamma``, each summed over the axes along which that input was broadcast.
    """
    w = tf.convert_to_tensor(w_bits)
    a = tf.convert_to_tensor(a_bits)
    if w.dtype != a.dtype or not w.dtype.is_floating:
        floats = [t.dtype for t in (w, a) if t.dtype.is_floating]
        dtype = tf.float64 if tf.float64 in floats or len(set(floats)) > 1 else (
            floats[0] if floats else tf.float32)
        w, a = tf.cast(w, dtype), tf.cast(a, dtype)
    g_act = (tf.cast(gamma, w.dtype) if isinstance(gamma, (tf.Tensor, tf.Variable))
             else tf.constant(gamma, w.dtype))  # a Python float stays exact in float64

    @tf.custom_gradient
    def _max(w, a):
        def grad(dy):
            return (_reduce_to_shape(dy * (1.0 - g_act), tf.shape(w)),
                    _reduce_to_shape(dy * g_act, tf.shape(a)))

        return tf.maximum(w, a), grad

    return _max(w, a)


# --------------------------------------------------------------------------- per-layer counts


def _check_spec(spec: LayerSpec) -> None:
    if spec.kind not in LAYER_KINDS:
        raise ValueError(f"{spec.scope}: unknown layer kind {spec.kind!r}")
    if spec.kind == "dws" and spec.cin != spec.cout:
        raise ValueError(f"{spec.scope}: a depthwise layer needs cin == cout")


#: ``x * _PER_BIT`` is ``x / 32`` to the last bit (a power of two), and its gradient is one
#: multiply: TensorFlow's gradient of a division also builds the one of the constant
#: divisor, about ten ops that grappler then prunes, at each of a network's ~300 counts.
_PER_BIT = 1.0 / FLOAT_BITS


def _zero() -> tf.Tensor:
    return tf.constant(0.0, _DTYPE)


def micronet_layer_counts(spec: LayerSpec, w_bits, a_bits, bias_bits, *, act_quantizer=None,
                          gamma: float = 0.7) -> dict[str, tf.Tensor]:
    """Official counts of one conv / depthwise / FC layer: ``{params, multiplies, adds}``.

    ``act_quantizer`` (default: not the stem) says whether the input activation has a
    quantizer of ours whose scale/offset count as parameters.
    """
    _check_spec(spec)
    if act_quantizer is None:
        act_quantizer = not spec.stem
    n_w = spec.weight_channels
    w = _bits(w_bits, n_w, f"{spec.scope} weight")
    a = _bits(a_bits, spec.cin, f"{spec.scope} act")
    bias = _bits(bias_bits, 1, "bias_bits")
    positions = spec.out_hw * spec.out_hw
    k2 = spec.taps
    if spec.groups != 1:
        return _grouped_counts(spec, w, a, bias, act_quantizer, gamma)
    if spec.kind == "dws":
        sum_max = _channel_sum(surrogate_max(w, a, gamma), spec.cin)
        adds_per_out = k2 - 1 + int(spec.has_bias)
    else:
        pair = surrogate_max(tf.reshape(w, [1, -1]), tf.reshape(a, [-1, 1]), gamma)
        sum_max = _channel_sum(pair, spec.cin * spec.cout)
        adds_per_out = k2 * spec.cin - 1 + int(spec.has_bias)
    multiplies = positions * k2 * sum_max * _PER_BIT
    adds = tf.constant(float(positions * spec.cout * adds_per_out), _DTYPE)  # float32 accumulation
    params = spec.weights_per_out_channel * _channel_sum(w, n_w) * _PER_BIT
    params += 2.0 * _quantized_channels(w, n_w)
    if act_quantizer:
        params += 2.0 * _quantized_channels(a, spec.cin)
    if spec.has_bias:
        params += spec.cout * bias * _PER_BIT + 2.0 * tf.cast(bias < FLOAT_BITS, _DTYPE)
    return {"params": params, "multiplies": multiplies, "adds": adds}


def _grouped_counts(spec: LayerSpec, w, a, bias, act_quantizer: bool,
                    gamma: float) -> dict[str, tf.Tensor]:
    """Official counts of a grouped conv: only the (input, output) channel pairs of one
    group multiply (``docs/metric.md``, "Operations beyond the official table")."""
    if spec.cin % spec.groups or spec.cout % spec.groups:
        raise ValueError(f"{spec.scope}: groups={spec.groups} must divide cin and cout")
    gin, gout = spec.cin // spec.groups, spec.cout // spec.groups
    same_group = np.kron(np.eye(spec.groups), np.ones([gin, gout]))
    pair = surrogate_max(tf.reshape(w, [1, -1]), tf.reshape(a, [-1, 1]), gamma)
    pair = pair * tf.ones([spec.cin, spec.cout], _DTYPE)
    sum_max = tf.reduce_sum(pair * tf.constant(same_group, _DTYPE))
    positions = spec.out_hw * spec.out_hw
    multiplies = positions * spec.taps * sum_max * _PER_BIT
    adds_per_out = spec.taps * gin - 1 + int(spec.has_bias)
    adds = tf.constant(float(positions * spec.cout * adds_per_out), _DTYPE)
    params = spec.weights_per_out_channel * _channel_sum(w, spec.cout) * _PER_BIT
    params += 2.0 * _quantized_channels(w, spec.cout)
    if act_quantizer:
        params += 2.0 * _quantized_channels(a, spec.cin)
    if spec.has_bias:
        params += spec.cout * bias * _PER_BIT + 2.0 * tf.cast(bias < FLOAT_BITS, _DTYPE)
    return {"params": params, "multiplies": multiplies, "adds": adds}


def micronet_element_counts(op: ElementOp, bits=None) -> dict[str, tf.Tensor]:
    """Official counts of a non-conv op. ``bits``: the input bits (swish and sigmoid only;
    None means float)."""
    elements = op.hw * op.hw * op.channels
    c = op.channels
    const = lambda x: tf.constant(float(x), _DTYPE)  # noqa: E731
    if op.kind in ("swish", "sigmoid"):
        s = _bits(FLOAT_BITS if bits is None else bits, c, f"{op.scope} {op.kind}")
        per_element = op.hw * op.hw * _channel_sum(s, c) * _PER_BIT
        multiplies = 3.0 if op.kind == "swish" else 2.0
        return {"params": 2.0 * _quantized_channels(s, c), "multiplies": multiplies * per_element,
                "adds": per_element}
    if op.kind in ("relu", "relu6"):  # the official table: 1 per element, as a multiply
        return {"params": _zero(), "multiplies": const(elements), "adds": _zero()}
    if op.kind == "hard_swish":  # x * relu6(x + 3) / 6: the relu6 and 2 products; the + 3
        return {"params": _zero(), "multiplies": const(3 * elements), "adds": const(elements)}
    if op.kind == "maxpool":  # k*k - 1 comparisons per output element, counted as adds
        return {"params": _zero(), "multiplies": _zero(),
                "adds": const((op.kernel * op.kernel - 1) * elements)}
    if op.kind == "hard_sigmoid":  # relu6(x + 3) / 6: the relu6 and the / 6; the + 3
        return {"params": _zero(), "multiplies": const(2 * elements), "adds": const(elements)}
    if op.kind == "gelu":  # 0.5 * x * (1 + erf(x / sqrt 2)): /sqrt 2, erf, 2 products; the 1 +
        return {"params": _zero(), "multiplies": const(4 * elements), "adds": const(elements)}
    if op.kind == "avgpool":  # k*k - 1 adds and one division per output element
        return {"params": _zero(), "multiplies": const(elements),
                "adds": const((op.kernel * op.kernel - 1) * elements)}
    if op.kind == "layer_norm":  # per position of C channels: 2C + 3 multiplies, 3C - 1 adds
        positions = op.hw * op.hw
        return {"params": _zero(), "multiplies": const(positions * (2 * c + 3)),
                "adds": const(positions * (3 * c - 1))}
    if op.kind == "gap":
        return {"params": _zero(), "multiplies": const(c), "adds": const((op.hw * op.hw - 1) * c)}
    if op.kind == "se_scale":
        return {"params": _zero(), "multiplies": const(elements), "adds": _zero()}
    if op.kind == "residual_add":
        return {"params": _zero(), "multiplies": _zero(), "adds": const(elements)}
    raise ValueError(f"{op.scope}: unknown element op kind {op.kind!r}")


def tiled_max_mean(w, a, gamma) -> tf.Tensor:
    """The original's ``mean(maximum(tile(w, len(a)), tile(a, len(w))))``, differentiably.

    With ``n = len(w)`` and ``m = len(a)`` it is the mean over ``k < n*m`` of
    ``max(w[k mod n], a[k mod m])``. By the Chinese remainder theorem the pairs
    ``(k mod n, k mod m)`` are exactly the ``(i, j)`` with ``i = j (mod g)``, ``g = gcd(n, m)``,
    each ``g`` times; so the mean runs over those ``n*m/g`` pairs only (``n = m``: channel
    ``i`` with channel ``i``). The max is :func:`surrogate_max`: its gradient is that of
    ``(1 - gamma) * w + gamma * a``. A scalar counts as a vector of one.
    """
    w = tf.reshape(w, [-1])
    a = tf.reshape(a, [-1])
    n, m = int(w.shape[0]), int(a.shape[0])
    g = math.gcd(n, m)
    pairs = surrogate_max(tf.reshape(w, [n // g, 1, g]), tf.reshape(a, [1, m // g, g]), gamma)
    return tf.reduce_mean(pairs)


def adjq_layer_counts(spec: LayerSpec, w_bits, a_bits, bias_bits, *, stem=None,
                      gamma: float = 0.7) -> dict[str, tf.Tensor]:
    """The submission's counts of one layer; ``multiplies = adds = ops / 2``.

    ``ops = 2 * MACs * max(w, a) / 32`` with ``max(w, a)`` = :func:`tiled_max_mean` (the
    stem (default: ``spec.stem``) at a flat 8 bits);
    ``params = weights * mean(w) / 32 + biases * bias_bits / 32``.
    """
    _check_spec(spec)
    if stem is None:
        stem = spec.stem
    w = _bits(w_bits, spec.weight_channels, f"{spec.scope} weight")
    a = _bits(a_bits, spec.cin, f"{spec.scope} act")
    bias = _bits(bias_bits, 1, "bias_bits")
    mean_w = tf.reduce_mean(w)
    if stem:
        bits = tf.constant(float(IMAGE_BITS), _DTYPE)
    else:
        bits = tiled_max_mean(w, a, gamma)
    ops = 2.0 * spec.macs * bits * _PER_BIT
    n_weights = spec.weights_per_out_channel * spec.cout
    params = n_weights * mean_w * _PER_BIT
    if spec.has_bias:
        params += spec.cout * bias * _PER_BIT
    return {"params": params, "multiplies": ops / 2.0, "adds": ops / 2.0}


def adjq_element_counts(op: ElementOp, bits=None) -> dict[str, tf.Tensor]:
    """The submission's counts of a non-conv op: swish 3 ops per element, nothing else."""
    if op.kind not in ELEMENT_KINDS:
        raise ValueError(f"{op.scope}: unknown element op kind {op.kind!r}")
    if op.kind != "swish":
        return {"params": _zero(), "multiplies": _zero(), "adds": _zero()}
    s = _bits(FLOAT_BITS if bits is None else bits, op.channels, f"{op.scope} swish")
    ops = 3.0 * op.hw * op.hw * op.channels * tf.reduce_mean(s) * _PER_BIT
    return {"params": _zero(), "multiplies": ops / 2.0, "adds": ops / 2.0}


# --------------------------------------------------------------------------- sparsity

#: Activations with ``f(0) = 0``: a removed (all-zero) channel stays zero through them.
ZERO_PRESERVING = ("swish", "relu", "relu6", "hard_swish")


def _density(spec: LayerSpec, value) -> tf.Tensor:
    """A layer's density as ``[cin, cout]`` (conv / FC) or ``[C]`` (depthwise), float64."""
    d = value if isinstance(value, tf.Tensor) else tf.convert_to_tensor(value)
    d = tf.cast(d, _DTYPE) if d.dtype != _DTYPE else d
    full = [spec.cin] if spec.kind == "dws" else [spec.cin, spec.cout]
    shape = d.shape.as_list()
    if shape == [] or shape == [1]:
        return tf.reshape(d, []) * tf.ones(full, _DTYPE)
    if shape == [spec.weight_channels]:
        return d if spec.kind == "dws" else tf.reshape(d, [1, -1]) * tf.ones(full, _DTYPE)
    if shape == full:
        return d
    raise UserError(f"{spec.scope}: density of shape {shape} does not fit the layer; pass a "
                    f"scalar, {spec.weight_channels} values (one per output channel)"
                    + ("" if spec.kind == "dws" else f" or [{spec.cin}, {spec.cout}]"))


def _per_channel(t: tf.Tensor, n: int) -> tf.Tensor:
    """A ``[]`` or ``[n]`` tensor as ``[n]``."""
    return t * tf.ones([n], _DTYPE) if t.shape.rank == 0 else t


def _kept_taps(spec: LayerSpec, density, alive: tf.Tensor):
    """``(kept, taps, alive_out)``: the kept taps of each channel pair (``[cin, cout]``;
    depthwise ``[C]``), of each output channel, and which output channels are left."""
    k2 = float(spec.kernel * spec.kernel)
    d = _density(spec, density)
    if spec.kind == "dws":
        kept = k2 * d * alive
        taps = kept
    else:
        kept = k2 * d * tf.reshape(alive, [-1, 1])
        taps = tf.reduce_sum(kept, axis=0)
    return kept, taps, tf.stop_gradient(tf.cast(taps > 0, _DTYPE))


def sparse_layer_counts(spec: LayerSpec, w_bits, a_bits, bias_bits, *, density=1.0,
                        alive_in=None, style: str = "micronet", act_quantizer=None,
                        gamma: float = 0.7) -> dict[str, tf.Tensor]:
    """Counts of one layer with sparse weights and removed channels (docs/metric.md,
    "Sparsity"): ``{params, multiplies, adds, alive_out}``.

    ``density`` as in :class:`BitAssignment`; ``alive_in`` ([cin], 1 or 0) says which input
    channels exist (0: removed by the producer, default: all). With ``n[ci, co] = k*k *
    density * alive_in[ci]`` kept taps, official counting (``style="micronet"``):

    * multiplies ``positions * sum n[ci, co] * max(w_co, a_ci) / 32``;
    * adds (at 32 bits) ``positions * sum over kept co of (sum_ci n[ci, co] - 1 + bias)``;
    * weight params ``sum_co w_co * sum_ci n[ci, co] / 32``, plus a 1-bit mask over the kept
      channels' ``k*k * cin_kept * cout_kept`` weights when any of them is zero; a quantizer's
      scale and offset (2 params) per kept channel; the biases of kept output channels.

    An output channel with no kept tap is removed: no mask, no bias, no quantizer
    parameters, and its consumers lose the matching input channel. ``style="adjq"`` counts
    the submission's way (``2 * kept MACs * max(w, a) / 32`` ops, ``kept weights * mean(w) /
    32`` params) with the same mask and removed channels. Differentiable with respect to the
    bits and the density (not through the removal itself).
    """
    _check_spec(spec)
    if act_quantizer is None:
        act_quantizer = not spec.stem
    n_w = spec.weight_channels
    w = _per_channel(_bits(w_bits, n_w, f"{spec.scope} weight"), n_w)
    a = _per_channel(_bits(a_bits, spec.cin, f"{spec.scope} act"), spec.cin)
    bias = _bits(bias_bits, 1, "bias_bits")
    alive = tf.ones([spec.cin], _DTYPE) if alive_in is None else tf.cast(alive_in, _DTYPE)
    positions = spec.out_hw * spec.out_hw
    k2 = float(spec.kernel * spec.kernel)
    kept, taps, alive_out = _kept_taps(spec, density, alive)
    if spec.kind == "dws":
        pair = surrogate_max(w, a, gamma)
    else:
        pair = surrogate_max(tf.reshape(w, [1, -1]), tf.reshape(a, [-1, 1]), gamma)
    n_out = tf.reduce_sum(alive_out)
    region = k2 * n_out * (1.0 if spec.kind == "dws" else tf.reduce_sum(alive))
    masked = tf.stop_gradient(tf.cast(tf.reduce_sum(kept) < region, _DTYPE))
    params = masked * region * _PER_BIT  # the 1-bit mask
    if style == "micronet":
        multiplies = positions * tf.reduce_sum(kept * pair) * _PER_BIT
        adds = positions * tf.reduce_sum(alive_out * (taps - 1.0 + float(spec.has_bias)))
        params += tf.reduce_sum(w * taps) * _PER_BIT
        params += 2.0 * tf.reduce_sum(alive_out * tf.cast(w < FLOAT_BITS, _DTYPE))
        if act_quantizer:
            params += 2.0 * tf.reduce_sum(alive * tf.cast(a < FLOAT_BITS, _DTYPE))
        if spec.has_bias:
            params += n_out * bias * _PER_BIT + 2.0 * tf.cast(bias < FLOAT_BITS, _DTYPE)
    elif style == "adjq":
        bits = (tf.constant(float(IMAGE_BITS), _DTYPE) if spec.stem
                else tiled_max_mean(w, a, gamma))
        ops = 2.0 * positions * tf.reduce_sum(kept) * bits * _PER_BIT
        multiplies = adds = ops / 2.0
        params += tf.reduce_sum(kept) * tf.reduce_mean(w) * _PER_BIT
        if spec.has_bias:
            params += n_out * bias * _PER_BIT
    else:
        raise UserError(f"metric style {style!r}: use one of {', '.join(STYLES)}")
    return {"params": params, "multiplies": multiplies, "adds": adds, "alive_out": alive_out}


def input_liveness(net: Network, bits: BitAssignment, img_size: int = 224) -> dict[str, tf.Tensor]:
    """``{layer: [cin] 1/0}``: which input channels of each weight layer exist.

    A channel is removed (0) when every weight of it is zero in its producer (see
    :func:`sparse_layer_counts`; the pruning zeroes its bias with it, so it is exactly 0).
    Zero stays zero through a swish, ReLU, ReLU6 or hard swish, padding, pooling and
    dropout; a sigmoid of 0 is not 0. A product is zero where a factor is, a residual sum
    where both terms are. The image's channels exist.
    """
    return channel_liveness(net, bits.density, img_size)[0]


def channel_liveness(net: Network, density: dict, img_size: int = 224
                     ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
    """``(alive_in, alive_out)``: ``{layer: [cin]}`` and ``{layer: [cout]}`` of 1/0 (float64,
    without gradient), which input and output channels of each weight layer exist, for
    the densities ``density`` (as :attr:`BitAssignment.density`; a layer without an entry
    is dense). An output channel none of whose kept weights reads a live input channel
    is removed; :class:`adj_quant.qnetwork.QuantizedNetwork` zeroes its bias, so it is
    exactly 0 (see :func:`input_liveness` for how zero travels between layers).
    """
    specs = {spec.scope: spec for spec in network_layers(net, img_size)}
    alive = {"image": tf.ones([3], _DTYPE)}
    alive_in, alive_out = {}, {}
    for node in net.nodes:
        names = net.inputs_of(node)
        x = alive[names[0]]
        if node.name in specs:
            spec = specs[node.name]
            alive_in[node.name] = x
            y = alive_out[node.name] = _kept_taps(spec, density.get(node.name, 1.0), x)[2]
        elif node.op == "act":
            y = x if node.fn in ZERO_PRESERVING else tf.ones_like(x)
        elif node.op == "mul":
            y = x * alive[names[1]]
        elif node.op == "add":
            y = tf.maximum(x, alive[names[1]])
        elif node.op in _LIVENESS_OF:
            y = _LIVENESS_OF[node.op](node, [alive[name] for name in names])
        elif node.op == "flatten":  # row-major: the channels repeat at every position
            y = tf.tile(x, [net.shapes(img_size)[node.name].channels // int(x.shape[0])])
        else:
            y = x
        alive[node.name] = y
    return alive_in, alive_out


#: Channel liveness through the operations that regroup channels (a layer norm's output
#: is nonzero even where its input is).
_LIVENESS_OF = {
    "concat": lambda node, xs: tf.concat(xs, axis=0),
    "slice": lambda node, xs: xs[0][node.start:node.start + node.filters],
    "layer_norm": lambda node, xs: tf.ones_like(xs[0]),
}


def _check_sparse_layers(layers: list[LayerSpec]) -> None:
    """Sparse counts know square, ungrouped kernels only."""
    for spec in layers:
        if spec.groups != 1 or spec.kernel_w not in (0, spec.kernel):
            raise UserError(f"{spec.scope}: sparsity (density) is not counted for grouped or "
                            "non-square convolutions; train this network without --sparsity")


# --------------------------------------------------------------------------- totals


@dataclasses.dataclass
class Counts:
    """Totals (float64 tensors); ``ops = multiplies + adds``;
    ``score = params/P_REF + ops/O_REF``."""

    params: Any
    multiplies: Any
    adds: Any
    ops: Any
    score: Any
    per_layer: list[dict] | None = None  # scope, kind, params, multiplies, adds

    def as_floats(self) -> dict[str, float]:
        return {key: float(getattr(self, key)) for key in
                ("params", "multiplies", "adds", "ops", "score")}


def _lookup(table: dict, scope: str, what: str):
    try:
        return table[scope]
    except KeyError:
        raise ValueError(f"BitAssignment has no {what} bits for scope {scope!r}") from None


def _row_value(t):
    return float(t.numpy()) if hasattr(t, "numpy") and tf.executing_eagerly() else t


def count_specs(layers: list[LayerSpec], ops: list[ElementOp], bits: BitAssignment,
                style: str = "micronet", per_layer: bool = False, freebie: bool = True,
                gamma: float = 0.7, alive_in: dict | None = None) -> Counts:
    """Count any list of layers and element ops with ``bits`` in the given style.

    The 16-bit freebie (micronet only) halves params and multiplies, never adds, when
    ``freebie`` and ``bits.is_float()``. With ``bits.density`` every layer is counted by
    :func:`sparse_layer_counts`, its input channels from ``alive_in`` (default: all; see
    :func:`input_liveness`).
    """
    if style not in STYLES:
        raise UserError(f"metric style {style!r}: use one of {', '.join(STYLES)}")
    layer_fn = micronet_layer_counts if style == "micronet" else adjq_layer_counts
    element_fn = micronet_element_counts if style == "micronet" else adjq_element_counts
    if bits.density:
        _check_sparse_layers(layers)
    rows = []
    for spec in layers:
        args = (spec, _lookup(bits.weight, spec.scope, "weight"),
                _lookup(bits.act, spec.scope, "act"), counted_bits(bits.bias_bits))
        if bits.density:
            counts = sparse_layer_counts(*args, density=bits.density.get(spec.scope, 1.0),
                                         alive_in=(alive_in or {}).get(spec.scope),
                                         style=style, gamma=gamma)
        else:
            counts = layer_fn(*args, gamma=gamma)
        rows.append((spec.scope, spec.kind, counts))
    for op in ops:
        if op.kind == "swish":
            act_fn_bits = _lookup(bits.swish, op.scope, "swish")
        else:  # a sigmoid whose input is not quantized has no entry: float
            act_fn_bits = bits.swish.get(op.scope) if op.kind == "sigmoid" else None
        rows.append((op.scope, op.kind, element_fn(op, act_fn_bits)))
    half = 0.5 if (style == "micronet" and freebie and bits.is_float()) else 1.0
    params = tf.add_n([c["params"] for _, _, c in rows] or [_zero()]) * half
    multiplies = tf.add_n([c["multiplies"] for _, _, c in rows] or [_zero()]) * half
    adds = tf.add_n([c["adds"] for _, _, c in rows] or [_zero()])
    total_ops = multiplies + adds
    score = params / P_REF + total_ops / O_REF
    table = None
    if per_layer:
        table = [{"scope": scope, "kind": kind, "params": _row_value(c["params"] * half),
                  "multiplies": _row_value(c["multiplies"] * half), "adds": _row_value(c["adds"])}
                 for scope, kind, c in rows]
    return Counts(params, multiplies, adds, total_ops, score, table)


def count_micronet(arch: Network, img_size: int, bits: BitAssignment, per_layer: bool = False,
                   freebie: bool = True, *, gamma: float = 0.7) -> Counts:
    """Official MicroNet counts of the whole network."""
    return count_specs(network_layers(arch, img_size), element_ops(arch, img_size), bits,
                       "micronet", per_layer, freebie, gamma, _liveness(arch, bits, img_size))


def count_adjq(arch: Network, img_size: int, bits: BitAssignment, per_layer: bool = False,
               *, gamma: float = 0.7) -> Counts:
    """The submission's own counts of the whole network (``multiplies = adds = ops / 2``)."""
    return count_specs(network_layers(arch, img_size), element_ops(arch, img_size), bits,
                       "adjq", per_layer, False, gamma, _liveness(arch, bits, img_size))


def _liveness(arch: Network, bits: BitAssignment, img_size: int) -> dict | None:
    if not bits.density:
        return None
    _check_sparse_layers(network_layers(arch, img_size))
    return input_liveness(arch, bits, img_size)


def bits_of(model) -> BitAssignment:
    """A model's current bits: a quantized model's own, 32 everywhere for a float one."""
    from adj_quant.qnetwork import is_quantized

    if is_quantized(model):
        return model.bit_assignment()
    return BitAssignment.uniform(model.arch, FLOAT_BITS, FLOAT_BITS)


def micronet_cost(model_or_bits, img_size: int = 224, *, arch: Network | None = None,
                  style: str = "micronet", gamma: float = 0.7, freebie: bool = True,
                  per_layer: bool = False) -> Counts:
    """The cost of a model (float or quantized, at its current bits) or of a
    :class:`BitAssignment` (then ``arch`` is needed): float64 tensors, differentiable with
    respect to the bits (``gamma`` splits the gradient of a max of weight and activation
    bits). ``style``: ``micronet`` (official) or ``adjq`` (the submission's counting);
    the 16-bit ``freebie`` of a fully float network applies to ``micronet`` only.
    """
    if isinstance(model_or_bits, BitAssignment):
        if arch is None:
            raise TypeError("micronet_cost(bits, ...) needs arch=, the network of the bits")
        bits = model_or_bits
    else:
        bits, arch = bits_of(model_or_bits), arch or model_or_bits.arch
    return count_specs(network_layers(arch, img_size), element_ops(arch, img_size), bits,
                       style, per_layer, freebie and style == "micronet", gamma,
                       _liveness(arch, bits, img_size))


@dataclasses.dataclass(frozen=True)
class CostReport:
    """What validation, evaluation and sweeps report of a model's cost: the official counts
    (params, ops, multiplies, adds, score_micronet), the submission's score_adjq and the
    average bits."""

    params: float
    ops: float
    multiplies: float
    adds: float
    score_micronet: float
    score_adjq: float
    avg_weight_bits: float
    avg_act_bits: float

    def score(self, style: str) -> float:
        return self.score_micronet if style == "micronet" else self.score_adjq

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def cost_report(model_or_bits, img_size: int = 224, *, arch: Network | None = None) -> CostReport:
    """Both scores of :func:`micronet_cost` (default counting options) and the average bits."""
    from adj_quant.quant_info import average_bits

    bits = model_or_bits if isinstance(model_or_bits, BitAssignment) else bits_of(model_or_bits)
    arch = arch or model_or_bits.arch
    official = micronet_cost(bits, img_size, arch=arch, style="micronet")
    own = micronet_cost(bits, img_size, arch=arch, style="adjq")
    avg_w, avg_a = average_bits(bits, arch)
    return CostReport(params=float(official.params), ops=float(official.ops),
                      multiplies=float(official.multiplies), adds=float(official.adds),
                      score_micronet=float(official.score), score_adjq=float(own.score),
                      avg_weight_bits=avg_w, avg_act_bits=avg_a)
