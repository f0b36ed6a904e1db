"""The quantizer's compiled kernels and their trace and gradient-tape plumbing.

The only module of adjq's quantizers that uses TensorFlow's private API: the gradient tape's
``record_operation`` and ``stop_recording`` (``tensorflow.python.eager.record``, see
:func:`_quantizer_call`); ``tests/test_tf_private_api.py`` checks that they are still there.

The XLA settings of :mod:`adj_quant.xla_config` are applied here, once, when the first
quantizer kernel is traced (:func:`_configure_xla`), so that importing adjq changes nothing.
TensorFlow reads ``XLA_FLAGS`` when it first compiles with XLA, so the compiler setting takes
effect then; ``TF_XLA_FLAGS`` (the on-disk kernel cache) is read when TensorFlow's runtime
starts (its first op), so a program that wants the cache calls
:func:`adj_quant.xla_config.configure` before it runs any TensorFlow op.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.eager import record as tape_record  # see _quantizer_call

from adj_quant import xla_config
from adj_quant.quantizers.formula import (
    _fake_quantize_math,
    _quantizer_math,
    _quantizer_vjp_math,
)

_XLA_CONFIGURED = {"done": False}


def _configure_xla() -> None:
    """:func:`adj_quant.xla_config.configure`, once per process, before the first kernel."""
    if not _XLA_CONFIGURED["done"]:
        xla_config.configure()
        _XLA_CONFIGURED["done"] = True


# Inside a tf.function (training, evaluation) a whole quantizer -- range adjustment, bits,
# quantize-dequantize -- runs as one function call forward and one backward, traced once
# per rank of x and setting (axis, bits, range...) for tensors of any size and shared by
# every call site with that rank and setting (run_quantizer, _trace_of);
# for activations, XLA compiles one kernel per shape from that trace. The graph
# of a network then holds two calls per quantizer instead of dozens of ops, and the
# elementwise work of an activation is one fused kernel each way, while the convolutions
# stay on the regular kernels. Eagerly (tests, calibration bookkeeping) the same math runs
# op by op. ``use_fused_kernels(False)`` turns the functions off (plain TF ops in the
# caller's graph); the functional ``fake_quantize`` compiles its own kernel per signature.
_fake_quantize_xla = tf.function(_fake_quantize_math, jit_compile=True)
_FUSED = {"on": True}


def use_fused_kernels(enabled: bool) -> None:
    _FUSED["on"] = bool(enabled)


def _fused() -> bool:
    return _FUSED["on"] and tf.inside_function()


def fake_quantize_kernel():
    """The function :func:`~adj_quant.quantizers.adjustable.fake_quantize` runs: compiled
    inside a ``tf.function`` (see above), else the formula op by op."""
    if _fused():
        _configure_xla()
        return _fake_quantize_xla
    return _fake_quantize_math


def _site_forward(x, *params, **settings) -> tf.Tensor:
    """:func:`_quantizer_math` with ``bits_scale`` left out for fixed bits (4 parameters)."""
    return _quantizer_math(x, *params, *[None] * (5 - len(params)), **settings)


def _site_vjp(g, x, *params, **settings) -> list[tf.Tensor]:
    """:func:`_quantizer_vjp_math` for :func:`_site_forward`: the gradients of ``x`` and of
    each parameter."""
    return _quantizer_vjp_math(g, x, *params, *[None] * (5 - len(params)), **settings)


#: :func:`_site_forward` and its gradients as XLA-compiled functions, one per signature
#: (see ``_fused``): for activations, where one fused pass over a large tensor each way pays
#: for the compilation.
_quantizer_xla = tf.function(_site_forward, jit_compile=True, autograph=False)
_quantizer_vjp_xla = tf.function(_site_vjp, jit_compile=True, autograph=False)
#: The same as plain functions whose traces generalise over shapes: weights, biases and
#: small activations (the SE layers' 1x1 maps), where the elementwise work is small and a
#: compilation per shape would cost more than it saves. One trace serves every call site of
#: a rank and setting. Not inlined: TensorFlow would otherwise copy the shape-generic body
#: into the caller's graph at every call site and optimise each copy, which makes the first
#: call of a network's step much slower.
_NOINLINE = {"_noinline": True}
_quantizer_shared = tf.function(_site_forward, autograph=False,
                                experimental_attributes=_NOINLINE)
_quantizer_vjp_shared = tf.function(_site_vjp, autograph=False,
                                    experimental_attributes=_NOINLINE)


#: Concrete functions of the four functions above, by (function, rank of x, number of
#: parameters, settings): see :func:`_trace_of`.
_TRACES: dict = {}


def _trace_of(fn, rank: int, num_params: int, settings: dict, *, vjp: bool):
    """``fn``'s one trace for every ``x`` of this rank (any shape, any channel count):
    traced for inputs of unknown sizes, so XLA compiles one kernel per shape from it.

    Calling the concrete function skips ``tf.function``'s per-call signature matching, which
    would otherwise run at every call site each way while a network is traced. The XLA
    settings are applied before the first trace (:func:`_configure_xla`).
    """
    key = (fn, rank, num_params, tuple(sorted(settings.items())))
    trace = _TRACES.get(key)
    if trace is None:
        _configure_xla()
        x = tf.TensorSpec([None] * rank, tf.float32)
        params = [tf.TensorSpec([None], tf.float32)] * num_params
        args = [x] * (2 if vjp else 1) + params
        trace = _TRACES[key] = fn.get_concrete_function(*args, **settings)
    return trace


def _quantizer_call(forward, vjp, x, init_min, init_max, range_scale, range_shift, bits_scale,
                    **settings) -> tf.Tensor:
    """One call of the function ``forward``; its gradient is one call of ``vjp``.

    The gradient is attached here rather than differentiated through ``forward``:
    TensorFlow would then make the forward return the tensors its backward needs (``x``
    itself, copied out of a compiled kernel); this way the backward reads ``x`` directly.

    The call is recorded on the gradient tape directly (what ``tf.custom_gradient`` does
    eagerly) rather than through ``tf.custom_gradient``'s graph form, which wraps every call
    site in an ``IdentityN`` with one output per input and, in the backward, builds a zero
    tensor for each of those outputs (graph ops at every call site that grappler then has to
    prune). Gradients are computed with ``tf.GradientTape``, as everywhere in adjq; the
    symbolic ``tf.gradients`` does not see them.
    """
    values = [init_min, init_max, range_scale, range_shift]
    values += [] if bits_scale is None else [bits_scale]
    forward = _trace_of(forward, len(x.shape), len(values), settings, vjp=False)
    vjp = _trace_of(vjp, len(x.shape), len(values), settings, vjp=True)
    with tape_record.stop_recording():
        out = forward(x, *values, **settings)
    out.set_shape(x.shape)  # a trace shared by many shapes returns an unknown shape

    def grad(g):
        grads = vjp(g, x, *values, **settings)
        for grad_v, v in zip(grads, [x] + values):
            grad_v.set_shape(v.shape)
        return grads

    tape_record.record_operation("AdjustableQuantizer", [out], [x] + values, grad)
    return out


#: Activations with fewer elements than this run :data:`_quantizer_shared`.
COMPILE_MIN_ELEMENTS = 1 << 16


def run_quantizer(x, values, *, compiled: bool, **settings) -> tf.Tensor:
    """One :class:`~adj_quant.quantizers.adjustable.AdjustableQuantizer` call on a float32
    ``x`` from its variables' ``values`` (``bits_scale`` None for fixed bits): op by op
    outside a ``tf.function`` or with the fused kernels off; else one call of the compiled
    kernel (``compiled`` and at least :data:`COMPILE_MIN_ELEMENTS` elements) or of the shared
    trace, each with its gradient on the tape."""
    if not _fused():
        return _quantizer_math(x, *values, **settings)
    if compiled and (x.shape.num_elements() or 0) >= COMPILE_MIN_ELEMENTS:
        return _quantizer_call(_quantizer_xla, _quantizer_vjp_xla, x, *values, **settings)
    return _quantizer_call(_quantizer_shared, _quantizer_vjp_shared, x, *values, **settings)
