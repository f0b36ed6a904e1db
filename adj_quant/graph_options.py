"""Graph-optimizer settings for the training and evaluation steps: a leaner grappler.

TensorFlow rewrites a ``tf.function``'s graph with its optimizer, grappler, the first time
the function runs; on the quantized training step, a large graph, that is a sizeable part
of the first call. Two parts of that change nothing in adjq's graphs, so
:func:`lean_grappler` leaves them out:

* the **second round**: by default grappler runs its list of passes (pruning, constant
  folding, arithmetic simplification, remapping to fused kernels, ...) twice; on this step
  the second round only merged a dozen duplicate nodes, as the first had made every
  rewrite;
* the **function optimizer** (specializing and inlining nested functions): adjq's nested
  functions are the quantizers, which are either XLA-compiled or deliberately not inlined
  (:mod:`adj_quant.quantizers.kernels`), so it leaves the graph as it is and only spends
  time finding that out.

Leaving them out shortens the first call (``bench/README.md`` has the measurement). The
step itself and its results are unchanged (the tests compare the gradients with
TensorFlow's defaults, bit for bit).

The **training steps** go further (:func:`training_grappler`): of a round's passes they keep
constant folding and remapping only. The others (arithmetic simplification, pruning,
dependency, layout, memory, loop and shape optimization, common subexpressions) change
nothing in the numbers of adjq's training steps (the digits recipe's log is the same, line
for line), and cost seconds of the quantized steps' first calls (over the recipe 22 s
instead of 17); the steps themselves ran within a few percent of their time with them
(``bench/README.md`` has the measurements). The two kept ones do change the numbers:
without constant folding the variables differ after a few steps, and without remapping
the float teacher's inference-mode layers (convolution, batch norm and activation, fused)
compute other last bits. The evaluation steps keep the lean setting.

The setting travels with each function call (TensorFlow's per-thread *function call
options*), so it applies only to functions called inside the ``with`` block, not to the
rest of the user's process. A function called both inside and outside is optimized once
for each setting.
"""

from __future__ import annotations

import contextlib

from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context

_Rewriter = rewriter_config_pb2.RewriterConfig


#: The passes :func:`training_grappler` turns off besides the lean ones: every pass of a
#: round but constant folding and remapping (``RewriterConfig`` fields, "off" values).
_TRAINING_OFF = {
    "arithmetic_optimization": _Rewriter.OFF, "memory_optimization": _Rewriter.NO_MEM_OPT,
    "layout_optimizer": _Rewriter.OFF, "dependency_optimization": _Rewriter.OFF,
    "disable_model_pruning": True, "common_subgraph_elimination": _Rewriter.OFF,
    "loop_optimization": _Rewriter.OFF, "shape_optimization": _Rewriter.OFF,
}


def _options(training: bool) -> context.FunctionCallOptions:
    """The current thread's function call options with grappler made lean (see above), and
    for ``training`` reduced further (see :func:`training_grappler`)."""
    current = context.context().function_call_options
    config = config_pb2.ConfigProto()
    config.ParseFromString(current.config_proto_serialized)
    rewrite = config.graph_options.rewrite_options
    rewrite.meta_optimizer_iterations = _Rewriter.ONE
    rewrite.function_optimization = _Rewriter.OFF
    if training:
        for field, value in _TRAINING_OFF.items():
            setattr(rewrite, field, value)
    return context.FunctionCallOptions(executor_type=current.executor_type,
                                       config_proto=config)


@contextlib.contextmanager
def _calls_with(options: context.FunctionCallOptions):
    ctx = context.context()
    previous = ctx.function_call_options
    ctx.function_call_options = options
    try:
        yield
    finally:
        ctx.function_call_options = previous


def lean_grappler():
    """Functions called in this block are optimized by one round of grappler's passes,
    without its function optimizer."""
    return _calls_with(_options(training=False))


def training_grappler():
    """Functions called in this block are optimized by grappler's constant folding and
    remapping only: for the training steps (see above)."""
    return _calls_with(_options(training=True))
