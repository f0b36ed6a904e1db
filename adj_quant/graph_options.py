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


def _lean_options() -> context.FunctionCallOptions:
    """The current thread's function call options with grappler made lean (see above)."""
    current = context.context().function_call_options
    config = config_pb2.ConfigProto()
    config.ParseFromString(current.config_proto_serialized)
    rewrite = config.graph_options.rewrite_options
    rewrite.meta_optimizer_iterations = _Rewriter.ONE
    rewrite.function_optimization = _Rewriter.OFF
    return context.FunctionCallOptions(executor_type=current.executor_type,
                                       config_proto=config)


@contextlib.contextmanager
def lean_grappler():
    """Functions called in this block are optimized by one round of grappler's passes,
    without its function optimizer."""
    ctx = context.context()
    previous = ctx.function_call_options
    ctx.function_call_options = _lean_options()
    try:
        yield
    finally:
        ctx.function_call_options = previous
