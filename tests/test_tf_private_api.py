"""The private TensorFlow API that the quantizer kernels use is still there and still works.

``adj_quant/quantizers/kernels.py`` records each quantizer call on the gradient tape with
``tensorflow.python.eager.record`` (``stop_recording`` around the forward call,
``record_operation`` with the hand-written backward). These tests fail with a message
naming what moved when a TensorFlow upgrade changes it; they also check that no other
quantizer module imports private TensorFlow.
"""

import ast
import importlib
import inspect
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT

#: The private module, and what kernels.py calls in it with the parameters it passes.
MODULE = "tensorflow.python.eager.record"
RECORD_OPERATION_PARAMETERS = ["op_type", "output_tensors", "input_tensors",
                               "backward_function"]


def _record():
    try:
        return importlib.import_module(MODULE)
    except ImportError as err:  # pragma: no cover - only on a TensorFlow that moved it
        pytest.fail(f"TensorFlow {tf.__version__} has no {MODULE} ({err}); "
                    "adj_quant/quantizers/kernels.py needs another way to record the "
                    "quantizer's gradient on the tape")


def test_the_tape_recording_functions_exist_with_the_expected_signatures():
    record = _record()
    for name in ("stop_recording", "record_operation"):
        assert callable(getattr(record, name, None)), (
            f"TensorFlow {tf.__version__}: {MODULE}.{name} is gone; "
            "adj_quant/quantizers/kernels.py (_quantizer_call) uses it")
    params = list(inspect.signature(record.record_operation).parameters)
    assert params[:4] == RECORD_OPERATION_PARAMETERS, (
        f"TensorFlow {tf.__version__}: {MODULE}.record_operation takes {params}, "
        f"kernels.py passes {RECORD_OPERATION_PARAMETERS} positionally")
    assert not inspect.signature(record.stop_recording).parameters


@pytest.mark.parametrize("traced", [False, True])
def test_a_recorded_operation_gets_its_hand_written_gradient(traced):
    """What kernels.py relies on: a forward run under ``stop_recording`` is invisible to the
    tape, and ``record_operation`` makes the tape call the given backward instead (checked
    against the gradients of the same function by plain autodiff, which differ on purpose)."""
    record = _record()
    x = tf.constant([0.5, -1.0, 2.0])
    w = tf.Variable([1.5, 2.0, -0.5])

    def f(x):
        values = [x, tf.convert_to_tensor(w)]
        with tf.GradientTape() as tape:
            tape.watch(values)
            with record.stop_recording():
                out = values[0] * values[1]
        unrecorded = tape.gradient(out, values, unconnected_gradients="none")
        with tf.GradientTape() as tape:
            tape.watch(values)
            with record.stop_recording():
                out = values[0] * values[1]

            def backward(g):  # deliberately not the true gradient: 3 g and -g
                return [3.0 * g, -g]

            record.record_operation("Probe", [out], values, backward)
            loss = tf.reduce_sum(out)
        return unrecorded, tape.gradient(loss, values)

    unrecorded, (gx, gw) = (tf.function(f) if traced else f)(x)
    assert unrecorded == [None, None], "stop_recording no longer hides ops from the tape"
    np.testing.assert_array_equal(gx.numpy(), [3.0, 3.0, 3.0])
    np.testing.assert_array_equal(gw.numpy(), [-1.0, -1.0, -1.0])


def test_only_the_kernels_import_private_tensorflow():
    """Within adj_quant/quantizers/; adj_quant/graph_options.py has its own (the eager
    context's per-thread grappler options) and is outside this package."""
    package = os.path.join(ROOT, "adj_quant", "quantizers")
    found = {}
    for name in sorted(os.listdir(package)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(package, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            for module in modules:
                if module.startswith("tensorflow.python"):
                    found.setdefault(name, set()).add(module)
    assert found == {"kernels.py": {"tensorflow.python.eager"}}
